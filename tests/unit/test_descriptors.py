"""The morphology descriptor on drawn binary patches: each defect kind moves the features it should; the defect-area
crop finds a small speck on a patterned background. No mocks."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.descriptors import (
    component_stats,
    crop_features,
    crop_window,
    defect_crops,
    defect_residual,
    lbp_features,
    morph_features,
    stats_features,
)

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


def _textured(size: int = 64, seed: int = 0) -> np.ndarray:
    """A regular pad grid (period 8) with a lighting gradient and noise: structure everywhere, no defect."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    grid = np.where((yy % 8 < 4) & (xx % 8 < 4), 150.0, 90.0)
    return np.clip(grid + 0.4 * xx + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("y", "x", "value"), [(14, 47, 255), (50, 12, 255), (40, 40, 0)])
def test_crop_is_centred_on_a_small_speck_off_centre_on_a_patterned_background(y, x, value):
    im = _textured()
    im[y : y + 2, x : x + 2] = value  # a 2 x 2 px speck (bright, or dark)
    top, left, side = crop_window(defect_residual(im[None])[0])
    assert 64 // 3 - 1 <= side <= 32  # a small region: the minimum crop, not the whole image
    centre = np.array([top + side / 2, left + side / 2])
    assert np.linalg.norm(centre - np.array([y + 1, x + 1])) <= 3
    crop = defect_crops(im[None])[0]
    assert crop.shape == (32, 32)
    assert (crop.max() == 255) if value == 255 else (crop.min() == 0)  # the speck is in the crop


def test_crop_features_give_stats_and_lbp_equal_shares_and_ignore_the_batch():
    """The embedder z-scores each dimension, so equal shares of the block mean (nearly) equal column counts."""
    speck = _textured(seed=1)
    speck[10:12, 50:52] = 255
    images = np.stack([_textured(seed=2), speck])
    f = crop_features(images)
    crops = defect_crops(images)
    stats, lbp = stats_features(crops), lbp_features(crops)
    r_stats = next(r for r in range(1, 20) if (f.shape[1] - r * stats.shape[1]) % lbp.shape[1] == 0)
    n_stats = r_stats * stats.shape[1]
    np.testing.assert_allclose(f[:, :n_stats], np.tile(stats, (1, r_stats)), atol=1e-6)
    np.testing.assert_allclose(f[:, n_stats:], np.tile(lbp, (1, (f.shape[1] - n_stats) // lbp.shape[1])), atol=1e-6)
    assert abs(2 * n_stats - f.shape[1]) <= 0.03 * f.shape[1]
    np.testing.assert_allclose(crop_features(speck[None])[0], f[1], atol=1e-6)
