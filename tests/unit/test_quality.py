"""The validate stage on real files and a real Great Expectations run: every bad image gets its specific reason."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image, features
from scipy import ndimage

from tasks import quality
from tasks.config import ValidateParams
from tasks.datasets import ImageDecodeError, decode, discover
from tasks.quality import (
    IMAGE_STAT_COLUMNS,
    STAT_COLUMNS,
    compute_stats,
    image_stats,
    laplacian_variance,
    near_duplicates,
    perceptual_hash,
    perceptual_hashes,
    suite_digest,
    suite_path,
    validate_stats,
)

# min_sharpness: the default 2.0 only catches a defocus as heavy as the synthetic generator's, so the sigma-8 blur
# here (a 128 px image: measured at full size) is caught with a realistic threshold; sharp textures here score > 40.
PARAMS = ValidateParams(min_sharpness=10.0)
DUP_SOURCE = "good/noise-l.png"

# image -> the exact quarantine reason (a compiled pattern where the number depends on the decoder)
EXPECTED = {
    "bad/empty.png": "unreadable: zero-byte file",
    "bad/truncated.png": "unreadable: truncated image",
    "bad/not-an-image.png": "unreadable: not an image (unidentified format)",
    "bad/bomb-9000.png": "unreadable: too many pixels: 9000x9000 > 50000000",
    "bad/bomb-20000.png": re.compile(r"unreadable: decompression bomb: .*\(400000000 pixels\).*"),
    "bad/blank.png": "blank: contrast 0.00 < 2.0",
    "bad/blurred.png": re.compile(r"blurred: sharpness \d\.\d\d < 10\.0"),
    "bad/tiny-4x4.png": "too small: 4x4 px (min side 16)",
    "bad/strip-2000x20.png": "extreme aspect ratio: 100.0 > 10.0 (2000x20 px)",
    "bad/disguised-pcx.png": "unsupported format: PCX",
    "z-dups/noise-l-copy.png": f"duplicate of {DUP_SOURCE}",
    "z-dups/noise-l-reencoded.bmp": f"duplicate of {DUP_SOURCE}",
    # near copies: other pixels, same picture (the noisy one may name either earlier copy: both are near it)
    "z-near/noise-l-brighter.png": re.compile(
        rf"near-duplicate of {DUP_SOURCE} \(thumbnail correlation (0\.99\d\d|1\.0000) >= 0\.99\)"
    ),
    "z-near/noise-l-noisy.png": re.compile(
        rf"near-duplicate of ({DUP_SOURCE}|z-near/noise-l-brighter\.png) \(thumbnail correlation 0\.99\d\d >= 0\.99\)"
    ),
    "z-near/noise-l-q90.jpg": re.compile(
        rf"near-duplicate of ({DUP_SOURCE}|z-near/noise-l-brighter\.png) \(thumbnail correlation 0\.99\d\d >= 0\.99\)"
    ),
}
UNREADABLE = {k for k, v in EXPECTED.items() if getattr(v, "pattern", v).startswith("unreadable")}


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _bomb_png(path: Path, side: int) -> None:
    """A valid 1-bit PNG of side x side black pixels, streamed: a few KB on disk, side**2 pixels when decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows_per_block = 512
    block = (b"\x00" + bytes((side + 7) // 8)) * rows_per_block
    comp = zlib.compressobj(9)
    idat = []
    for start in range(0, side, rows_per_block):
        n = min(rows_per_block, side - start)
        idat.append(comp.compress(block if n == rows_per_block else block[: n * (len(block) // rows_per_block)]))
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b""))


def _build(root: Path) -> list[str]:
    """Write the good and bad images; returns the good ones."""
    rng = np.random.default_rng(7)
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / "z-dups").mkdir()
    (root / "z-near").mkdir()
    good = {
        "good/noise-l.png": lambda p: Image.fromarray(_noise(rng, (64, 64))).save(p),
        "good/noise-rgb.jpg": lambda p: Image.fromarray(_noise(rng, (80, 96, 3))).save(p, quality=90),
        "good/noise-16bit.png": lambda p: Image.fromarray(rng.integers(0, 65536, (40, 48)).astype(np.uint16)).save(p),
        "good/noise-rgba.png": lambda p: Image.fromarray(_noise(rng, (50, 60, 4))).save(p),
        "good/palette-trns.png": lambda p: (
            Image.fromarray(_noise(rng, (50, 70, 3))).quantize(64).save(p, transparency=0)
        ),
        "good/anim.gif": lambda p: (
            Image.fromarray(_noise(rng, (60, 60)))
            .convert("P")
            .save(p, save_all=True, append_images=[Image.fromarray(_noise(rng, (60, 60))).convert("P")])
        ),
        "good/noise-cmyk.jpg": lambda p: Image.fromarray(_noise(rng, (70, 70, 4)), "CMYK").save(p),
        "good/noise.tif": lambda p: Image.fromarray(_noise(rng, (33, 90))).save(p),
        "good/noise.bmp": lambda p: Image.fromarray(_noise(rng, (45, 45, 3))).save(p),
        "good/edge-16x16.png": lambda p: Image.fromarray(_noise(rng, (16, 16))).save(p),  # min_side exactly
    }
    if features.check("webp"):
        good["good/noise.webp"] = lambda p: Image.fromarray(_noise(rng, (64, 80, 3))).save(p, lossless=True)
    for rel, write in good.items():
        write(root / rel)

    (root / "bad/empty.png").write_bytes(b"")
    png = (root / DUP_SOURCE).read_bytes()
    (root / "bad/truncated.png").write_bytes(png[: len(png) // 2])
    (root / "bad/not-an-image.png").write_text("defect list: none\n")
    _bomb_png(root / "bad/bomb-9000.png", 9000)  # 81 Mpx: over max_pixels, under Pillow's own bomb limit
    _bomb_png(root / "bad/bomb-20000.png", 20000)  # 400 Mpx: Pillow itself refuses it when reading the header
    Image.new("L", (100, 100), 128).save(root / "bad/blank.png")
    blurred = ndimage.gaussian_filter(_noise(rng, (128, 128)).astype(np.float64), 8)
    blurred = (blurred - blurred.min()) / (blurred.max() - blurred.min()) * 255  # clearly not blank
    Image.fromarray(np.rint(blurred).astype(np.uint8)).save(root / "bad/blurred.png")
    Image.fromarray(_noise(rng, (4, 4))).save(root / "bad/tiny-4x4.png")
    Image.fromarray(_noise(rng, (20, 2000))).save(root / "bad/strip-2000x20.png")
    Image.fromarray(_noise(rng, (40, 40))).save(root / "bad/disguised-pcx.png", format="PCX")
    shutil.copyfile(root / DUP_SOURCE, root / "z-dups/noise-l-copy.png")
    Image.open(root / DUP_SOURCE).save(root / "z-dups/noise-l-reencoded.bmp")
    source = np.asarray(Image.open(root / DUP_SOURCE), dtype=np.float64)
    Image.fromarray(np.rint(source * 0.9 + 12).astype(np.uint8)).save(root / "z-near/noise-l-brighter.png")
    noisy = np.clip(np.rint(source + rng.normal(0, 3, source.shape)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(root / "z-near/noise-l-noisy.png")
    Image.open(root / DUP_SOURCE).save(root / "z-near/noise-l-q90.jpg", quality=90)
    return sorted(good)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good = _build(root)
    images = sorted(good + list(EXPECTED), reverse=True)  # input order != sorted order on purpose
    return root, good, images


@pytest.fixture(scope="module")
def stats(folder):
    root, _, images = folder
    return compute_stats(root, images, PARAMS.max_pixels)


@pytest.fixture(scope="module")
def result(stats):
    return validate_stats(stats, PARAMS)


def _row(stats: pd.DataFrame, image: str) -> pd.Series:
    return stats.set_index("image").loc[image]


def test_stats_table(folder, stats):
    root, good, images = folder
    assert list(stats.columns) == STAT_COLUMNS
    assert list(stats["image"]) == images
    assert stats.loc[stats["readable"], "error"].eq("").all()
    assert set(stats.loc[~stats["readable"], "image"]) == UNREADABLE

    empty = _row(stats, "bad/empty.png")
    assert empty["error"] == "zero-byte file" and empty["file_sha256"] == hashlib.sha256(b"").hexdigest()
    for col in ("sharpness", "brightness", "contrast", "aspect", "width", "height"):
        assert pd.isna(empty[col]), col
    assert pd.isna(empty["pixel_hash"]) and pd.isna(empty["duplicate_of"])

    assert _row(stats, "good/anim.gif")["frames"] == 2  # animated GIFs are kept (first frame)
    assert _row(stats, "good/noise-16bit.png")["mode"].startswith("I")
    assert _row(stats, "good/noise-16bit.png")["contrast"] > 40  # 16-bit scaled to the 8-bit range
    assert _row(stats, "good/palette-trns.png")["mode"] == "P"
    strip = _row(stats, "bad/strip-2000x20.png")
    assert (strip["width"], strip["height"], strip["aspect"]) == (2000, 20, 100.0)
    blank = _row(stats, "bad/blank.png")
    assert (blank["brightness"], blank["contrast"], blank["sharpness"]) == (128.0, 0.0, 0.0)
    assert _row(stats, "bad/blurred.png")["sharpness"] < 10 < stats.set_index("image").loc[good, "sharpness"].min()

    source, copy, reencoded = (_row(stats, k) for k in (DUP_SOURCE, *[k for k in EXPECTED if k.startswith("z-dups")]))
    assert source["pixel_hash"] == copy["pixel_hash"] == reencoded["pixel_hash"]
    assert source["file_sha256"] == copy["file_sha256"] != reencoded["file_sha256"]
    assert source["file_sha256"] == hashlib.sha256((root / DUP_SOURCE).read_bytes()).hexdigest()
    assert source["duplicate_of"] is None
    assert copy["duplicate_of"] == reencoded["duplicate_of"] == DUP_SOURCE
    assert stats["duplicate_of"].notna().sum() == 2
    # near duplicates: a close perceptual hash, and thumbnails that correlate almost perfectly
    near = stats[stats["image"].str.startswith("z-near/")]
    assert near["similar_to"].notna().all() and (near["similarity"] >= 0.99).all()
    assert all(bin(int(h, 16) ^ int(source["phash"], 16)).count("1") <= 10 for h in near["phash"])
    others = stats[stats["similar_to"].notna() & ~stats["image"].str.startswith("z-near/")]
    assert (others["similarity"] < 0.5).all(), others  # unrelated noise images may be hash candidates, never similar
    assert pd.isna(copy["similar_to"]) and pd.isna(reencoded["similar_to"])  # exact duplicates are not searched


def test_every_bad_image_is_quarantined_with_its_specific_reason(result):
    reasons = dict(zip(result.quarantine["image"], result.quarantine["reason"], strict=True))
    assert set(reasons) == set(EXPECTED)
    for image, expected in EXPECTED.items():
        if isinstance(expected, re.Pattern):
            assert expected.fullmatch(reasons[image]), (image, reasons[image])
        else:
            assert reasons[image] == expected, image
    assert list(result.quarantine.columns) == ["image", "reason"]


def test_good_images_pass_in_input_order(folder, result):
    _, good, images = folder
    assert result.passed == [i for i in images if i in set(good)]
    assert list(result.quarantine["image"]) == [i for i in images if i in EXPECTED]  # input order too


def test_summary(folder, result):
    _, good, images = folder
    s = result.summary
    assert (s["n_images"], s["n_passed"], s["n_quarantined"]) == (len(images), len(good), len(EXPECTED))
    assert s["fail_share"] == pytest.approx(len(EXPECTED) / len(images))
    assert s["success"] is False and result.gx_result["success"] is False
    assert s["suite"] == "image_quality" and s["suite_sha256"] == suite_digest("image_quality")
    # GX's own per-expectation counts: the blank image fails sharpness too (its reason only says "blank"), the
    # 4x4 one fails width and height (measured at its own size, its noise is sharp).
    assert s["expectations"] == {
        "readable": len(UNREADABLE),
        "duplicate": 2,
        "format": 1,
        "width": 1,
        "height": 1,
        "aspect": 1,
        "contrast": 1,
        "sharpness": 2,
        "near_duplicate": 3,
    }
    assert s["reasons"] == {
        "unreadable": len(UNREADABLE),
        "duplicate": 2,
        "unsupported format": 1,
        "too small": 1,
        "extreme aspect ratio": 1,
        "blank": 1,
        "blurred": 1,
        "near-duplicate": 3,
    }
    json.dumps(s)  # goes into metrics.json as it is
    json.dumps(result.gx_result)


def test_gx_reports_the_failing_rows(result):
    by_check = {r["expectation_config"]["meta"]["check"]: r for r in result.gx_result["results"]}
    contrast = by_check["contrast"]
    assert contrast["expectation_config"]["kwargs"]["min_value"] == 2.0  # the $PARAMETER, filled from params
    assert [row["image"] for row in contrast["result"]["unexpected_index_list"]] == ["bad/blank.png"]
    assert by_check["readable"]["result"]["element_count"] == len(result.passed) + len(result.quarantine)
    # the numeric expectations only see readable rows: the five unreadable images are not "missing" values there
    assert by_check["sharpness"]["result"]["element_count"] == by_check["readable"]["result"]["element_count"] - len(
        UNREADABLE
    )


def test_bomb_is_refused_before_decoding(folder):
    root, _, _ = folder
    assert (root / "bad/bomb-9000.png").stat().st_size < 50_000
    tracemalloc.start()
    try:
        row = image_stats(root, "bad/bomb-9000.png", PARAMS.max_pixels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert row["readable"] is False and row["error"] == "too many pixels: 9000x9000 > 50000000"
    assert peak < 5_000_000  # 81 Mpx were never decoded into an array
    assert set(row) == set(IMAGE_STAT_COLUMNS) and math.isnan(row["contrast"])
    # and it is a valid PNG of 81 Mpx (decoding it takes ~160 MB: measured once, not repeated here)
    with Image.open(root / "bad/bomb-9000.png") as img:
        img.verify()
        assert img.size == (9000, 9000)


def test_one_read_sees_what_the_project_decoder_sees(folder, stats, tmp_path):
    """The stats read each file once (sha256 and pixels from the same bytes) and decode it themselves: they must see
    the pixels ``tasks.datasets.decode`` gives every other stage, fail with its reasons, and apply EXIF rotation."""
    root, _, images = folder
    rng = np.random.default_rng(11)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.fromarray(_noise(rng, (30, 50, 3))).save(tmp_path / "rotated.jpg", exif=exif)
    Image.fromarray(_noise(rng, (30, 50))).save(tmp_path / "rotated.png", exif=exif)
    Image.fromarray(_noise(rng, (30, 50))).save(tmp_path / "rotated.tif", exif=exif)
    by_image = stats.set_index("image")
    for base, rels in ((root, images), (tmp_path, ["rotated.jpg", "rotated.png", "rotated.tif"])):
        for rel in rels:
            row = image_stats(base, rel, PARAMS.max_pixels)
            if base == root:  # the table's rows are image_stats' rows (phash computed for all at once)
                assert {k: _native(v) for k, v in by_image.loc[rel].items() if k in row} == {
                    k: _native(v) for k, v in row.items() if k != "image"
                }, rel
            try:
                grey, info = decode(base / rel, PARAMS.max_pixels)
            except ImageDecodeError as exc:
                assert (row["readable"], row["error"]) == (False, exc.reason), rel
                continue
            h, w = grey.shape
            assert row["pixel_hash"] == hashlib.sha256(f"{h}x{w}:".encode() + grey.tobytes()).hexdigest(), rel
            assert [row[k] for k in ("format", "mode", "width", "height", "frames")] == [info[k] for k in info], rel
            assert row["file_sha256"] == hashlib.sha256((base / rel).read_bytes()).hexdigest()
            if rel in ("rotated.jpg", "rotated.png"):  # (a TIFF's orientation is Pillow's affair: equal is enough)
                assert (h, w, row["aspect"]) == (50, 30, 50 / 30), rel


def _native(value: object) -> object:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA else value


def test_16_bit_images_get_to_grey_u8s_pixels():
    """16-bit images are scaled by their range with a lookup table (small range) or per pixel (large range): both
    must give the bytes of ``tasks.datasets.to_grey_u8``, little- and big-endian."""
    from tasks.datasets import to_grey_u8
    from tasks.quality import _grey_image

    rng = np.random.default_rng(1)
    for shape in [(37, 53), (300, 300)]:
        for lo, hi in [(0, 65535), (100, 101), (5, 5), (0, 1), (1000, 40000), (65535, 65535), (0, 255)]:
            a = rng.integers(lo, hi + 1, shape).astype(np.uint16)
            little = Image.fromarray(a)
            big = Image.frombytes("I;16B", little.size, a.astype(">u2").tobytes())
            for img in (little, big):
                grey = _grey_image(img)
                assert grey.mode == "L" and np.array_equal(np.asarray(grey), to_grey_u8(img)), (img.mode, lo, hi)


def test_perceptual_hashes_at_once_are_the_one_by_one_hashes():
    from scipy.fft import dctn

    def one(thumb: np.ndarray) -> int:  # the definition: DCT of one thumbnail, compared with np.median
        coef = dctn(thumb.astype(np.float64), norm="ortho")[:8, :8].ravel()
        return int.from_bytes(np.packbits(coef > np.median(coef)).tobytes(), "big")

    rng = np.random.default_rng(5)
    thumbs = rng.integers(0, 256, (300, 32, 32), dtype=np.uint8)
    thumbs[0] = 7  # flat: every AC coefficient is rounding noise, the bits must still agree
    thumbs[1] = np.arange(32, dtype=np.uint8)[None, :] * 8
    expected = [one(t) for t in thumbs]
    assert perceptual_hashes(thumbs).tolist() == expected
    assert [perceptual_hash(t) for t in thumbs[:20]] == expected[:20]
    assert perceptual_hashes(thumbs[:0]).shape == (0,)


def test_laplacian_variance_is_scipys():
    rng = np.random.default_rng(3)
    for shape in [(128, 128), (128, 37), (1, 128), (128, 1), (1, 1), (2, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        assert laplacian_variance(img) == pytest.approx(ndimage.laplace(img.astype(np.float64)).var(), rel=1e-12)
        lap = ndimage.laplace(img.astype(np.int64)).ravel().tolist()  # exact integers: the variance, exactly
        n, s1, s2 = len(lap), sum(lap), sum(v * v for v in lap)
        assert s1 == 0 and laplacian_variance(img) == (s2 * n - s1 * s1) / (n * n)


def test_workers_give_the_same_table(folder, stats):
    root, _, images = folder
    for workers in (1, 3):  # the fixture used the default (DEFAULT_WORKERS threads)
        pd.testing.assert_frame_equal(compute_stats(root, images, PARAMS.max_pixels, workers=workers), stats)


@pytest.mark.skipif(not quality.FORK_WORKERS, reason="worker processes are forked on Linux only")
def test_worker_processes_give_the_same_table(folder, stats, monkeypatch):
    """Chunks of 3 images on 2 forked processes: the unreadable, bomb, duplicate and 16-bit rows come back the same."""
    root, _, images = folder
    monkeypatch.setattr(quality, "STATS_CHUNK", 3)
    pd.testing.assert_frame_equal(compute_stats(root, images, PARAMS.max_pixels, workers=2), stats)


@pytest.mark.skipif(not quality.FORK_WORKERS, reason="worker processes are forked on Linux only")
def test_a_killed_worker_process_loses_no_image(tmp_path, caplog):
    """A worker killed mid-stage (a decoder crash, the OOM killer): its images are measured again, none is lost."""
    rng = np.random.default_rng(3)
    images = [f"img-{i:04d}.png" for i in range(1500)]
    for rel in images:
        Image.fromarray(_noise(rng, (48, 48))).save(tmp_path / rel)
    killed: list[int] = []
    others = {child.pid for child in psutil.Process().children()}  # e.g. an earlier test's Prefect server

    def kill_first_worker() -> None:
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for child in psutil.Process().children():
                if child.pid not in others:
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    return
            time.sleep(0.001)

    watcher = threading.Thread(target=kill_first_worker)
    logger = logging.getLogger("autolabel")  # Prefect may have stopped it propagating to the root logger
    logger.addHandler(caplog.handler)
    watcher.start()
    try:
        with caplog.at_level("WARNING", logger="autolabel"):
            table = compute_stats(tmp_path, images, PARAMS.max_pixels, workers=2)
    finally:
        logger.removeHandler(caplog.handler)
        watcher.join()
    assert killed, "no worker process was seen"
    assert "a stats worker process failed" in caplog.text
    pd.testing.assert_frame_equal(table, compute_stats(tmp_path, images, PARAMS.max_pixels, workers=1))


def test_bomb_warning_is_an_error_in_every_thread(tmp_path):
    """Between Pillow's warning and error limits a bomb is refused by the warning turned into an error; with threads
    the filter is set once for all of them, so no thread decodes a bomb because another one restored the filters."""
    side = 10_000  # 100 Mpx: above Image.MAX_IMAGE_PIXELS (89 Mpx), below twice it (Pillow's own error)
    assert Image.MAX_IMAGE_PIXELS < side * side < 2 * Image.MAX_IMAGE_PIXELS
    _bomb_png(tmp_path / "bomb-0.png", side)
    images = [f"bomb-{i}.png" for i in range(12)]
    for rel in images[1:]:
        shutil.copyfile(tmp_path / "bomb-0.png", tmp_path / rel)
    table = compute_stats(tmp_path, images, side * side * 2, workers=4)
    assert (~table["readable"]).all() and table["error"].str.startswith("decompression bomb: ").all(), table["error"]
    assert image_stats(tmp_path, images[0], side * side * 2)["error"].startswith("decompression bomb: ")


def test_thresholds_come_from_params(stats):
    loose = validate_stats(stats, PARAMS.model_copy(update={"min_sharpness": 1.0}))
    assert "bad/blurred.png" in loose.passed
    strict = validate_stats(
        stats, PARAMS.model_copy(update={"max_side": 90, "formats": ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "PCX"]})
    )
    reasons = dict(zip(strict.quarantine["image"], strict.quarantine["reason"], strict=True))
    assert reasons["good/noise-rgb.jpg"] == "too large: 96x80 px (max side 90)"
    assert reasons["good/anim.gif"] == "unsupported format: GIF"
    assert "bad/disguised-pcx.png" in strict.passed
    assert (
        reasons["bad/strip-2000x20.png"]
        == "too large: 2000x20 px (max side 90); extreme aspect ratio: 100.0 > 10.0 (2000x20 px)"
    )


def test_suite_file_and_digest(tmp_path, stats):
    path = suite_path("image_quality")
    suite = json.loads(path.read_text())
    assert suite["name"] == "image_quality"
    thresholds = {
        k: v
        for e in suite["expectations"]
        for k, v in e["kwargs"].items()
        if k in ("min_value", "max_value", "value_set")
    }
    assert all(isinstance(v, dict) and "$PARAMETER" in v for k, v in thresholds.items() if k != "value_set")
    assert all(e["meta"].get("check") and e["meta"].get("reason") for e in suite["expectations"])
    assert suite_digest("image_quality") == hashlib.sha256(path.read_bytes()).hexdigest()

    copy = tmp_path / "suites"
    copy.mkdir()
    shutil.copy(path, copy / "image_quality.json")
    assert suite_digest("image_quality", copy) == suite_digest("image_quality")
    suite["expectations"][6]["meta"]["reason"] = "no contrast ({contrast:.1f})"  # the blank-image check
    (copy / "image_quality.json").write_text(json.dumps(suite, indent=2))
    assert suite_digest("image_quality", copy) != suite_digest("image_quality")
    edited = validate_stats(stats, PARAMS, suites_dir=copy)
    assert edited.summary["suite_sha256"] == suite_digest("image_quality", copy)
    assert edited.quarantine.set_index("image").loc["bad/blank.png", "reason"] == "no contrast (0.0)"

    with pytest.raises(FileNotFoundError, match="nope"):
        suite_path("nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        validate_stats(stats, PARAMS.model_copy(update={"suite": "nope"}))
    suite["expectations"][0]["type"] = "expect_column_values_to_be_shiny"
    (copy / "broken.json").write_text(json.dumps(suite))
    with pytest.raises(ValueError, match="broken.json"):
        validate_stats(stats, PARAMS.model_copy(update={"suite": "broken"}), suites_dir=copy)


def test_no_images(tmp_path):
    stats = compute_stats(tmp_path, [], PARAMS.max_pixels)
    assert list(stats.columns) == STAT_COLUMNS and len(stats) == 0
    result = validate_stats(stats, PARAMS)
    assert result.passed == [] and len(result.quarantine) == 0
    assert (result.summary["n_images"], result.summary["fail_share"], result.summary["success"]) == (0, 0.0, True)


def test_near_duplicate_threshold_comes_from_params(stats):
    near = {k for k in EXPECTED if k.startswith("z-near/")}
    assert near <= set(validate_stats(stats, PARAMS).quarantine["image"])
    identical_only = validate_stats(stats, PARAMS.model_copy(update={"near_duplicate_similarity": 1.0}))
    assert near <= set(identical_only.passed)


def _reference_near_duplicates(hashes: np.ndarray, thumbs: np.ndarray, max_bits: int) -> tuple[list[int], list[float]]:
    """The definition, pair by pair: the most similar earlier image among those with a close hash."""
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    match, sims = [], []
    for i in range(len(hashes)):
        best, best_sim = -1, math.nan
        for j in range(i):
            if bin(int(hashes[i]) ^ int(hashes[j])).count("1") > max_bits:
                continue
            a, b = flat[i] - flat[i].mean(), flat[j] - flat[j].mean()
            denom = math.sqrt((a @ a) * (b @ b))
            sim = float(a @ b / denom) if denom > 1e-6 else 0.0
            if best < 0 or sim > best_sim + 1e-9:
                best, best_sim = j, sim
        match.append(best)
        sims.append(best_sim)
    return match, sims


def test_near_duplicate_search_is_exact():
    rng = np.random.default_rng(5)
    n = 400
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64)
    thumbs = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)
    thumbs[::7] = 128  # flat thumbnails: similarity 0, never a near duplicate
    for k in range(100, 400, 3):  # hashes a few bits from an earlier one, thumbnails copied with noise
        src = int(rng.integers(0, k))
        bits = rng.choice(64, int(rng.integers(0, 14)), replace=False)
        hashes[k] = hashes[src] ^ np.uint64(sum(1 << int(b) for b in bits))
        thumbs[k] = np.clip(thumbs[src] + rng.integers(-20, 21, (32, 32)), 0, 255)
    match, sims = near_duplicates(hashes, thumbs, max_bits=10, block=997)  # an odd block: several partial blocks
    ref_match, ref_sims = _reference_near_duplicates(hashes, thumbs, 10)
    assert list(match) == ref_match
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    assert (match >= 0).sum() > 50


def test_near_duplicate_search_on_20k_hashes_is_fast():
    import time

    rng = np.random.default_rng(6)
    n = 20_000
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64)
    thumbs = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)
    copies = np.sort(rng.choice(np.arange(n // 2, n), 200, replace=False))
    sources = rng.integers(0, n // 2, 200)  # never a copy itself
    hashes[copies] = hashes[sources] ^ np.uint64(0b1011)
    thumbs[copies] = np.clip(thumbs[sources].astype(int) + rng.integers(-3, 4, (200, 32, 32)), 0, 255)
    start = time.perf_counter()
    match, sims = near_duplicates(hashes, thumbs)
    seconds = time.perf_counter() - start
    print(f"near-duplicate search over {n} hashes: {seconds:.2f} s")
    assert seconds < 20  # ~1 s measured on 2 shared cores; n**2/2 popcounts, so 50k take ~7 s
    assert (sims[copies] >= 0.99).all()
    found = match[copies]
    assert ((found == sources) | np.isin(found, copies)).all()  # its source, or an earlier copy of the same source
    assert (np.nan_to_num(np.delete(sims, copies)) < 0.5).all()


def test_no_near_duplicates_among_distinct_synthetic_images(tmp_path):
    """Distinct captures of one defect class look alike; none may be taken for a near copy (0.99 is the margin:
    on 2,000 synthetic images the closest distinct pair correlates 0.98; on DeepPCB patches 26 of 8 million pairs
    reach 0.99, crops that are pixel-for-pixel the same pin-hole disk)."""
    from tasks.synthetic import generate

    generate(tmp_path / "s", n=400, seed=0)
    images = discover(tmp_path / "s").images
    result = validate_stats(compute_stats(tmp_path / "s", images, PARAMS.max_pixels), ValidateParams())
    assert not result.quarantine["reason"].str.contains("near-duplicate").any(), result.quarantine
