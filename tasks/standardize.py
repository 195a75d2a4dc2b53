"""Standardise images from many machines: one size, one channel, comparable lighting.

Machines differ in size, bit depth, gain and gamma; the embedding must see defects, not machines. Every image is
decoded once (``tasks.datasets.decode``), lighting-normalised, padded to a square by edge replication (no
aspect distortion, no cropped-away defect) and resized. The result streams into a memory-mapped ``uint8`` array
``(N, size, size)``, so memory does not grow with the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tasks.config import StandardizeParams
from tasks.datasets import decode


def normalise_lighting(grey: np.ndarray, method: str, percentiles: tuple[float, float]) -> np.ndarray:
    """Map an 8-bit grey image to a common lighting: percentile stretch, histogram equalisation, or none."""
    if method == "none":
        return grey
    if method == "percentile":
        lo, hi = np.percentile(grey, percentiles)
        if hi <= lo:
            return np.zeros_like(grey)
        out = (grey.astype(np.float32) - lo) * (255.0 / (hi - lo))
        return np.clip(out, 0, 255).astype(np.uint8)
    if method == "equalize":
        hist = np.bincount(grey.ravel(), minlength=256)
        cdf = hist.cumsum()
        nonzero = cdf[cdf > 0]
        if nonzero.size == 0 or cdf[-1] == nonzero[0]:
            return np.zeros_like(grey)
        lut = np.clip(np.round((cdf - nonzero[0]) * 255.0 / (cdf[-1] - nonzero[0])), 0, 255).astype(np.uint8)
        return lut[grey]
    raise ValueError(f"unknown lighting method {method!r}")


def to_square(grey: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square by replicating edges, then resize to ``size`` (area-averaging when shrinking)."""
    h, w = grey.shape
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        grey = np.pad(grey, ((top, side - h - top), (left, side - w - left)), mode="edge")
    if grey.shape[0] == size:
        return grey
    resample = Image.Resampling.BOX if grey.shape[0] > size else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(grey).resize((size, size), resample=resample))


def standardize_image(path: Path, params: StandardizeParams, max_pixels: int) -> np.ndarray:
    """One file → ``(size, size)`` uint8, lighting-normalised."""
    grey, _ = decode(path, max_pixels=max_pixels)
    grey = normalise_lighting(grey, params.lighting, params.percentiles)
    return to_square(grey, params.size)


def standardize_all(root: Path, images: list[str], out: Path, params: StandardizeParams, max_pixels: int) -> np.memmap:
    """Standardise ``images`` (relative to ``root``) into the ``.npy`` file ``out``, streaming one at a time."""
    out.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(images), params.size, params.size))
    for i, rel in enumerate(images):
        arr[i] = standardize_image(root / rel, params, max_pixels)
    arr.flush()
    return arr
