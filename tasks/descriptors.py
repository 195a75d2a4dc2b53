"""Classic image descriptors: fast, training-free vectors for standardised grey images ``(N, S, S)`` uint8.

- ``raw``: the pixels (PCA is fitted later, in :mod:`tasks.embedding`).
- ``hog``: histograms of oriented gradients (scikit-image).
- ``lbp``: rotation-invariant uniform local binary pattern histograms at two radii, for the whole image and for
  its centre (where AOI crops put the defect). A generic texture descriptor.
- ``stats``: centre-weighted grey-level statistics: mean, spread and gradient energy in concentric rings, and a
  grey-level histogram of the centre. Generic, and what severity grades differ by.
- ``morph``: defect-centred morphology and topology of the bright and dark phases: what disk openings and closings
  at several radii remove or fill near the centre (spurs, bridges, breaks, bites, holes), whether they split or join
  the components that touch the centre, isolated blobs there, and ring occupancy. Strong on binarised layouts (PCB
  copper); generic as a description of small bright/dark structures, weaker on textures (``lbp``, ``stats``).

Every function is deterministic and vectorised over the batch with :mod:`scipy.ndimage` separable filters.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DESCRIPTORS = ("raw", "hog", "lbp", "stats", "morph")
MORPH_RADII = (1.0, 2.0, 3.0, 5.0)
"""Disk radii (px at the standardised size) of the openings and closings of :func:`morph_features`."""


def _float(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images (N, S, S), got shape {images.shape}")
    return images.astype(np.float32) / 255.0


def ring_masks(size: int, n_rings: int = 4) -> np.ndarray:
    """``(n_rings, S, S)`` float masks of concentric rings around the centre (last ring includes the corners)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - c, xx - c) / (size / 2.0)
    edges = np.linspace(0, 1, n_rings + 1)
    edges[-1] = np.inf
    masks = np.stack([(r >= lo) & (r < hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)])
    return masks.astype(np.float32)


def centre_weights(size: int, sigmas=(0.15, 0.3)) -> np.ndarray:
    """``(len(sigmas), S, S)`` Gaussian windows (sigma as a share of the side), each summing to 1."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    r2 = ((yy - c) ** 2 + (xx - c) ** 2) / float(size) ** 2
    w = np.stack([np.exp(-r2 / (2 * s * s)) for s in sigmas]).astype(np.float32)
    return w / w.sum(axis=(1, 2), keepdims=True)


def _windows(size: int) -> np.ndarray:
    rings = ring_masks(size)
    rings = rings / np.maximum(rings.sum(axis=(1, 2), keepdims=True), 1)
    return np.concatenate([centre_weights(size), rings])  # (6, S, S), each sums to 1


def _pooled(maps: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Weighted means of ``(N, S, S)`` maps under each window → ``(N, W)``."""
    return np.einsum("nij,wij->nw", maps, windows, optimize=True)


def raw_pixels(images: np.ndarray, side: int = 32) -> np.ndarray:
    """Pixels, area-downsampled to ``side`` (PCA is applied by the embedder)."""
    x = _float(images)
    s = x.shape[1]
    if s != side and s % side == 0:
        f = s // side
        x = x.reshape(len(x), side, f, side, f).mean(axis=(2, 4))
    elif s != side:
        x = ndimage.zoom(x, (1, side / s, side / s), order=1)
    return x.reshape(len(x), -1)


def hog_features(images: np.ndarray) -> np.ndarray:
    """HOG with 4x4 cells per image side, 9 orientations, 2x2 blocks (scikit-image)."""
    from skimage.feature import hog

    x = _float(images)
    cell = max(4, x.shape[1] // 4)
    return np.stack(
        [hog(im, orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2), feature_vector=True) for im in x]
    ).astype(np.float32)


def lbp_features(images: np.ndarray) -> np.ndarray:
    """Uniform rotation-invariant LBP histograms (P=8,R=1 and P=16,R=2) of the whole image and of its centre."""
    from skimage.feature import local_binary_pattern

    images = np.asarray(images)
    s = images.shape[1]
    lo, hi = s // 4, s - s // 4
    out = []
    for im in images:
        feats = []
        for p, r in ((8, 1), (16, 2)):
            code = local_binary_pattern(im, p, r, method="uniform")
            bins = p + 2
            for region in (code, code[lo:hi, lo:hi]):
                h = np.bincount(region.astype(np.int64).ravel(), minlength=bins)[:bins].astype(np.float32)
                feats.append(h / max(h.sum(), 1.0))
        out.append(np.concatenate(feats))
    return np.stack(out).astype(np.float32)


_SOBEL_Y = np.array([[[-1, -2, -1], [0, 0, 0], [1, 2, 1]]], np.float32)
_LAPLACE = np.array([[[0, 1, 0], [1, -4, 1], [0, 1, 0]]], np.float32)


def stats_features(images: np.ndarray) -> np.ndarray:
    """Centre-weighted grey-level statistics (mean, std, gradient energy per window) + centre histogram."""
    x = _float(images)
    s = x.shape[1]
    win = _windows(s)
    # 2-D kernels on the (N, H, W) stack: ndimage.sobel/laplace would also smooth across the batch axis, making
    # an image's features depend on its neighbours in the batch
    gy = ndimage.correlate(x, _SOBEL_Y, mode="reflect")
    gx = ndimage.correlate(x, _SOBEL_Y.transpose(0, 2, 1), mode="reflect")
    grad = np.hypot(gx, gy) / 4.0
    lap = np.abs(ndimage.correlate(x, _LAPLACE, mode="reflect"))
    mean = _pooled(x, win)
    sq = _pooled(x * x, win)
    std = np.sqrt(np.maximum(sq - mean**2, 0))
    lo, hi = s // 4, s - s // 4
    centre = x[:, lo:hi, lo:hi].reshape(len(x), -1)
    hist = np.stack([np.histogram(c, bins=8, range=(0, 1))[0] for c in centre]).astype(np.float32)
    hist /= max(centre.shape[1], 1)
    glob = np.stack([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], 1)
    return np.concatenate([mean, std, _pooled(grad, win), _pooled(lap, win), hist, glob], 1).astype(np.float32)


def _disk(r: float) -> np.ndarray:
    k = int(np.floor(r))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    return (xx**2 + yy**2 <= r * r)[None]


def _binary_open_close(b: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Disk opening and closing of a binary stack ``(N, S, S)`` (the image border neither erodes nor grows)."""
    disk = _disk(r)
    opened = ndimage.binary_dilation(ndimage.binary_erosion(b, disk, border_value=1), disk)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(b, disk), disk, border_value=1)
    return opened, closed


_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = True  # 8-connected within an image, never across the batch axis


def component_stats(phase: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Per image of a binary stack ``(N, S, S)``: components touching the ``centre`` mask, those of them that do not
    touch the image border (isolated blobs: spurious copper, pin-holes), and the isolated ones' area share.

    One :func:`scipy.ndimage.label` call over the stack with an in-plane structure, then bincounts: no Python loop
    over images. ``(N, 3)`` float32.
    """
    n_img, s, _ = phase.shape
    lab, n = ndimage.label(phase, structure=_IN_PLANE)
    flat = lab.ravel()
    comp_img = np.zeros(n + 1, np.int64)
    comp_img[flat] = np.repeat(np.arange(n_img), s * s)
    area = np.bincount(flat, minlength=n + 1).astype(np.float64)
    touch = np.zeros(n + 1, bool)
    touch[lab[:, centre]] = True
    border = np.zeros(n + 1, bool)
    for edge in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        border[edge] = True
    touch[0] = border[0] = False
    iso = touch & ~border
    return np.stack(
        [
            np.bincount(comp_img[touch], minlength=n_img),
            np.bincount(comp_img[iso], minlength=n_img),
            np.bincount(comp_img[iso], weights=area[iso], minlength=n_img) / (s * s),
        ],
        1,
    ).astype(np.float32)


def _signed_log(d: np.ndarray) -> np.ndarray:
    return np.sign(d) * np.log1p(np.abs(d))


def morph_features(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Defect-centred morphology and topology of both phases (bright and dark); ~100 dimensions.

    The image is split at ``threshold`` (after the percentile lighting of standardisation) into a bright and a dark
    phase. For each phase: the occupancy of concentric rings; the components touching the centre and how many of them
    are isolated blobs; then for disk radii :data:`MORPH_RADII` what an opening removes (thin parts: spurs, bridges)
    and a closing fills (thin gaps: breaks, bites, holes) near the centre, and how they change the number of
    components touching the centre (an opening that splits a component finds a bridge, a closing that joins two finds
    a break; an isolated blob vanishing under opening is small). Everything is pooled near the centre, where the
    crops put the defect; the layout around it is nuisance, so it gets only the ring occupancies. Counts are
    differences (signed log), not absolute numbers: how many traces cross a patch says nothing about its defect.
    """
    x = _float(images)
    s = x.shape[1]
    win = _windows(s)
    near = win[:3]  # the two centre Gaussians and the innermost ring
    c = (s - 1) / 2.0
    yy, xx = np.mgrid[0:s, 0:s]
    centre = np.hypot(yy - c, xx - c) <= 0.2 * s
    bright = x > threshold
    feats = [_pooled(bright.astype(np.float32), win)]
    for phase in (bright, ~bright):
        base = component_stats(phase, centre)
        feats += [np.log1p(base[:, :2]), np.sqrt(base[:, 2:])]
        for r in MORPH_RADII:
            opened, closed = _binary_open_close(phase, r)
            feats.append(_pooled((phase & ~opened).astype(np.float32), near))  # thin parts of the phase
            feats.append(_pooled((closed & ~phase).astype(np.float32), near))  # thin gaps in the phase
            feats.append(_signed_log(component_stats(opened, centre)[:, :2] - base[:, :2]))  # split / vanished
            feats.append(_signed_log(base[:, :2] - component_stats(closed, centre)[:, :2]))  # joined
    return np.concatenate(feats, 1).astype(np.float32)


def describe(name: str, images: np.ndarray) -> np.ndarray:
    """The named descriptor for a batch of standardised images, ``(N, d)`` float32."""
    fn = {
        "raw": raw_pixels,
        "hog": hog_features,
        "lbp": lbp_features,
        "stats": stats_features,
        "morph": morph_features,
    }.get(name)
    if fn is None:
        raise ValueError(f"unknown descriptor {name!r}; choose from {', '.join(DESCRIPTORS)}")
    return fn(images)
