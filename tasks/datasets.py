"""Finding images, decoding them the same way everywhere, and reading label files.

One decoder for every stage, so that quality stats, standardisation and embedding all see the same pixels:
Pillow, first frame, EXIF orientation applied, any bit depth or colour mode reduced to 8-bit grey.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"}
)


class ImageDecodeError(Exception):
    """An image file that cannot be used; ``reason`` is short and specific (it goes into quarantine.csv)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Discovery:
    """Image files found under a folder (paths relative to it, POSIX, sorted), the other files ignored, and the
    image files that must not be read at all (``rejected``: path and reason; they go to quarantine)."""

    images: list[str]
    ignored: list[str]
    rejected: list[tuple[str, str]]


def _refuse(path: Path, root: Path, rel: str) -> str | None:
    """Why an image file must not be read, or None: names that do not round-trip, symlinks leaving the folder."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            return "broken symlink"
        if not target.is_relative_to(root.resolve()):
            return "symlink pointing outside the image folder"
    if not os.access(path, os.R_OK):
        return "unreadable file (permission denied)"
    return None


def discover(root: Path) -> Discovery:
    """List every image file under ``root`` recursively, by extension; other files are ignored and counted.

    Raises:
        FileNotFoundError: if ``root`` is missing or not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    images: list[str] = []
    ignored: list[str] = []
    rejected: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            ignored.append(rel)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            reason = _refuse(path, root, rel)
            if reason is None:
                images.append(rel)
            else:
                printable = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                rejected.append((printable, reason))
        else:
            ignored.append(rel)
    return Discovery(images=images, ignored=ignored, rejected=rejected)


def to_grey_u8(img: Image.Image) -> np.ndarray:
    """Reduce any Pillow mode (1, L, P, RGB(A), CMYK, I;16, I, F, LA) to an 8-bit grey array.

    High bit depths are scaled by their actual range so that 16-bit machines look like 8-bit ones.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip((arr - lo) * scale, 0, 255).astype(np.uint8)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return np.asarray(img.convert("L"), dtype=np.uint8)


def open_image(source: Path | bytes, max_pixels: int) -> tuple[Image.Image, dict[str, object]]:
    """Open, check and load one image (first frame, EXIF orientation applied) from a path or a file's bytes, and
    report what it was (format, mode, width, height, frames).

    The one place for the decoding checks and their quarantine reasons. A ``DecompressionBombWarning`` is an error
    only where the caller made it one (:func:`decode` per image; ``tasks.quality`` once around its threads).

    Raises:
        ImageDecodeError: zero-byte, unreadable, not an image, truncated, too many pixels, or undecodable.
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageDecodeError("zero-byte file")
        fp: Path | io.BytesIO = io.BytesIO(source)
    else:
        fp = Path(source)
        try:
            if fp.stat().st_size == 0:
                raise ImageDecodeError("zero-byte file")
        except OSError as exc:
            raise ImageDecodeError(f"unreadable file: {exc.strerror or exc}") from exc
    try:
        with Image.open(fp) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"too many pixels: {width}x{height} > {max_pixels}")
            info = {
                "format": img.format or "",
                "mode": img.mode,
                "width": width,
                "height": height,
                "frames": int(getattr(img, "n_frames", 1)),
            }
            img.seek(0)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return img, info
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc)
        reason = "truncated image" if "truncated" in text.lower() else f"undecodable: {text}"
        raise ImageDecodeError(reason) from exc


def decode(path: Path, max_pixels: int = 50_000_000) -> tuple[np.ndarray, dict[str, object]]:
    """Decode one image to 8-bit grey and report what it was (format, mode, width, height, frames).

    Raises:
        ImageDecodeError: zero-byte, not an image, truncated, too many pixels, or undecodable.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img, info = open_image(Path(path), max_pixels)
    return to_grey_u8(img), info


def read_labels(csv_path: Path, known: set[str] | None = None) -> dict[str, str]:
    """Read a ``path,label`` CSV (paths relative to the image folder).

    Rows for images that are not in ``known`` are ignored by the caller's choice; a malformed row raises
    ``ValueError`` naming its line.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"labels file not found: {csv_path}")
    labels: dict[str, str] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise ValueError(f"{csv_path}: needs columns 'path' and 'label', found {fields}")
        for lineno, row in enumerate(reader, start=2):
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not path or not label:
                raise ValueError(f"{csv_path}:{lineno}: empty path or label")
            if Path(path).is_absolute() or ".." in Path(path).parts:
                raise ValueError(f"{csv_path}:{lineno}: path must be relative to the image folder: {path}")
            if known is None or path in known:
                labels[Path(path).as_posix()] = label
    return labels
