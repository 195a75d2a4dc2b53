"""The morphology descriptor on drawn binary patches: each defect kind moves the features it should, no mocks."""

from __future__ import annotations

import numpy as np

from tasks.descriptors import component_stats, morph_features

S = 48


def _trace() -> np.ndarray:
    """A dark horizontal trace (copper) through the centre of a bright patch: the defect-free layout."""
    im = np.full((S, S), 255, np.uint8)
    im[18:30, :] = 0
    return im


def _kinds() -> dict[str, np.ndarray]:
    clean = _trace()
    open_ = clean.copy()
    open_[18:30, 23:25] = 255  # a 2 px break across the trace: splits it in two
    blob = clean.copy()
    blob[11:16, 22:27] = 0  # an isolated dark blob near the centre (spurious copper)
    hole = clean.copy()
    hole[22:26, 22:26] = 255  # a bright hole inside the trace (pin-hole)
    return {"clean": clean, "open": open_, "blob": blob, "hole": hole}


def test_component_stats_count_isolated_blobs_near_the_centre_only():
    kinds = _kinds()
    centre = np.zeros((S, S), bool)
    centre[12:36, 12:36] = True
    stack = np.stack([kinds["clean"], kinds["blob"], kinds["open"]]) < 128  # dark phase
    far = kinds["clean"].copy()
    far[40:44, 2:6] = 0  # a blob far from the centre is layout, not defect
    stats = component_stats(np.concatenate([stack, (far < 128)[None]]), centre)
    touching, isolated = stats[:, 0], stats[:, 1]
    assert touching.tolist() == [1, 2, 2, 1]  # the broken trace touches the centre as two components
    assert isolated.tolist() == [0, 1, 0, 0] and stats[1, 2] > 0 and stats[3, 2] == 0


def test_morph_features_tell_defect_kinds_from_the_clean_layout_and_from_each_other():
    kinds = _kinds()
    f = morph_features(np.stack(list(kinds.values())))
    assert f.shape[0] == 4 and np.isfinite(f).all()
    clean, open_, blob, hole = f
    for name, other in (("open", open_), ("blob", blob), ("hole", hole)):
        assert np.abs(other - clean).max() > 0.1, name
    # three different defects give three different descriptions
    dists = [np.linalg.norm(a - b) for a, b in ((open_, blob), (open_, hole), (blob, hole))]
    assert min(dists) > 0.1


def test_morph_features_barely_move_when_the_defect_shifts_a_pixel():
    """The same defect a few pixels off along the trace is (nearly) the same vector: features are pooled in
    radially symmetric windows around the centre."""
    a = _kinds()["open"]
    b = np.roll(a, 1, axis=1)
    fa, fb = morph_features(np.stack([a, b]))
    fc = morph_features(_kinds()["blob"][None])[0]
    assert np.linalg.norm(fa - fb) < 0.5 * np.linalg.norm(fa - fc)
