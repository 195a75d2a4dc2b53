"""A corpus of bad and unusual image files mixed into good ones: the run completes, nothing is lost.

Broken files, exact and near duplicates end in quarantine.csv with a specific reason; unusual but valid files
(16-bit, CMYK, palette with transparency, animated GIF, EXIF-rotated) are decoded and labelled like any other image.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.flow


def _texture(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(100, 30, (size, size))
    base[size // 3 : size // 2, size // 4 : 3 * size // 4] += 80  # a "defect"
    return np.clip(base, 0, 255).astype(np.uint8)


def build_corpus(root: Path, outside: Path) -> tuple[dict[str, str], set[str]]:
    """Write the corpus; return {bad file: expected reason fragment} and the set of unusual-but-valid files."""
    from tasks.synthetic import generate

    generate(root / "good", n=60, seed=11)
    (root / "good" / "labels.csv").unlink()
    bad: dict[str, str] = {}
    odd: set[str] = set()
    d = root / "odd"
    d.mkdir()

    def png_bytes(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **kw)
        return buf.getvalue()

    (d / "zero.png").write_bytes(b"")
    bad["odd/zero.png"] = "zero-byte"
    (d / "truncated.png").write_bytes(png_bytes(_texture(1))[:400])
    bad["odd/truncated.png"] = "unreadable"
    (d / "truncated.jpg").write_bytes(png_bytes(_texture(2), "JPEG")[:600])
    bad["odd/truncated.jpg"] = "unreadable"
    (d / "text.png").write_text("this is not an image\n")
    bad["odd/text.png"] = "not an image"
    Image.new("1", (30000, 30000)).save(d / "bomb.png")
    bad["odd/bomb.png"] = "decompression bomb"  # refused before decoding (30000x30000 declared)
    Image.fromarray(_texture(3)[:1, :1]).save(d / "onepixel.png")
    bad["odd/onepixel.png"] = "too small"
    Image.fromarray(np.tile(_texture(4), (1, 12))[:20]).save(d / "wide.png")
    bad["odd/wide.png"] = "aspect"
    Image.new("L", (96, 96), 128).save(d / "blank.png")
    bad["odd/blank.png"] = "blank"
    first_good = sorted((root / "good").rglob("*.png"))[0]
    (d / "zz-copy.png").write_bytes(first_good.read_bytes())
    bad["odd/zz-copy.png"] = "duplicate of good/"
    # near copies of the most contrasted good image: other bytes and pixels, the same picture
    planted = {r["path"] for r in csv.DictReader(open(root / "good/planted.csv"))}
    candidates = [
        p for p in sorted((root / "good").rglob("*.png")) if p.relative_to(root / "good").as_posix() not in planted
    ]
    source = max(candidates, key=lambda p: np.asarray(Image.open(p).convert("L"), dtype=np.float64).std())
    grey = np.asarray(Image.open(source).convert("L"), dtype=np.float64)
    near = f"near-duplicate of {source.relative_to(root).as_posix()}"
    Image.fromarray(np.clip(grey + 12, 0, 255).astype(np.uint8)).save(d / "zz-brighter.png")
    bad["odd/zz-brighter.png"] = near
    noisy = np.clip(grey + np.random.default_rng(0).normal(0, 1.5, grey.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(d / "zz-reencoded.jpg", quality=92)
    bad["odd/zz-reencoded.jpg"] = "near-duplicate of "  # of the source or of the brighter copy: both are near it
    secret = outside / "secret.png"
    Image.fromarray(_texture(5)).save(secret)
    os.symlink(secret, d / "escape.png")
    bad["odd/escape.png"] = "symlink pointing outside"
    os.symlink(d / "gone.png", d / "dangling.png")  # its target was deleted
    bad["odd/dangling.png"] = "broken symlink"
    locked = d / "locked.png"
    locked.write_bytes(png_bytes(_texture(14)))
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads any file: nothing to refuse there
        locked.unlink()
    else:
        bad["odd/locked.png"] = "unreadable file (permission denied)"
    raw_name = os.fsencode(str(d)) + b"/caf\xe9.png"  # Latin-1 byte: not UTF-8
    with open(raw_name, "wb") as fh:
        fh.write(png_bytes(_texture(6)))
    bad["odd/caf\ufffd.png"] = "not valid UTF-8"

    Image.fromarray(_texture(7).astype(np.uint16) * 257).save(d / "sixteen.png")
    Image.fromarray(np.stack([_texture(8)] * 3, -1)).convert("CMYK").save(d / "cmyk.jpg")
    pal = Image.fromarray(_texture(9)).convert("P")
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    frames = [Image.fromarray(_texture(10 + i)) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°
    Image.fromarray(_texture(13)[:, :80]).save(d / "rotated.jpg", exif=exif)
    odd |= {"odd/sixteen.png", "odd/cmyk.jpg", "odd/palette.png", "odd/animated.gif", "odd/rotated.jpg"}
    return bad, odd


def test_bad_files_are_quarantined_and_good_ones_labelled(prefect_engine, fast_overrides, tmp_path):
    from flows.retrain import retrain

    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    bad, odd = build_corpus(images, outside)
    assert len(bad) + len(odd) >= 15
    path = Path(
        retrain(
            images=str(images),
            workspace=str(tmp_path / "ws"),
            overrides=[*fast_overrides, "validate.max_fail_share=0.5"],
        )
    )
    with open(tmp_path / "ws/results/validate/quarantine.csv", newline="") as fh:
        reasons = {r["image"]: r["reason"] for r in csv.DictReader(fh)}
    for image, fragment in bad.items():
        assert image in reasons, (image, sorted(reasons))
        assert fragment in reasons[image], (image, reasons[image])
    with open(path / "labels.csv", newline="") as fh:
        labelled = {r["image"] for r in csv.DictReader(fh)}
    assert odd <= labelled
    good = {p.relative_to(images).as_posix() for p in (images / "good").rglob("*") if p.suffix in (".png", ".jpg")}
    planted = {r["path"] for r in csv.DictReader(open(images / "good/planted.csv"))}
    assert {f"good/{p}" for p in planted} <= set(reasons)  # the generator's own bad files
    assert good - {f"good/{p}" for p in planted} <= labelled  # every good image has a label
    assert not set(reasons) & labelled
    assert not (tmp_path / "ws/data/images/odd/escape.png").exists()  # the link target was never copied
