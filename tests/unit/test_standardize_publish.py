import json
import stat

import numpy as np
import pytest
from PIL import Image

from tasks.config import StandardizeParams
from tasks.publishing import labelset_id, publish, sha256_file
from tasks.standardize import normalise_lighting, standardize_all, to_square


def test_lighting_makes_machines_comparable():
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 255, (32, 32)).astype(np.float32)
    dark = (scene * 0.3 + 10).astype(np.uint8)  # low gain machine
    bright = (scene * 0.8 + 40).astype(np.uint8)  # high gain machine
    a = normalise_lighting(dark, "percentile", (1, 99)).astype(float)
    b = normalise_lighting(bright, "percentile", (1, 99)).astype(float)
    assert np.abs(a - b).mean() < 3
    assert normalise_lighting(np.full((8, 8), 7, np.uint8), "percentile", (1, 99)).max() == 0


def test_to_square_pads_without_distortion():
    img = np.zeros((20, 40), np.uint8)
    img[:, 20:] = 200
    out = to_square(img, 40)
    assert out.shape == (40, 40)
    assert out[:, :19].max() == 0 and out[:, 21:].min() == 200  # edges replicated, no stretching


def test_standardize_all_mixed_modes(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((rng.integers(0, 65535, (90, 90))).astype(np.uint16)).save(tmp_path / "b.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "c.jpg")
    arr = standardize_all(
        tmp_path, ["a.png", "b.png", "c.jpg"], tmp_path / "out.npy", StandardizeParams(size=32), 10**8
    )
    loaded = np.load(tmp_path / "out.npy")
    assert loaded.shape == (3, 32, 32) and loaded.dtype == np.uint8
    assert np.array_equal(loaded, np.asarray(arr))
    assert all(loaded[i].std() > 20 for i in range(3))


def _rows():
    import pandas as pd

    return pd.DataFrame({"image": ["x.png", "y.png"], "label": ["crack", "void"]})


def test_publish_is_atomic_immutable_and_checksummed(tmp_path):
    sets = tmp_path / "labelsets"
    set_id = labelset_id("md5.dir", "p" * 64, "l" * 64, "h" * 64)
    assert set_id == labelset_id("md5.dir", "p" * 64, "l" * 64, "h" * 64)
    assert set_id != labelset_id("other.dir", "p" * 64, "l" * 64, "h" * 64)

    def write(folder):
        _rows().to_csv(folder / "labels.csv", index=False)

    path, created = publish(sets, set_id, write, {"created_at": "now"})
    assert created and path == sets / set_id
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["labelset_id"] == set_id
    assert manifest["files"] == {"labels.csv": sha256_file(path / "labels.csv")}
    assert not (path / "labels.csv").stat().st_mode & stat.S_IWUSR
    again, created_again = publish(sets, set_id, write, {"created_at": "later"})
    assert again == path and not created_again
    assert json.loads((path / "manifest.json").read_text())["created_at"] == "now"

    def crash(folder):
        (folder / "labels.csv").write_text("half")
        raise RuntimeError("killed mid-publish")

    with pytest.raises(RuntimeError):
        publish(sets, "other", crash, {})
    assert sorted(p.name for p in sets.iterdir()) == [set_id]
