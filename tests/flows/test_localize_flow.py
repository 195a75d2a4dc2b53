"""The retrain flow with templates: raw images + defect-free templates → defect patches → a label set with lineage."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.publishing import sha256_file

pytestmark = pytest.mark.flow


def _board(rng: np.random.Generator, size: int = 160) -> np.ndarray:
    """A grey defect-free board: graded background, tracks and pads at random places."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = 50.0 + 0.2 * xx
    for _ in range(5):
        y0 = int(rng.integers(5, size - 12))
        img[y0 : y0 + 6, 8 : size - 8] = rng.integers(170, 220)
    for _ in range(3):
        cy, cx = rng.integers(20, size - 20, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 235
    return img


def _raw_pairs(root: Path, n: int = 8) -> tuple[Path, Path, dict[str, list[tuple[int, int, int, int]]]]:
    """``root/images`` and ``root/golden`` (rule same-name): n boards with 2-3 planted defects each (their boxes
    x0, y0, x1, y1 are returned), one image without a template and one corrupt image."""
    images, golden = root / "images", root / "golden"
    rng = np.random.default_rng(7)
    planted: dict[str, list[tuple[int, int, int, int]]] = {}
    for i in range(n):
        rel = f"line{i % 2}/board{i}.png"
        template = _board(rng)
        test = template.copy()
        cells = rng.choice(4, size=int(rng.integers(2, 4)), replace=False)  # defects far apart: one patch each
        for cell in cells:
            h, w = rng.integers(5, 12, 2)
            for _ in range(50):  # on bare background, 4 px from any track: a shift cannot explain it away
                y, x = 10 + 80 * (cell // 2) + rng.integers(0, 55), 10 + 80 * (cell % 2) + rng.integers(0, 55)
                if template[y - 4 : y + h + 4, x - 4 : x + w + 4].max() < 120:
                    break
            else:
                continue
            test[y : y + h, x : x + w] = 250.0  # extra material
            planted.setdefault(rel, []).append((int(x), int(y), int(x + w), int(y + h)))
        noise = rng.normal(0, 2, (2, *template.shape))
        for folder, img in ((golden, template + noise[0]), (images, test * 0.9 + 15 + noise[1])):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / rel)
    Image.fromarray(np.clip(_board(rng), 0, 255).astype(np.uint8)).save(images / "no-template.png")
    (images / "line0" / "corrupt.png").write_bytes((images / "line0" / "board0.png").read_bytes()[:150])
    Image.fromarray(np.zeros((160, 160), np.uint8)).save(golden / "line0" / "corrupt.png")
    return images, golden, planted


@pytest.fixture(scope="module")
def localized_run(prefect_engine, fast_overrides, tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    from flows.retrain import retrain

    root = tmp_path_factory.mktemp("pairs")
    images, golden, planted = _raw_pairs(root)
    ws = root / "workspace"
    path = retrain(
        images=str(images),
        workspace=str(ws),
        templates=str(golden),
        overrides=[*fast_overrides, "cluster.k=4"],
    )
    return ws, Path(path), images, planted


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_label_set_lists_the_patches(localized_run):
    ws, path, images, planted = localized_run
    boxes = _rows(path / "localize" / "boxes.csv")
    defects = [r for r in boxes if r["kind"] == "defect"]
    assert len(defects) == sum(len(b) for b in planted.values()) and len(planted) == 8
    for image, planted_boxes in planted.items():  # every planted defect lies inside a crop of its image
        crops = [
            [int(r[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1")] for r in defects if r["image"] == image
        ]
        for x0, y0, x1, y1 in planted_boxes:
            assert any(c[0] <= x0 and c[1] <= y0 and x1 <= c[2] and y1 <= c[3] for c in crops), (image, x0, y0)
    labels = {r["image"]: r for r in _rows(path / "labels.csv")}
    quarantined = {r["image"]: r["reason"] for r in _rows(ws / "results/validate/quarantine.csv")}
    # every patch and the whole image without a template are labelled, or quarantined with a reason
    assert set(labels) | set(quarantined) == {r["patch"] for r in boxes}
    assert "no-template.png" in labels and "truncated" in quarantined["line0/corrupt.png"]
    assert sum(r["kind"] == "defect" and r["patch"] in labels for r in boxes) >= 0.9 * len(defects)
    for r in defects[:5]:  # labels.csv's sha256 is the patch's, the patch is the file DVC versioned
        if r["patch"] in labels:
            assert labels[r["patch"]]["sha256"] == sha256_file(ws / "data/images" / r["patch"])
            assert r["image_sha256"] == sha256_file(images / r["image"])


def test_manifest_carries_the_localisation(localized_run):
    ws, path, _, _ = localized_run
    manifest = json.loads((path / "manifest.json").read_text())
    loc = manifest["localize"]
    assert loc["boxes"] == "localize/boxes.csv" and loc["rule"] == "same-name" and loc["unpaired"] == "passthrough"
    assert loc["n_pairs"] == 9 and loc["n_unpaired"] == 1 and loc["n_failures"] == 1
    assert manifest["files"]["localize/boxes.csv"] == sha256_file(path / "localize" / "boxes.csv")
    assert manifest["files"]["localize/unlocalized.csv"] == sha256_file(path / "localize" / "unlocalized.csv")
    assert manifest["params"]["localize"]["rule"] == "same-name"
    # the data version is the patch folder (its image files), the lineage tables are committed in the workspace
    n_files = len(_rows(path / "localize" / "boxes.csv"))
    assert manifest["data"]["nfiles"] == n_files
    assert (ws / "results/localize/boxes.csv").read_bytes() == (path / "localize/boxes.csv").read_bytes()
    assert "/localized/" in (ws / ".gitignore").read_text().splitlines()
