"""The built-in synthetic data set: classes, machines, labels, planted bad files, determinism (real files, no mocks)."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tasks.config import ValidateParams
from tasks.datasets import ImageDecodeError, decode, discover
from tasks.quality import image_stats
from tasks.synthetic import CLASSES, SynthReport, class_counts, generate

N = 120
EXPECTED_CLASSES = {"defect-free", "crack", "chip-out", "void", "scratch", "particle", "discoloration"}
MACHINE_SPECS = {  # folder -> (format, mode, side)
    "machine-a": ("PNG", "L", 96),
    "machine-b": ("PNG", "I;16", 128),
    "machine-c": ("JPEG", "RGB", 80),
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthReport:
    return generate(tmp_path_factory.mktemp("synth") / "data", n=N, seed=0)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _labels(out: Path) -> dict[str, str]:
    return {r["path"]: r["label"] for r in _rows(out / "labels.csv")}


def _planted(out: Path) -> dict[str, str]:
    return {r["path"]: r["kind"] for r in _rows(out / "planted.csv")}


def _sharpness(path: Path) -> float:
    """What the validate stage measures (its own function, not a copy)."""
    return float(image_stats(path.parent, path.name, ValidateParams().max_pixels)["sharpness"])


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_class_set_and_long_tail(synth: SynthReport) -> None:
    labels = _labels(synth.out)
    assert set(CLASSES) == EXPECTED_CLASSES
    assert set(synth.class_counts) == EXPECTED_CLASSES == set(labels.values())
    assert Counter(labels.values()) == synth.class_counts
    assert sum(synth.class_counts.values()) == N == synth.n_images
    assert min(synth.class_counts.values()) >= 3
    assert max(synth.class_counts, key=synth.class_counts.__getitem__) == "defect-free"
    assert min(synth.class_counts, key=synth.class_counts.__getitem__) == "chip-out"
    assert synth.class_counts["chip-out"] * 10 <= synth.class_counts["defect-free"]
    # at full size the tail is long: the rarest class at most 1/20 of the largest (deterministic counts)
    for n in (300, 1000, 2000, 5000, 20000):
        counts = class_counts(n)
        assert sum(counts.values()) == n
        assert min(counts.values()) * 20 <= max(counts.values())
    assert class_counts(2000) == class_counts(2000)


def test_every_class_has_three_images_at_the_smallest_size() -> None:
    for n in range(50, 300):
        counts = class_counts(n)
        assert sum(counts.values()) == n and min(counts.values()) >= 3, n


def test_machines_have_their_own_size_mode_and_format(synth: SynthReport) -> None:
    planted = _planted(synth.out)
    folders = sorted(p.name for p in synth.out.iterdir() if p.is_dir())
    assert folders == sorted(MACHINE_SPECS)
    for folder, (fmt, mode, side) in MACHINE_SPECS.items():
        files = sorted((synth.out / folder).iterdir())
        assert files, folder
        for path in files:
            rel = path.relative_to(synth.out).as_posix()
            if planted.get(rel) == "corrupt":
                continue
            with Image.open(path) as img:
                assert (img.format, img.mode, img.size) == (fmt, mode, (side, side)), rel


def test_labels_cover_every_image_and_names_hide_the_label(synth: SynthReport) -> None:
    found = discover(synth.out)
    labels = _labels(synth.out)
    assert sorted(labels) == found.images
    assert len(found.images) == synth.n_images
    assert found.ignored == ["README.txt", "labels.csv", "planted.csv"]
    for rel in found.images:
        assert re.fullmatch(r"machine-[abc]/img-\d{6}\.(png|jpg)", rel), rel
    readme = (synth.out / "README.txt").read_text()
    assert "seed: 0" in readme and f"n: {N}" in readme and "chip-out" in readme and "machine-c" in readme


def test_planted_files_behave_as_promised(synth: SynthReport) -> None:
    planted = _planted(synth.out)
    labels = _labels(synth.out)
    assert sorted(planted.items()) == synth.planted
    assert set(planted.values()) == {"corrupt", "blank", "blurred", "duplicate"}
    assert set(planted) <= set(labels)
    hashes = _hashes(synth.out)
    for rel, kind in planted.items():
        path = synth.out / rel
        if kind == "corrupt":
            with pytest.raises(ImageDecodeError):
                decode(path)
        elif kind == "blank":
            grey, _ = decode(path)
            assert grey.std() == 0.0, rel
        elif kind == "blurred":
            grey, _ = decode(path)
            assert _sharpness(path) < ValidateParams().min_sharpness, rel
            assert grey.std() > 2.0, rel  # blurred, not blank
        elif kind == "duplicate":
            twins = [p for p, h in hashes.items() if h == hashes[rel] and p != rel]
            assert twins and all(p not in planted and labels[p] == labels[rel] for p in twins), rel
            assert min(twins) < rel  # the copy sorts after its original


def test_normal_images_are_sharp_and_have_contrast(synth: SynthReport) -> None:
    planted = _planted(synth.out)
    seen = set()
    for rel, label in _labels(synth.out).items():
        if rel in planted:
            continue
        grey, _ = decode(synth.out / rel)
        assert grey.std() > 3.0, rel
        assert _sharpness(synth.out / rel) > 5.0, rel
        seen.add((rel.split("/")[0], label))
    assert {m for m, _ in seen} == set(MACHINE_SPECS)


def test_same_seed_same_bytes_other_seed_other_bytes(synth: SynthReport, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", n=N, seed=0)
    assert _hashes(again.out) == _hashes(synth.out)
    assert again.planted == synth.planted
    other = generate(tmp_path / "other", n=N, seed=1)
    a, b = _hashes(synth.out), _hashes(other.out)
    assert a != b
    assert a["labels.csv"] != b["labels.csv"]
    assert sum(a.get(k) == v for k, v in b.items() if k.endswith((".png", ".jpg"))) == 0


def test_refuses_a_non_empty_folder_but_fills_an_empty_one(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("someone's data")
    with pytest.raises(FileExistsError):
        generate(full, n=50)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    report = generate(empty, n=50, seed=3)
    assert len(discover(empty).images) == report.n_images == 50
    assert set(report.class_counts) == EXPECTED_CLASSES


def test_too_few_images_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 50"):
        generate(tmp_path / "small", n=49)
    assert not (tmp_path / "small").exists()
