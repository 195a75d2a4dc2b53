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
- ``crop``: ``stats`` and ``lbp`` of a square crop around the image's most anomalous spot, found without a template
  (median-background residual). The other descriptors look at the image centre; a small defect elsewhere in a
  whole-part image is a few pixels of their pooled windows. An extra block beside them, not a replacement.

Every function is deterministic and vectorised over the batch with :mod:`scipy.ndimage` separable filters.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DESCRIPTORS = ("raw", "hog", "lbp", "stats", "morph", "crop")
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


def defect_residual(images: np.ndarray) -> np.ndarray:
    """``(N, S, S)`` float32: ``|image - local median background|``, lightly smoothed; large where a small structure
    differs from its surroundings (specks, voids, short scratches), small on regular texture and on large pads.

    The background is the median in a window of side S/4, computed on the image area-downsampled 2x (window S/8) and
    bilinearly upsampled: a median filter at full size costs ~11 ms per 64 px image, this ~1 ms, and a background
    is smooth anyway. Per image (in-plane filters only): no image depends on the others of the batch.
    """
    x = _float(images)
    n, s, _ = x.shape
    if s % 2 == 0 and s >= 16:
        small = x.reshape(n, s // 2, 2, s // 2, 2).mean(axis=(2, 4))
    else:
        small = x
    k = max(3, int(round(small.shape[1] / 4)))
    k += 1 - k % 2  # odd
    bg = ndimage.median_filter(small, size=(1, k, k), mode="nearest")
    if bg.shape[1] != s:
        bg = ndimage.zoom(bg, (1, s / bg.shape[1], s / bg.shape[2]), order=1, mode="nearest")
    return ndimage.gaussian_filter(np.abs(x - bg), sigma=(0, max(1.0, s / 64), max(1.0, s / 64))).astype(np.float32)


def crop_window(residual: np.ndarray, min_share: float = 1 / 3) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square crop of one ``(S, S)`` residual map: centred on the maximum outside a
    border of S/16 (filter edge effects), side ``max(min_share * S, 2 x the extent of the peak's region above half
    the peak)``, at most S, shifted to stay inside the image (as ``bench/defect_crop.py``). A flat map gives the
    centre crop."""
    h, w = residual.shape
    border = max(1, min(h, w) // 16)
    inner = residual[border : h - border, border : w - border]
    cy, cx = np.unravel_index(int(np.argmax(inner)), inner.shape)
    cy, cx = cy + border, cx + border
    peak = float(residual[cy, cx])
    extent = 0
    if peak > 1e-6:
        lab, _ = ndimage.label(residual >= 0.5 * peak)
        sl = ndimage.find_objects((lab == lab[cy, cx]).astype(np.int32))[0]
        extent = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
    else:
        cy, cx = h // 2, w // 2
    side = int(min(h, w, max(round(min_share * min(h, w)), 2 * extent)))
    top = int(np.clip(cy - side // 2, 0, h - side))
    left = int(np.clip(cx - side // 2, 0, w - side))
    return top, left, side


def defect_crops(images: np.ndarray, side: int | None = None) -> np.ndarray:
    """``(N, side, side)`` uint8 crops around each image's :func:`defect_residual` peak (:func:`crop_window`),
    resized with Pillow (area when shrinking, bilinear when enlarging); ``side`` defaults to S/2."""
    from PIL import Image

    images = np.asarray(images)
    side = side or max(8, images.shape[1] // 2)
    out = np.empty((len(images), side, side), np.uint8)
    for i, (im, res) in enumerate(zip(images, defect_residual(images), strict=True)):
        top, left, c = crop_window(res)
        patch = Image.fromarray(np.ascontiguousarray(im[top : top + c, left : left + c], dtype=np.uint8))
        resample = Image.Resampling.BOX if c > side else Image.Resampling.BILINEAR
        out[i] = np.asarray(patch.resize((side, side), resample=resample))
    return out


def _equal_shares(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate feature parts, repeating columns so each part has (nearly) the same number of them.

    The embedder z-scores every dimension and L2-normalises the block, so a part's expected share of the block's
    squared norm is its share of the dimensions (any fixed scale would be undone by the z-score); equal dimension
    counts give the parts equal shares, as separate blocks of equal weight would.
    """
    dims = [p.shape[1] for p in parts]
    best = None
    for base in range(1, 6):  # the smallest repetition within 3 % of equal
        reps = [max(1, round(base * max(dims) / d)) for d in dims]
        cols = [r * d for r, d in zip(reps, dims, strict=True)]
        err = (max(cols) - min(cols)) / max(cols)
        if best is None or err < best[0] - 1e-9:
            best = (err, reps)
        if err <= 0.03:
            break
    return np.concatenate([np.tile(p, (1, r)) for p, r in zip(parts, best[1], strict=True)], 1)


def crop_features(images: np.ndarray) -> np.ndarray:
    """``stats`` and ``lbp`` of :func:`defect_crops` (side S/2), with equal shares of the block (:func:`_equal_shares`).

    Why: on whole-part images (no AOI crop), a small defect away from the centre is invisible to the centre-pooled
    descriptors; as an extra block (weight 0.35) it lifted the synthetic whole-part set (ACC .27 -> .32) but cost
    the rare classes of DeepPCB's long tail (macro recall .66 -> .52), so it is an option, not a default
    (bench/RESULTS.md, "Fourth round"). Computed on the standardised images, so the same fitted model embeds refresh
    batches and serves.
    """
    crops = defect_crops(images)
    return _equal_shares([stats_features(crops), lbp_features(crops)]).astype(np.float32)


def describe(name: str, images: np.ndarray) -> np.ndarray:
    """The named descriptor for a batch of standardised images, ``(N, d)`` float32."""
    fn = {
        "raw": raw_pixels,
        "hog": hog_features,
        "lbp": lbp_features,
        "stats": stats_features,
        "morph": morph_features,
        "crop": crop_features,
    }.get(name)
    if fn is None:
        raise ValueError(f"unknown descriptor {name!r}; choose from {', '.join(DESCRIPTORS)}")
    return fn(images)
