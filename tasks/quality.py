"""The validate stage: per-image stats, checked by a Great Expectations suite; failures are quarantined with a reason.

Each image's file is read once (its sha256 and its pixels come from the same bytes) and decoded once, to the
pixels ``tasks.datasets.decode`` gives the other stages (tested), into one row of stats. The table goes through the
GX suite kept in ``tasks/suites/<name>.json``, whose thresholds are suite parameters
(``{"$PARAMETER": "min_contrast"}``) filled from ``ValidateParams`` at run time. GX decides what fails; this module
only turns GX's unexpected rows into one human reason per image, using each expectation's ``meta``:

- ``check``: short name of the expectation (key of the per-expectation counts in the summary);
- ``reason``: a ``str.format`` template filled with the image's stats and the parameters, e.g.
  ``"blank: contrast {contrast:.2f} < {min_contrast}"``;
- ``reason_below`` / ``reason_above``: for ``expect_column_values_to_be_between``, the template used when the
  value is below ``min_value`` / above ``max_value`` (e.g. "too small" vs "too large");
- ``label``: category in the reasons histogram (default: the template's text before its first ``:`` or ``{``);
- ``suppressed_by``: checks whose failure makes this reason redundant for the same image (a blank image is
  trivially blurred: report only "blank"). The image still fails; only its reason text is shortened.

The numeric expectations carry ``row_condition`` ``readable == True``: an unreadable image gets exactly one
reason, ``unreadable: <decoder message>``, and no noise from its missing stats.

Duplicates: ``duplicate_of`` names the first image (sorted path order) with the same decoded pixels. Near
duplicates (a copy re-encoded, resized, brightness-shifted or slightly noised) are found in two steps: candidates
are the earlier images whose 64-bit perceptual hash (``phash``, DCT of a 32 px thumbnail) differs in at most
:data:`NEAR_HASH_BITS` bits; among them ``similar_to`` is the one whose 32 px thumbnail correlates best with the
image's, and ``similarity`` that correlation (Pearson, so brightness and gain shifts do not matter). The GX suite
decides: an image whose ``similarity`` reaches ``validate.near_duplicate_similarity`` is a near duplicate. The
hash alone is not enough: on AOI data many different images share most hash bits (binarised PCB patches that are
mostly flat), so the hash only narrows the search and the thumbnail correlation is what is thresholded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from tasks.config import ValidateParams
from tasks.datasets import ImageDecodeError, decode, open_image, to_grey_u8
from tasks.parallel import Mapper, spans

SUITES_DIR = Path(__file__).resolve().parent / "suites"
THUMB_SIDE = 128
"""The sharpness is measured on the grey image reduced so that its longest side is at most this (never enlarged:
see :func:`_sharpness`)."""
NEAR_THUMB_SIDE = 32  # near duplicates: the perceptual hash and the similarity are computed on this square thumbnail
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
"""Workers measuring images when the caller does not say (forked processes on Linux, else threads; see
:func:`_measure_in_workers`)."""
FORK_WORKERS = sys.platform.startswith("linux")
"""Measure in forked processes rather than threads. Measuring a small image is mostly Python (Pillow's PNG chunk
loop, the stats), which holds the GIL: two threads gained 1.0-1.3x over one on the 2k synthetic set, two forked
processes 1.9x (bench/RESULTS.md, Performance). A fork starts in ~10 ms with every module already imported. Linux
only: macOS's system libraries are not fork-safe, and Windows cannot fork."""
STATS_CHUNK = 64
"""Images per task sent to a worker process: small enough to balance two workers, large enough that the ~1 KB
result per image, not the task round trip, is the transfer cost."""
log = logging.getLogger("autolabel")
NEAR_HASH_BITS = 10
"""Near-duplicate search radius: only images whose perceptual hashes differ in at most this many of the 64 bits are
compared (a recall knob, not the decision: copies re-encoded as JPEG q75, noised or resized by 10 % stayed within
10 bits in 99.7-100 % of the cases measured on the synthetic set and on DeepPCB patches)."""

IMAGE_STAT_COLUMNS = [
    "image",
    "readable",
    "error",
    "format",
    "mode",
    "width",
    "height",
    "frames",
    "sharpness",
    "brightness",
    "contrast",
    "aspect",
    "pixel_hash",
    "phash",
    "file_sha256",
]
"""Keys of the dict returned by :func:`image_stats`."""

STAT_COLUMNS = [*IMAGE_STAT_COLUMNS, "duplicate_of", "similar_to", "similarity"]
"""Columns of the table returned by :func:`compute_stats` (in this order)."""

_DTYPES = {
    "readable": "bool",
    "width": "Int64",
    "height": "Int64",
    "frames": "Int64",
    "sharpness": "float64",
    "brightness": "float64",
    "contrast": "float64",
    "aspect": "float64",
}


# --------------------------------------------------------------------------------------------------- image stats


def _mean_std(hist: list[int]) -> tuple[float, float]:
    """Mean and (population) std of the grey levels from their 256-bin histogram (exact, no copy of the image)."""
    counts = np.asarray(hist, dtype=np.float64)
    levels = np.arange(256, dtype=np.float64)
    n = counts.sum()
    mean = float(counts @ levels / n)
    var = float(counts @ (levels - mean) ** 2 / n)
    return mean, math.sqrt(max(var, 0.0))


def laplacian_variance(img: np.ndarray) -> float:
    """``scipy.ndimage.laplace(img.astype(float)).var()`` for a 2-D integer image, computed exactly in integers.

    Same 5-point kernel and the same ``mode="reflect"`` border (the edge pixel repeated), several times faster than
    scipy on a 128 px thumbnail, which matters when the stage runs over many small images. With that border every
    neighbour difference is counted once with each sign, so the Laplacian sums to 0 and its variance is its mean
    square. For 8-bit images |Laplacian| <= 4 * 255 fits int16 (half the memory traffic); squares are summed in int64.
    """
    a = np.asarray(img)
    a = a.astype(np.int16 if a.dtype in (np.uint8, np.int8, np.bool_) else np.int64)
    lap = a * a.dtype.type(-4)
    lap[1:] += a[:-1]
    lap[:1] += a[:1]
    lap[:-1] += a[1:]
    lap[-1:] += a[-1:]
    lap[:, 1:] += a[:, :-1]
    lap[:, :1] += a[:, :1]
    lap[:, :-1] += a[:, 1:]
    lap[:, -1:] += a[:, -1:]
    flat = lap.reshape(-1)
    return int(np.einsum("i,i->", flat, flat, dtype=np.int64)) / flat.size


def _pixels(img: Image.Image) -> np.ndarray:
    """An "L" image's pixels as a read-only uint8 array (one ``tobytes`` copy; ``np.asarray`` costs more per call)."""
    return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, img.width)


def _sharpness(img: Image.Image, raw: bytes) -> float:
    """Variance of the Laplacian of the grey image, reduced (BILINEAR) to 128 px on its longest side when larger.

    A smaller image is measured as it is. Enlarging it first (as before 2026-12) invents no detail and acts as a
    low-pass filter: it divided a sharp 80-96 px image's value by 5-8 while a blurred one's barely moved, so the
    smaller a sharp image, the closer it came to the blur threshold. It was also a quarter of the stage's CPU on
    small images (bench/RESULTS.md, Performance). ``raw``: the image's ``tobytes()`` (the caller has them).
    """
    w, h = img.size
    if max(w, h) > THUMB_SIDE:
        scale = THUMB_SIDE / max(h, w)
        return laplacian_variance(
            _pixels(img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR))
        )
    return laplacian_variance(np.frombuffer(raw, dtype=np.uint8).reshape(h, w))


def _unreadable_row(rel: str, reason: str, file_sha: str | None) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(IMAGE_STAT_COLUMNS)
    row.update(image=rel, readable=False, error=reason, file_sha256=file_sha)
    for col in ("sharpness", "brightness", "contrast", "aspect"):
        row[col] = math.nan
    return row


def perceptual_hash(thumb: np.ndarray) -> int:
    """64-bit pHash of a square grey thumbnail: the 8x8 lowest DCT frequencies compared with their median."""
    return int(perceptual_hashes(np.asarray(thumb)[None])[0])


def perceptual_hashes(thumbs: np.ndarray) -> np.ndarray:
    """:func:`perceptual_hash` of ``(n, side, side)`` thumbnails in one DCT call (uint64; bit-identical to one
    call per thumbnail: the per-call overhead of ``dctn`` was a tenth of the stage on small images)."""
    from scipy.fft import dctn

    thumbs = np.asarray(thumbs)
    if not len(thumbs):
        return np.empty(0, dtype=np.uint64)
    coef = dctn(thumbs.astype(np.float64), axes=(1, 2), norm="ortho")[:, :8, :8].reshape(len(thumbs), 64)
    median = np.sort(coef, axis=1)[:, 31:33].mean(axis=1)  # np.median's value, without its overhead
    return np.packbits(coef > median[:, None], axis=1).view(">u8").ravel().astype(np.uint64)


def _grey_image(img: Image.Image) -> Image.Image:
    """:func:`tasks.datasets.to_grey_u8` as an "L" image: the same pixels, without a numpy round trip for the modes
    where it is ``img.convert("L")`` (or nothing, for "L")."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L"):
        # to_grey_u8's float64 scaling by the image's range (the same float64 operations, so the same bytes), done
        # once per level of the range (a lookup table) when the range is smaller than the image, else per pixel
        arr = np.asarray(img)
        lo, hi = int(arr.min()), int(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        if hi - lo + 1 > arr.size:
            return Image.fromarray(np.clip((arr.astype(np.float64) - lo) * scale, 0, 255).astype(np.uint8))
        lut = np.clip((np.arange(lo, hi + 1, dtype=np.float64) - lo) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(lut[arr - np.asarray(lo, dtype=arr.dtype)])
    if img.mode in ("I", "F", "RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        return Image.fromarray(to_grey_u8(img))
    return img.convert("L")


@contextmanager
def _bomb_warnings_are_errors() -> Iterator[None]:
    """Pillow's DecompressionBombWarning raised as an error (as ``tasks.datasets.decode`` does), set once around
    all the images: warnings filters are process-wide, so one ``catch_warnings`` per image in several threads would
    restore each other's filters in the middle of a decode (and a bomb's reason would depend on timing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def image_stats(root: Path, rel: str, max_pixels: int) -> dict[str, object]:
    """Decode ``root/rel`` once and measure it; an image that cannot be decoded still gets a row.

    Returns a dict with the keys of :data:`IMAGE_STAT_COLUMNS`: ``readable`` and ``error`` (the decoder's reason,
    ``""`` when readable); ``format``, ``mode``, ``width``, ``height``, ``frames`` as the file declares them;
    ``sharpness`` (variance of the Laplacian of the grey image, reduced to 128 px when larger; 0-255 scale),
    ``brightness`` (mean grey), ``contrast`` (std of grey), ``aspect`` (longest / shortest side); ``pixel_hash``
    (sha256 of the decoded grey pixels and their shape: the exact-duplicate key), ``phash`` (perceptual hash, 16 hex
    digits) and ``file_sha256`` (of the file's bytes). Unreadable images have NaN / None stats.
    """
    with _bomb_warnings_are_errors():
        row, thumb = _measure(str(root), rel, max_pixels)
    if thumb is not None:
        row["phash"] = f"{perceptual_hash(thumb):016x}"
    return row


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
"""TIFF files are decoded from their path: Pillow applies a TIFF's EXIF orientation differently when it reads the
file than when it reads the same bytes from memory (seen with Pillow 13), and the stats must see the pixels that
:func:`tasks.datasets.decode` gives the other stages."""


def _measure(root: str, rel: str, max_pixels: int) -> tuple[dict[str, object], np.ndarray | None]:
    """:func:`image_stats` without ``phash`` (computed for all thumbnails at once) and the image's
    ``NEAR_THUMB_SIDE`` px grey thumbnail (None when unreadable).

    The file is read once: its sha256 and the decode use the same bytes (but TIFFs, see :data:`_TIFF_MAGIC`).
    """
    path = os.path.join(root, rel)
    try:
        with open(path, "rb") as fh:
            data: bytes | None = fh.read()
    except OSError:
        data = None
    file_sha = hashlib.sha256(data).hexdigest() if data is not None else None
    try:
        if data is not None and data[:4] not in _TIFF_MAGIC:
            opened, info = open_image(data, max_pixels)
            img = _grey_image(opened)
        else:  # bytes unreadable, or a TIFF: the file decoder, as every other stage decodes it
            grey, info = decode(Path(path), max_pixels)
            img = Image.fromarray(np.ascontiguousarray(grey)) if grey.ndim == 2 and grey.size else None
    except ImageDecodeError as exc:
        return _unreadable_row(rel, exc.reason, file_sha), None
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one bad file must not stop the stage
        return _unreadable_row(rel, f"undecodable: {type(exc).__name__}: {exc}", file_sha), None
    del data
    if img is None or img.width == 0 or img.height == 0:
        return _unreadable_row(rel, f"empty image ({info['width']}x{info['height']} pixels)", file_sha), None
    w, h = img.size
    brightness, contrast = _mean_std(img.histogram())
    raw = img.tobytes()
    pixel_hash = hashlib.sha256(f"{h}x{w}:".encode())
    pixel_hash.update(raw)
    thumb = _pixels(img.resize((NEAR_THUMB_SIDE, NEAR_THUMB_SIDE), Image.Resampling.BOX))
    return {
        "image": rel,
        "readable": True,
        "error": "",
        "format": info["format"],
        "mode": info["mode"],
        "width": int(info["width"]),
        "height": int(info["height"]),
        "frames": int(info["frames"]),
        "sharpness": _sharpness(img, raw),
        "brightness": brightness,
        "contrast": contrast,
        "aspect": max(h, w) / min(h, w),
        "pixel_hash": pixel_hash.hexdigest(),
        "phash": None,
        "file_sha256": file_sha,
    }, thumb


def _duplicate_of(rows: list[dict[str, object]]) -> list[str | None]:
    """For each row: the first image (in sorted path order) with the same pixel_hash, None for that first one.

    Works on the measured rows, not the table's columns: iterating pandas' Arrow-backed string columns cost ~4 us a
    value, a third of the serial work after the workers."""
    keys: list[tuple[str, str] | None] = [
        (str(r["image"]), r["pixel_hash"]) if r["readable"] and isinstance(r["pixel_hash"], str) else None
        for r in rows
    ]
    first: dict[str, str] = {}
    for image, pixel_hash in sorted(k for k in keys if k is not None):
        first.setdefault(pixel_hash, image)
    return [None if k is None or first[k[1]] == k[0] else first[k[1]] for k in keys]


def near_duplicates(
    hashes: np.ndarray, thumbs: np.ndarray, max_bits: int = NEAR_HASH_BITS, block: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """For each image ``i``: the earlier image ``j < i`` most similar to it among those whose hash is close.

    Args:
        hashes: ``(n,)`` 64-bit perceptual hashes, in the order that decides which copy is "the original".
        thumbs: ``(n, side, side)`` uint8 grey thumbnails, same order.
        max_bits: candidates differ from ``i``'s hash in at most this many bits.
        block: Hamming distances are computed ``block`` pairs at a time (memory bound: ~9 bytes a pair).

    Returns:
        ``(match, similarity)``: ``match[i]`` is ``j`` (or -1 when no candidate), ``similarity[i]`` the Pearson
        correlation of the two thumbnails (NaN when no candidate; 0 when either thumbnail is flat).

    Cost: ``n**2 / 2`` xor + popcount on uint64 in blocks (exact, no index to build: 20k hashes take well under a
    second, 50k a few seconds) plus one thumbnail correlation per candidate pair.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    flat = np.asarray(thumbs).reshape(n, -1)
    match = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan)
    if n < 2:
        return match, similarity
    rows = max(1, block // n)
    found_i: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    found_j: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    for start in range(1, n, rows):
        stop = min(n, start + rows)
        close = np.bitwise_count(h[start:stop, None] ^ h[None, :stop]) <= max_bits  # rows against all before them
        if not close.any():
            continue
        ii, jj = np.divmod(np.flatnonzero(close), stop)
        ii += start
        keep = jj < ii
        found_i.append(ii[keep])
        found_j.append(jj[keep])
    pi, pj = np.concatenate(found_i), np.concatenate(found_j)
    if not len(pi):
        return match, similarity
    mean = flat.sum(axis=1, dtype=np.int64) / flat.shape[1]
    norm = np.sqrt(np.maximum(np.einsum("ij,ij->i", flat, flat, dtype=np.int64) - flat.shape[1] * mean**2, 0.0))
    sims = np.empty(len(pi))
    step = max(1, (1 << 23) // flat.shape[1])  # ~32 MB of float32 per side
    for s in range(0, len(pi), step):
        a, b = pi[s : s + step], pj[s : s + step]
        xa = flat[a].astype(np.float32) - mean[a, None].astype(np.float32)
        xb = flat[b].astype(np.float32) - mean[b, None].astype(np.float32)
        denom = norm[a] * norm[b]
        dot = np.einsum("ij,ij->i", xa, xb, dtype=np.float64)
        sims[s : s + step] = np.where(denom > 1e-6, dot / np.where(denom > 1e-6, denom, 1.0), 0.0)
    order = np.lexsort((pj, -sims, pi))  # per image: the most similar, then the earliest
    pi, pj, sims = pi[order], pj[order], sims[order]
    first = np.ones(len(pi), dtype=bool)
    first[1:] = pi[1:] != pi[:-1]
    match[pi[first]] = pj[first]
    similarity[pi[first]] = np.clip(sims[first], -1.0, 1.0)
    return match, similarity


def _similar_to(
    rows: list[dict[str, object]], duplicate_of: list[str | None], thumbs: list[np.ndarray | None]
) -> tuple[list[str | None], list[float]]:
    """``similar_to`` and ``similarity`` for each row: near-duplicate candidates among the earlier images (sorted
    path order, like exact duplicates) that are readable and not exact duplicates themselves."""
    eligible = sorted(
        (str(row["image"]), i)
        for i, (row, dup) in enumerate(zip(rows, duplicate_of, strict=True))
        if isinstance(row["phash"], str) and dup is None and thumbs[i] is not None
    )
    similar: list[str | None] = [None] * len(rows)
    values = [math.nan] * len(rows)
    if len(eligible) < 2:
        return similar, values
    order = [i for _, i in eligible]
    hashes = np.array([int(str(rows[i]["phash"]), 16) for i in order], dtype=np.uint64)
    match, sim = near_duplicates(hashes, np.stack([thumbs[i] for i in order]))
    for k, i in enumerate(order):
        if match[k] >= 0:
            similar[i] = eligible[match[k]][0]
            values[i] = float(sim[k])
    return similar, values


def _measure_many(root: str, max_pixels: int, images: list[str]) -> list[tuple[dict[str, object], np.ndarray | None]]:
    """:func:`_measure` of a chunk of images, with their ``phash`` (one DCT call per chunk, in the worker)."""
    with _bomb_warnings_are_errors():
        measured = [_measure(root, rel, max_pixels) for rel in images]
    _fill_phashes(measured)
    return measured


def _fill_phashes(measured: list[tuple[dict[str, object], np.ndarray | None]]) -> None:
    """Set ``phash`` of the readable rows that have none, from their thumbnails."""
    todo = [(row, thumb) for row, thumb in measured if thumb is not None and row["phash"] is None]
    if todo:
        hashes = perceptual_hashes(np.stack([thumb for _, thumb in todo])).tolist()
        for (row, _), h in zip(todo, hashes, strict=True):
            row["phash"] = f"{h:016x}"


def _measure_in_threads(
    root: str, images: list[str], max_pixels: int, workers: int
) -> list[tuple[dict[str, object], np.ndarray | None]]:
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-stats") as pool:
        return list(pool.map(lambda rel: _measure(root, rel, max_pixels), images))


def _measure_in_workers(
    root: str, images: list[str], max_pixels: int, workers: int
) -> list[tuple[dict[str, object], np.ndarray | None]]:
    """:func:`_measure` of every image on ``workers`` forked processes (threads where forking is not safe), in order.

    The workers only decode and measure (Pillow, numpy, hashlib: no locks another thread of this process could hold
    at fork time, no OpenMP), and leave with ``os._exit``, so the parent's atexit hooks (e.g. the temporary Prefect
    server's shutdown) never run in them. A worker that dies (a decoder crash) must not lose the stage: the chunks
    it did not return are measured again here, in threads, after a warning.
    """
    if not FORK_WORKERS or len(images) <= STATS_CHUNK:
        return _measure_in_threads(root, images, max_pixels, workers)
    import scipy.fft  # noqa: F401 - the workers' perceptual hashes need it: imported once here, not once per fork

    chunks = [images[a:b] for a, b in spans(len(images), STATS_CHUNK)]
    done: list[list[tuple[dict[str, object], np.ndarray | None]]] = []
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for part in pool.map(partial(_measure_many, root, max_pixels), chunks):
                done.append(part)
    except (BrokenProcessPool, OSError) as exc:
        rest = [rel for chunk in chunks[len(done) :] for rel in chunk]
        log.warning("a stats worker process failed (%s); measuring its %d images in threads", exc, len(rest))
        done.append(_measure_in_threads(root, rest, max_pixels, workers))
    return [m for part in done for m in part]


def compute_stats(
    root: Path,
    images: list[str],
    max_pixels: int,
    workers: int | None = None,
    mapper: Mapper | None = None,
    chunk: int = 512,
) -> pd.DataFrame:
    """Stats for ``images`` (paths relative to ``root``), one row each in the given order, plus ``duplicate_of``,
    ``similar_to`` and ``similarity`` (near-duplicate candidates, see the module docstring).

    With ``workers > 1`` (default :data:`DEFAULT_WORKERS`) images are measured in forked worker processes, chunks of
    :data:`STATS_CHUNK` images each (threads on other systems, see :data:`FORK_WORKERS`); each worker holds one
    decoded image at a time, so memory stays flat whatever the number of images but for the 1 KB thumbnail kept per
    image for the near-duplicate search. With a ``mapper``
    (:mod:`tasks.parallel`) chunks of ``chunk`` images are measured by the flow's task runner (e.g. Dask) instead.
    """
    root = str(root)
    if len(set(images)) != len(images):
        dupes = sorted(k for k, n in Counter(images).items() if n > 1)
        raise ValueError(f"image list has repeated paths: {dupes[:5]}")
    workers = DEFAULT_WORKERS if workers is None else workers
    with _bomb_warnings_are_errors():
        if mapper is not None:
            chunks = [images[a:b] for a, b in spans(len(images), chunk)]
            measured = [m for part in mapper(partial(_measure_many, root, max_pixels), chunks) for m in part]
        elif workers > 1 and len(images) > 1:
            measured = _measure_in_workers(root, images, max_pixels, workers)
        else:
            measured = [_measure(root, rel, max_pixels) for rel in images]
    rows = [row for row, _ in measured]
    thumbs = [thumb for _, thumb in measured]
    _fill_phashes(measured)  # the images measured here (workers measured theirs)
    duplicate_of = _duplicate_of(rows)
    similar, values = _similar_to(rows, duplicate_of, thumbs)
    stats = pd.DataFrame.from_records(rows, columns=IMAGE_STAT_COLUMNS).astype(_DTYPES)
    stats["duplicate_of"] = pd.Series(duplicate_of, index=stats.index, dtype=object)
    stats["similar_to"] = pd.Series(similar, index=stats.index, dtype=object)
    stats["similarity"] = pd.Series(values, index=stats.index, dtype="float64")
    return stats[STAT_COLUMNS]


# --------------------------------------------------------------------------------------------------- the suite


def suite_path(name: str, suites_dir: Path | None = None) -> Path:
    """``tasks/suites/<name>.json`` (or ``suites_dir/<name>.json``).

    Raises:
        FileNotFoundError: naming the path and the suites that exist.
        ValueError: if ``name`` is not a plain file stem.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"suite name must be a plain name (a file in the suites folder, without .json): {name!r}")
    folder = Path(suites_dir) if suites_dir is not None else SUITES_DIR
    path = folder / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise FileNotFoundError(f"GX suite {name!r} not found: {path} (available: {available or 'none'})")
    return path


def suite_digest(name: str, suites_dir: Path | None = None) -> str:
    """sha256 of the suite file's bytes (recorded in the lineage)."""
    return hashlib.sha256(suite_path(name, suites_dir).read_bytes()).hexdigest()


def suite_parameters(params: ValidateParams) -> dict[str, object]:
    """The values of the suite parameters (``$PARAMETER`` names) for one run."""
    return {
        "min_side": params.min_side,
        "max_side": params.max_side,
        "max_aspect": params.max_aspect,
        "min_contrast": params.min_contrast,
        "min_sharpness": params.min_sharpness,
        "formats": list(params.formats),
        "near_duplicate_similarity": params.near_duplicate_similarity,
    }


def _load_suite(path: Path) -> Any:
    import great_expectations as gx

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ValueError(f"{path}: not a GX expectation suite (needs a list 'expectations')")
    data = {k: v for k, v in data.items() if k in ("name", "expectations", "suite_parameters", "meta", "notes")}
    data["expectations"] = [{k: v for k, v in e.items() if k != "id"} for e in data["expectations"]]
    suite = gx.ExpectationSuite(**data)
    # GX only logs an invalid expectation and leaves it out of the suite: a typo must not drop a check silently.
    if len(suite.expectations) != len(data["expectations"]):
        raise ValueError(
            f"{path}: {len(data['expectations']) - len(suite.expectations)} expectation(s) are not valid for "
            f"GX (see the log above)"
        )
    return suite


def _quiet_context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    try:
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except Exception:  # noqa: BLE001 - progress bars are cosmetic
        pass
    return context


# --------------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class QualityResult:
    """What the validate stage found.

    Attributes:
        passed: images that passed every expectation, in input order.
        quarantine: ``image, reason`` (one row per failing image, in input order; reasons joined with "; ").
        summary: n_images, n_passed, n_quarantined, fail_share, max_fail_share, success (GX's overall verdict),
            suite, suite_sha256, expectations (check -> unexpected count), reasons (category -> images).
        gx_result: the GX validation result, JSON-able (``ExpectationSuiteValidationResult.to_json_dict()``).
    """

    passed: list[str]
    quarantine: pd.DataFrame
    summary: dict[str, object]
    gx_result: dict = field(repr=False)


class _SafeValues(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _format(template: str, values: dict[str, object]) -> str:
    try:
        return template.format_map(_SafeValues(values))
    except (ValueError, TypeError, IndexError, AttributeError):
        # e.g. "{contrast:.2f}" with a None: fill the names without their format specs
        return re.sub(r"\{(\w+)(?:![rsa])?(?::[^{}]*)?\}", lambda m: str(values.get(m.group(1), m.group(0))), template)


def _category(meta: dict, template: str) -> str:
    if meta.get("label"):
        return str(meta["label"])
    return re.split(r"[:{]", template, maxsplit=1)[0].strip() or template


def _native(value: object) -> object:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _pick_template(meta: dict, kwargs: dict, value: object) -> str:
    template = str(meta.get("reason") or "")
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if meta.get("reason_below") and isinstance(low, (int, float)) and value < low:
            template = str(meta["reason_below"])
        elif meta.get("reason_above") and isinstance(high, (int, float)) and value > high:
            template = str(meta["reason_above"])
    return template


def validate_stats(stats: pd.DataFrame, params: ValidateParams, suites_dir: Path | None = None) -> QualityResult:
    """Run the GX suite ``params.suite`` on the stats table; map every failing image to its reasons.

    Raises:
        FileNotFoundError: if the suite file is missing.
        ValueError: if the suite is invalid, needs a parameter that ``ValidateParams`` does not provide, or the
            table lacks columns / has repeated images.
        RuntimeError: if an expectation raised inside GX, or failed without naming the images (a table-level
            expectation): a suite that cannot say which images fail is a broken suite, not a pass.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    path = suite_path(params.suite, suites_dir)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    suite = _load_suite(path)
    values = suite_parameters(params)
    missing = sorted(set(suite.suite_parameter_options) - set(values))
    if missing:
        raise ValueError(f"{path}: suite parameters {missing} are not provided by the validate params")
    absent = [c for c in STAT_COLUMNS if c not in stats.columns]
    if absent:
        raise ValueError(f"stats table lacks columns {absent}")
    if stats["image"].duplicated().any():
        raise ValueError(
            f"stats table has repeated images: {list(stats.loc[stats['image'].duplicated(), 'image'][:5])}"
        )

    frame = stats.reset_index(drop=True)
    images = list(frame["image"])
    rows = {image: i for i, image in enumerate(images)}
    records: list[dict[str, object]] = []  # the rows as plain dicts, built on the first failure

    context = _quiet_context()
    suite = context.suites.add(suite)
    batch = (
        context.data_sources.add_pandas("image_stats")
        .add_dataframe_asset("images")
        .add_batch_definition_whole_dataframe("all_images")
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}-validation", data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        expectation_parameters=values,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["image"]},
    )
    gx_result = result.to_json_dict()

    # image -> [(check, reason, category, suppressed_by)] in suite order
    failures: dict[str, list[tuple[str, str, str, list[str] | None]]] = {}
    counts: dict[str, int] = {}
    for n, res in enumerate(gx_result["results"]):
        config = res.get("expectation_config") or {}
        meta = config.get("meta") or {}
        kwargs = config.get("kwargs") or {}
        column = kwargs.get("column")
        check = str(meta.get("check") or f"{config.get('type')}:{column}:{n}")
        info = res.get("exception_info") or {}
        if info.get("raised_exception"):
            raise RuntimeError(
                f"GX expectation {check!r} ({config.get('type')}) raised: {info.get('exception_message')}"
            )
        details = res.get("result") or {}
        unexpected = details.get("unexpected_index_list")
        count = int(details.get("unexpected_count") or 0)
        counts[check] = count
        if not res.get("success") and not unexpected:
            raise RuntimeError(
                f"GX expectation {check!r} ({config.get('type')}) failed without naming the failing images; "
                "the image_quality suite supports per-row (column map) expectations only"
            )
        if unexpected is None:
            continue
        if len(unexpected) != count:
            raise RuntimeError(f"GX expectation {check!r}: {count} unexpected values but {len(unexpected)} rows listed")
        for item in unexpected:
            image = item.get("image") if isinstance(item, dict) else None
            if image not in rows:
                raise RuntimeError(f"GX expectation {check!r} reported an unknown image: {item!r}")
            if not records:
                records = [{k: _native(v) for k, v in r.items()} for r in frame.to_dict("records")]
            row = records[rows[image]]
            template = _pick_template(meta, kwargs, row.get(column) if column else None)
            if not template:
                template = f"failed {config.get('type')}" + (f" on {column}" if column else "")
            reason = _format(template, {**values, **row})
            failures.setdefault(image, []).append((check, reason, _category(meta, template), meta.get("suppressed_by")))

    quarantine_rows: list[dict[str, str]] = []
    histogram: Counter[str] = Counter()
    for image in images:
        if image not in failures:
            continue
        found = failures[image]
        failed_checks = {check for check, *_ in found}
        kept = [f for f in found if not (f[3] and failed_checks.intersection(f[3]))] or found
        reasons: list[str] = []
        for _check, reason, category, _suppressed_by in kept:
            if reason not in reasons:
                reasons.append(reason)
                histogram[category] += 1
        quarantine_rows.append({"image": image, "reason": "; ".join(reasons)})

    quarantine = pd.DataFrame(quarantine_rows, columns=["image", "reason"])
    passed = [image for image in images if image not in failures]
    success = bool(gx_result.get("success"))
    if not success and not failures:  # cannot happen with per-row expectations (checked above): be loud if it does
        raise RuntimeError("GX reported a failed validation but no failing image")
    n = len(images)
    summary: dict[str, object] = {
        "n_images": n,
        "n_passed": len(passed),
        "n_quarantined": len(quarantine),
        "fail_share": len(quarantine) / n if n else 0.0,
        "max_fail_share": params.max_fail_share,
        "success": success,
        "suite": params.suite,
        "suite_sha256": digest,
        "expectations": counts,
        "reasons": dict(histogram.most_common()),
    }
    return QualityResult(passed=passed, quarantine=quarantine, summary=summary, gx_result=gx_result)
