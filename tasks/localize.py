"""Defect-area localisation against a golden template: raw inspection image -> defect patches.

An AOI machine usually has a defect-free reference ("template", "golden image") of the same board or package.
What differs between the inspected image and its template is where the defects are, so the stage aligns the two,
normalises their lighting, differences them in a way that tolerates the last pixel of misalignment and JPEG
ringing, and turns the connected regions of the difference into boxes, then into square crops (the patches the
rest of the pipeline labels).

Pairing images with templates (``pair_templates``) follows one of three documented rules:

``same-name``
    the template of ``IMAGES/a/b.png`` is ``TEMPLATES/a/b.png`` (two parallel folder trees).
``suffix``
    both live in the same folder: ``<stem><test_suffix>.<ext>`` pairs with ``<stem><template_suffix>.<ext>``
    (defaults ``_test`` / ``_temp``, as in DeepPCB; same extension). Files ending in the template suffix are
    returned as templates so the caller keeps them out of the images to label; files with neither suffix have no
    template. With a TEMPLATES folder given, the template is looked up in TEMPLATES/<the image's relative folder>.
``single``
    one golden image for every inspected image: ``TEMPLATES`` is a file (if it also sits among the images, it is
    returned as a template, not labelled).

Images without a template are returned separately (never dropped silently), and so are template files found among
the images (``Pairing.templates``).

``localize_folder`` turns a folder of inspection images into a folder of patches, one image at a time (memory does
not grow with the data set), and accounts for every input file in two tables:

- ``boxes.csv``: one row per file of the patch folder: the patch, what it is (``defect`` crop or ``whole`` image),
  its source image (path relative to the image folder, sha256), the template (path, sha256), the defect box and
  the crop box in source-image pixels, and the difference score and area. It maps every label back to its source.
- ``unlocalized.csv``: every input image that did not become defect patches, with what happened to it
  (``passthrough``: copied whole into the patch folder, so it is labelled whole or quarantined by the validate
  step if it cannot be decoded; ``skipped``: not labelled, with ``localize.unpaired: skip``; ``template``: it is a
  template; ``rejected``: never read, e.g. a symlink leaving the folder; ``no-defect``: it matches its template).

Patch names are ``<source path>__<i>_<x0>_<y0>.png`` (``i`` = rank by difference score, ``x0, y0`` = the crop's
top-left corner), in the source's sub-folder; whole images keep their own path. Names and bytes depend only on
the inputs and the params, so a re-run rebuilds the same folder (unchanged files are not rewritten, stale ones are
removed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from tasks.config import LocalizeParams
from tasks.datasets import decode


@dataclass(frozen=True)
class Box:
    """A region in image coordinates, ``x2``/``y2`` exclusive; ``score`` = summed excess difference."""

    x1: int
    y1: int
    x2: int
    y2: int
    score: float = 0.0
    area: int = 0

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    def iou(self, other: Box) -> float:
        """Intersection over union with ``other``."""
        iw = max(0, min(self.x2, other.x2) - max(self.x1, other.x1))
        ih = max(0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = iw * ih
        union = self.width * self.height + other.width * other.height - inter
        return inter / union if union else 0.0

    def finds(self, truth: Box) -> bool:
        """The benchmarks' rule for a crop finding an annotated box: IoU >= 0.5 or the crop holds its centre."""
        cx, cy = (truth.x1 + truth.x2) / 2.0, (truth.y1 + truth.y2) / 2.0
        return self.x1 <= cx < self.x2 and self.y1 <= cy < self.y2 or self.iou(truth) >= 0.5


def normalise(grey: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Percentile stretch to float32 0-1, so gain/offset differences between test and template cancel."""
    lo, hi = np.percentile(grey, percentiles)
    if hi <= lo:
        return np.zeros(grey.shape, np.float32)
    return np.clip((grey.astype(np.float32) - lo) / float(hi - lo), 0.0, 1.0)


def _overlap(shape: tuple[int, int], dy: int, dx: int) -> tuple[slice, slice, slice, slice]:
    """Slices (test rows, test cols, template rows, template cols) where test[y, x] meets template[y+dy, x+dx]."""
    h, w = shape
    ty = slice(max(0, -dy), min(h, h - dy))
    tx = slice(max(0, -dx), min(w, w - dx))
    ry = slice(max(0, dy), min(h, h + dy))
    rx = slice(max(0, dx), min(w, w + dx))
    return ty, tx, ry, rx


def _search_shift(test: np.ndarray, template: np.ndarray, max_shift: int, centre: tuple[int, int]) -> tuple[int, int]:
    """Integer shift within ``max_shift`` of ``centre`` minimising the mean absolute difference on the overlap."""
    best, best_cost = centre, np.inf
    cy, cx = centre
    for dy in range(cy - max_shift, cy + max_shift + 1):
        for dx in range(cx - max_shift, cx + max_shift + 1):
            ty, tx, ry, rx = _overlap(test.shape, dy, dx)
            a, b = test[ty, tx], template[ry, rx]
            if a.size == 0:
                continue
            cost = float(np.abs(a - b).mean())
            if cost < best_cost:
                best, best_cost = (dy, dx), cost
    return best


def register(test: np.ndarray, template: np.ndarray, max_shift: int, method: str = "search") -> tuple[int, int]:
    """Integer ``(dy, dx)`` such that ``test[y, x]`` corresponds to ``template[y + dy, x + dx]``.

    ``search`` tries every shift up to ``max_shift`` on a downscaled pair (halved until the reach is 2 px), then
    refines by one pixel per level: defects are a tiny share of the pixels, so the mean absolute difference has a
    sharp minimum at the true shift. ``phase`` uses phase correlation (any shift, but a shift beyond ``max_shift``
    is treated as a failure and gives (0, 0)). Sub-pixel residuals are left to ``estimate_alignment`` and the
    tolerant difference.
    """
    if test.shape != template.shape:
        raise ValueError(f"test {test.shape} and template {template.shape} differ in size")
    if method == "none" or max_shift == 0:
        return 0, 0
    a = normalise(test) if test.dtype == np.uint8 else test.astype(np.float32)
    b = normalise(template) if template.dtype == np.uint8 else template.astype(np.float32)
    if method == "phase":
        from skimage.registration import phase_cross_correlation

        shift, _, _ = phase_cross_correlation(b, a, upsample_factor=1, normalization=None)
        dy, dx = (int(round(s)) for s in shift)
        if max(abs(dy), abs(dx)) > max_shift:
            return 0, 0
        return dy, dx
    if method != "search":
        raise ValueError(f"unknown registration method {method!r}")
    return _pyramid_search(a, b, max_shift)


def _pyramid_search(a: np.ndarray, b: np.ndarray, max_shift: int) -> tuple[int, int]:
    """Exhaustive search, coarse to fine: halve the images until the reach is small, then refine by +-1 px."""
    if max_shift <= 2 or min(a.shape) < 64:
        return _search_shift(a, b, max_shift, (0, 0))
    cy, cx = _pyramid_search(_downscale(a, 2), _downscale(b, 2), (max_shift + 1) // 2)
    return _search_shift(a, b, 1, (2 * cy, 2 * cx))


def _downscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean downscale by an integer factor (crops the remainder)."""
    if factor == 1:
        return img
    h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    return img[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def _affine_lk(a: np.ndarray, b: np.ndarray, model: np.ndarray, iterations: int, tol: float = 0.02) -> np.ndarray:
    """Gauss-Newton (Lucas-Kanade, forward additive) refinement of a 2x3 affine ``model`` mapping ``a`` onto ``b``.

    Plain least squares: defects are a small share of the pixels (robust weights were tried and only slowed
    convergence). Stops when no pixel moves by more than ``tol`` pixels.
    """
    h, w = a.shape
    # centred, scaled coordinates keep the 6x6 normal equations well conditioned
    sy = np.broadcast_to(((np.arange(h, dtype=np.float32) - h / 2.0) / h)[:, None], (h, w))
    sx = np.broadcast_to(((np.arange(w, dtype=np.float32) - w / 2.0) / w)[None, :], (h, w))
    inner = np.zeros((h, w), bool)
    inner[2:-2, 2:-2] = True
    for _ in range(iterations):
        # the gradient of the warped template stands in for the warped gradient (the warp is near identity)
        warped = ndi.affine_transform(b, model[:, :2], offset=model[:, 2], order=1, mode="nearest")
        gy, gx = np.gradient(warped)
        valid = inner & _covered(model, (h, w), 0.0)
        err = (a - warped)[valid]
        gyv, gxv, syv, sxv = gy[valid], gx[valid], sy[valid], sx[valid]
        jac = np.stack([gyv * syv, gyv * sxv, gyv, gxv * syv, gxv * sxv, gxv], axis=1)
        try:
            step = np.linalg.solve(jac.T @ jac, jac.T @ err)
        except np.linalg.LinAlgError:
            break
        # back from centred/scaled coordinates to pixel coordinates
        d = np.array(
            [
                [step[0] / h, step[1] / w, step[2] - step[0] / 2.0 - step[1] / 2.0],
                [step[3] / h, step[4] / w, step[5] - step[3] / 2.0 - step[4] / 2.0],
            ]
        )
        model = model + d
        # largest displacement change over the image, in pixels
        moved = max(
            abs(step[0]) / 2 + abs(step[1]) / 2 + abs(step[2]), abs(step[3]) / 2 + abs(step[4]) / 2 + abs(step[5])
        )
        if moved < tol:
            break
    return model


def estimate_alignment(test: np.ndarray, template: np.ndarray, params: LocalizeParams) -> np.ndarray:
    """2x3 affine ``M`` mapping test pixel ``(y, x, 1)`` to template coordinates.

    Starts from the global integer shift (``register``); with ``affine`` on, refines it to a full affine warp by
    Lucas-Kanade on blurred images, coarse to fine: scans and cameras differ by slight scale, rotation or skew,
    which a single shift leaves as misaligned edges growing across the image. A refinement that strays beyond
    ``max_shift`` or does not lower the difference is discarded (the global shift is kept).
    """
    a = test if test.dtype != np.uint8 else normalise(test, params.percentiles)
    b = template if template.dtype != np.uint8 else normalise(template, params.percentiles)
    dy, dx = register(a, b, params.max_shift, params.registration)
    shift = np.array([[1.0, 0.0, float(dy)], [0.0, 1.0, float(dx)]])
    h, w = a.shape
    if not params.affine or params.registration == "none" or min(h, w) < 32:
        return shift
    model = shift.copy()
    levels = [f for f in (4, 2) if min(h, w) // f >= 32]
    sa = sb = a
    for factor in levels:
        sa = ndi.gaussian_filter(_downscale(a, factor), params.affine_sigma)
        sb = ndi.gaussian_filter(_downscale(b, factor), params.affine_sigma)
        model = _from_level(_affine_lk(sa, sb, _to_level(model, factor), params.affine_iterations), factor)
    corners = np.array([[0, 0, 1], [0, w - 1, 1], [h - 1, 0, 1], [h - 1, w - 1, 1]], float)
    if not np.isfinite(model).all() or np.abs(corners @ model.T - corners[:, :2]).max() > params.max_shift + 1:
        return shift
    # keep the refinement only if it fits better than the plain shift (judged on the finest level used)
    factor = levels[-1] if levels else 1
    if _misfit(sa, sb, _to_level(model, factor)) < _misfit(sa, sb, _to_level(shift, factor)):
        return model
    return shift


def _to_level(model: np.ndarray, factor: int) -> np.ndarray:
    """Express a full-resolution affine model on a grid downscaled by ``factor`` (block means)."""
    off = (factor - 1) / 2.0  # a block's centre in full-resolution pixels
    out = model.copy()
    out[:, 2] = (model[:, 2] + model[:, :2] @ [off, off] - off) / factor
    return out


def _from_level(model: np.ndarray, factor: int) -> np.ndarray:
    """Inverse of ``_to_level``."""
    off = (factor - 1) / 2.0
    out = model.copy()
    out[:, 2] = model[:, 2] * factor + off - model[:, :2] @ [off, off]
    return out


def _warp(b: np.ndarray, model: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``b`` resampled onto the test grid by ``model`` (bilinear), and the mask of pixels it really covers."""
    h, w = b.shape
    if np.array_equal(model[:, :2], np.eye(2)) and np.array_equal(model[:, 2], np.round(model[:, 2])):
        dy, dx = int(model[0, 2]), int(model[1, 2])
        ty, tx, ry, rx = _overlap(b.shape, dy, dx)
        warped, valid = np.zeros_like(b), np.zeros(b.shape, bool)
        warped[ty, tx], valid[ty, tx] = b[ry, rx], True
        return warped, valid
    warped = ndi.affine_transform(b, model[:, :2], offset=model[:, 2], order=1, mode="nearest")
    return warped, _covered(model, (h, w), -0.5)


def _covered(model: np.ndarray, shape: tuple[int, int], margin: float) -> np.ndarray:
    """Pixels whose mapped position lies inside ``shape`` (grown by ``margin`` px; negative = shrunk)."""
    h, w = shape
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    my = model[0, 0] * yy + model[0, 1] * xx + model[0, 2]
    mx = model[1, 0] * yy + model[1, 1] * xx + model[1, 2]
    return (my >= -margin) & (my <= h - 1 + margin) & (mx >= -margin) & (mx <= w - 1 + margin)


def _misfit(a: np.ndarray, b: np.ndarray, model: np.ndarray) -> float:
    """Mean absolute difference between ``a`` and ``b`` warped by ``model``, over the covered pixels."""
    warped, valid = _warp(b, model)
    return float(np.abs(a - warped)[valid].mean()) if valid.any() else np.inf


def difference_map(test: np.ndarray, template: np.ndarray, params: LocalizeParams) -> np.ndarray:
    """Float 0-1 map (test's shape) of how far each test pixel lies outside its template neighbourhood.

    Both images are lighting-normalised and the template is resampled onto the test (``estimate_alignment``). A test
    pixel then counts as different only by its distance to the template's [min, max] within ``tolerance_radius``:
    an edge displaced by a pixel, or ringing along an edge, stays inside that range; missing or extra material does
    not. Only the test side is compared this way, so a defect thinner than the tolerance (a 1 px crack) survives.
    Pixels the template does not cover are 0.
    """
    a = normalise(test, params.percentiles)
    b = normalise(template, params.percentiles)
    warped, valid = _warp(b, estimate_alignment(a, b, params))
    size = 2 * params.tolerance_radius + 1
    bmin, bmax = ndi.minimum_filter(warped, size), ndi.maximum_filter(warped, size)
    d = np.maximum(a - bmax, 0) + np.maximum(bmin - a, 0)
    if params.local_reach > 0:
        d = _local_best(a, bmin, bmax, d, params.local_tile, params.local_reach, params.threshold)
    erode = params.tolerance_radius + params.local_reach
    if erode:
        valid = ndi.binary_erosion(valid, iterations=erode, border_value=1)
    d[~valid] = 0
    return d.astype(np.float32)


def _local_best(
    a: np.ndarray, bmin: np.ndarray, bmax: np.ndarray, d0: np.ndarray, tile: int, reach: int, threshold: float
) -> np.ndarray:
    """Per tile, the difference under the extra shift (within ``reach``) that explains the tile best.

    What remains after a global (affine) alignment is smooth but not affine (line-scan speed, board warp): each
    ``tile`` x ``tile`` block may move by a pixel or two more. A block takes the shift with the smallest summed
    difference; a defect is a small part of a block and does not vanish under a shift of a pixel or two, while
    misaligned edges do. The unshifted difference wins ties; blocks with nothing above ``threshold`` are skipped.
    """
    h, w = a.shape
    pmin = np.pad(bmin, reach, mode="edge")
    pmax = np.pad(bmax, reach, mode="edge")
    best = d0.copy()
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            if d0[y0:y1, x0:x1].max() <= threshold:
                continue
            at = a[y0:y1, x0:x1]
            best_cost = float(d0[y0:y1, x0:x1].sum())
            for sy in range(-reach, reach + 1):
                for sx in range(-reach, reach + 1):
                    if sy == 0 and sx == 0:
                        continue
                    ys, xs = slice(y0 + reach + sy, y1 + reach + sy), slice(x0 + reach + sx, x1 + reach + sx)
                    d = np.maximum(at - pmax[ys, xs], 0) + np.maximum(pmin[ys, xs] - at, 0)
                    cost = float(d.sum())
                    if cost < 0.99 * best_cost:
                        best_cost = cost
                        best[y0:y1, x0:x1] = d
    return best


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def boxes_from_difference(diff: np.ndarray, params: LocalizeParams) -> list[Box]:
    """Threshold, clean, label and merge: one Box per defect region, strongest first, at most ``max_crops``."""
    mask = diff > params.threshold
    if params.morph_radius > 0:
        mask = ndi.binary_opening(mask, structure=_disk(params.morph_radius))
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndi.sum_labels(np.ones_like(diff), labels, index).astype(int)
    scores = ndi.sum_labels(diff - params.threshold, labels, index)
    raw: list[Box] = []
    for i, sl in enumerate(ndi.find_objects(labels)):
        if sl is None or areas[i] < params.min_area:
            continue
        raw.append(Box(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, float(scores[i]), int(areas[i])))
    # a wrong template or a broken image can give thousands of regions: merge only the strongest ones
    raw = sorted(raw, key=lambda b: -b.score)[: 20 * params.max_crops]
    merged = merge_boxes(raw, params.merge_distance)
    merged.sort(key=lambda b: -b.score)
    return merged[: params.max_crops]


def _gap(a: Box, b: Box) -> int:
    """Chebyshev gap between two boxes (0 when they touch or overlap)."""
    gx = max(0, max(a.x1, b.x1) - min(a.x2, b.x2))
    gy = max(0, max(a.y1, b.y1) - min(a.y2, b.y2))
    return max(gx, gy)


def merge_boxes(boxes: list[Box], distance: int) -> list[Box]:
    """Union boxes whose gap is at most ``distance`` until none are that close (single-linkage)."""
    boxes = list(boxes)
    changed = True
    while changed:
        changed = False
        out: list[Box] = []
        for box in boxes:
            for j, other in enumerate(out):
                if _gap(box, other) <= distance:
                    out[j] = Box(
                        min(box.x1, other.x1),
                        min(box.y1, other.y1),
                        max(box.x2, other.x2),
                        max(box.y2, other.y2),
                        box.score + other.score,
                        box.area + other.area,
                    )
                    changed = True
                    break
            else:
                out.append(box)
        boxes = out
    return boxes


def find_defects(test: np.ndarray, template: np.ndarray, params: LocalizeParams) -> list[Box]:
    """Defect boxes in ``test`` (grey uint8, same size as ``template``), strongest first."""
    return boxes_from_difference(difference_map(test, template, params), params)


def crop_box(box: Box, shape: tuple[int, int], params: LocalizeParams) -> Box:
    """Square crop centred on ``box``: side = max(min_side, longest box side + margin), shifted to fit the image."""
    h, w = shape
    side = min(max(params.min_side, max(box.width, box.height) + params.margin), h, w)
    cx, cy = (box.x1 + box.x2) / 2.0, (box.y1 + box.y2) / 2.0
    x1 = int(min(max(round(cx - side / 2.0), 0), w - side))
    y1 = int(min(max(round(cy - side / 2.0), 0), h - side))
    return Box(x1, y1, x1 + side, y1 + side, box.score, box.area)


def crop_boxes(image: np.ndarray, boxes: list[Box], params: LocalizeParams) -> list[tuple[Box, np.ndarray]]:
    """One square patch per box (a copy, so it outlives the image), with the crop's own box."""
    out = []
    for box in boxes:
        c = crop_box(box, image.shape[:2], params)
        out.append((c, image[c.y1 : c.y2, c.x1 : c.x2].copy()))
    return out


def localize_file(test_path: Path, template_path: Path, params: LocalizeParams) -> list[tuple[Box, Box, np.ndarray]]:
    """Decode a test/template pair and return ``(defect box, crop box, patch)`` for every defect found.

    Raises:
        ImageDecodeError: from ``decode``.
        ValueError: when the two images differ in size.
    """
    test, _ = decode(Path(test_path))
    template, _ = decode(Path(template_path))
    if test.shape != template.shape:
        raise ValueError(f"{test_path} {test.shape} and its template {template_path} {template.shape} differ in size")
    boxes = find_defects(test, template, params)
    return [(box, crop, patch) for box, (crop, patch) in zip(boxes, crop_boxes(test, boxes, params), strict=True)]


@dataclass(frozen=True)
class Pairing:
    """Result of ``pair_templates``: image -> template, images with none, and files that are templates."""

    pairs: dict[str, str]
    missing: list[str]
    templates: list[str]


def pair_templates(
    images: list[str],
    templates_root: Path | None,
    images_root: Path,
    rule: str,
    test_suffix: str = "_test",
    template_suffix: str = "_temp",
) -> Pairing:
    """Find each image's template by ``rule`` (see the module docstring); nothing is dropped silently.

    ``images`` are paths relative to ``images_root`` (as ``datasets.discover`` lists them). Returned pairs map such
    a path to the template's file path (a string usable with ``decode``). ``missing`` are images without a template
    file; ``templates`` are entries of ``images`` that are themselves templates (suffix files, files under
    ``templates_root``, or the single golden image), which must not be labelled as inspected images.

    Raises:
        ValueError: unknown rule, or a ``templates_root`` that does not fit the rule.
    """
    images_root = Path(images_root)
    pairs: dict[str, str] = {}
    missing: list[str] = []
    templates: list[str] = []
    if rule == "single":
        if templates_root is None or not Path(templates_root).is_file():
            raise ValueError(
                f"rule 'single' needs one golden image file as templates, got {templates_root} "
                "(a folder of templates: rule same-name or suffix)"
            )
        golden = Path(templates_root).resolve()
        for rel in images:
            if (images_root / rel).resolve() == golden:
                templates.append(rel)
            else:
                pairs[rel] = str(templates_root)
    elif rule == "same-name":
        if templates_root is None or not Path(templates_root).is_dir():
            raise ValueError(
                f"rule 'same-name' needs a templates folder, got {templates_root} (one golden image: rule single)"
            )
        troot = Path(templates_root).resolve()
        if images_root.resolve().is_relative_to(troot):
            raise ValueError(
                f"rule 'same-name': templates folder {templates_root} contains the image folder "
                "(tests and templates side by side in one folder: rule suffix)"
            )
        for rel in images:
            if (images_root / rel).resolve().is_relative_to(troot):
                templates.append(rel)  # the template tree lies inside the image tree
                continue
            candidate = Path(templates_root) / rel
            if candidate.is_file():
                pairs[rel] = str(candidate)
            else:
                missing.append(rel)
    elif rule == "suffix":
        if not test_suffix or not template_suffix or test_suffix == template_suffix:
            raise ValueError("rule 'suffix' needs two different, non-empty suffixes")
        base = Path(templates_root) if templates_root is not None else images_root
        if not base.is_dir():
            raise ValueError(f"rule 'suffix': templates folder not found: {base}")
        for rel in images:
            p = Path(rel)
            if p.stem.endswith(template_suffix):
                templates.append(rel)
            elif p.stem.endswith(test_suffix):
                name = p.stem[: -len(test_suffix)] + template_suffix + p.suffix
                candidate = base / p.parent / name
                if candidate.is_file():
                    pairs[rel] = str(candidate)
                else:
                    missing.append(rel)
            else:
                missing.append(rel)
    else:
        raise ValueError(f"unknown pairing rule {rule!r}: use same-name, suffix or single")
    return Pairing(pairs=pairs, missing=missing, templates=templates)


PATCH_COLUMNS = [
    "patch",
    "kind",
    "image",
    "image_sha256",
    "template",
    "template_sha256",
    "x0",
    "y0",
    "x1",
    "y1",
    "crop_x0",
    "crop_y0",
    "crop_x1",
    "crop_y1",
    "score",
    "area",
]
UNLOCALIZED_COLUMNS = ["image", "action", "reason", "template"]
_TABLES = ("boxes.csv", "unlocalized.csv")


@dataclass(frozen=True)
class LocalizeResult:
    """What ``localize_folder`` did: counts for metrics.json, and the failures with their reasons."""

    out_dir: Path
    images: int  # image files found under the image folder (templates among them and rejected files included)
    pairs: int  # images with a template under the rule
    localized: int  # paired images that gave at least one defect patch
    no_defect: int  # paired images identical to their template (within tolerance): no patch
    patches: int  # defect patches written
    whole: int  # images copied whole into the patch folder (unpaired or failed, localize.unpaired: passthrough)
    skipped: int  # images neither localised nor copied (localize.unpaired: skip)
    unpaired: int  # images without a template file
    templates_excluded: int  # template files found among the images: never labelled
    rejected: int  # image files never read (see datasets.discover)
    ignored: int  # other files under the image folder (not images)
    failures: tuple[tuple[str, str], ...]  # (image, reason): decode errors, size mismatches, unreadable templates
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready counts; failures become a count per reason (every one is listed in unlocalized.csv)."""
        reasons: dict[str, int] = {}
        for _, reason in self.failures:
            key = reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        return {
            "n_images": self.images,
            "n_pairs": self.pairs,
            "n_localized": self.localized,
            "n_no_defect": self.no_defect,
            "n_patches": self.patches,
            "n_whole": self.whole,
            "n_skipped": self.skipped,
            "n_unpaired": self.unpaired,
            "n_templates_excluded": self.templates_excluded,
            "n_rejected": self.rejected,
            "n_ignored": self.ignored,
            "n_failures": len(self.failures),
            "failure_reasons": dict(sorted(reasons.items())),
            "patches_per_localized_image": round(self.patches / self.localized, 3) if self.localized else 0.0,
            "seconds": round(self.seconds, 2),
        }


def check_templates(templates: Path | None, images_root: Path, rule: str) -> None:
    """Fail early (before any work) when ``templates`` cannot fit ``rule``; the message says which rule would.

    Raises:
        ValueError: a rule that needs a folder got a file or the other way round, or no templates for a rule that
            needs them.
    """
    if rule == "suffix":
        if templates is not None and not Path(templates).is_dir():
            raise ValueError(f"rule 'suffix' needs a templates folder (or the image folder itself), got {templates}")
        return
    pair_templates([], templates, images_root, rule)


def _patch_name(rel: str, i: int, crop: Box) -> str:
    return f"{rel}__{i}_{crop.x1}_{crop.y1}.png"


def _png(patch: np.ndarray) -> bytes:
    """PNG bytes of a grey patch; Pillow writes no time stamp, so the bytes depend on the pixels only."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="PNG")
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` unless the file already holds exactly it (keeps mtimes, so mirroring and DVC skip it).

    Written through a hidden temporary file and a rename, so an interrupted run never leaves a truncated patch.
    """
    import os

    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _csv_bytes(columns: list[str], rows: list[dict[str, object]]) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _prepare_out_dir(out_dir: Path, images_root: Path, templates: Path | None) -> None:
    """Refuse an output folder that overlaps the inputs or holds something else than an earlier run's patches."""
    out, src = out_dir.resolve(), images_root.resolve()
    for other, what in ((src, "image folder"), (templates.resolve() if templates else None, "templates")):
        if other is None:
            continue
        if out == other or out.is_relative_to(other) or other.is_relative_to(out):
            raise ValueError(f"the patch folder {out_dir} must not overlap the {what} {other}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "boxes.csv").is_file():
        raise ValueError(f"{out_dir} is not empty and holds no boxes.csv: not a patch folder, refusing to clear it")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "boxes.csv").is_file():  # marks the folder as ours at once, so a crashed run can be re-run
        _write_if_changed(out_dir / "boxes.csv", _csv_bytes(PATCH_COLUMNS, []))


def _remove_stale(out_dir: Path, keep: set[str]) -> int:
    """Delete every file of ``out_dir`` that this run did not write (and empty folders); return how many."""
    removed = 0
    for path in sorted(out_dir.rglob("*"), reverse=True):
        rel = path.relative_to(out_dir).as_posix()
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif rel not in keep:
            path.unlink()
            removed += 1
    return removed


def localize_folder(
    images_root: Path,
    templates: Path | None,
    out_dir: Path,
    params: LocalizeParams,
    log: Callable[[str], None] | None = None,
) -> LocalizeResult:
    """Localise defects in every image under ``images_root`` and write the patches to ``out_dir``.

    Images are paired with templates by ``params.rule`` (module docstring), processed one at a time (only one
    image, its template and its patches are in memory), and every input file ends up in ``boxes.csv`` (as a patch
    source) or ``unlocalized.csv`` (with a reason). An image without a usable template (none found, unreadable,
    or of another size) is copied whole into ``out_dir`` with ``params.unpaired == "passthrough"`` and only listed
    with ``"skip"``. An image that cannot be decoded is always copied unchanged, so the validate step quarantines it
    with the same reason as in a run without templates. Serial on purpose: two processes did not pay on 2 shared
    cores (bench/RESULTS.md).

    Raises:
        FileNotFoundError: ``images_root`` is missing.
        ValueError: ``templates`` does not fit the rule, or ``out_dir`` overlaps the inputs or is a foreign folder.
    """
    import time

    from tasks.datasets import ImageDecodeError, discover

    start = time.perf_counter()
    images_root, out_dir = Path(images_root), Path(out_dir)
    templates = Path(templates) if templates is not None else None
    found = discover(images_root)
    check_templates(templates, images_root, params.rule)
    pairing = pair_templates(
        found.images, templates, images_root, params.rule, params.test_suffix, params.template_suffix
    )
    _prepare_out_dir(out_dir, images_root, templates)
    troot = (templates.parent if templates.is_file() else templates) if templates is not None else images_root
    is_template, missing = set(pairing.templates), set(pairing.missing)
    patch_rows: list[dict[str, object]] = []
    other_rows: list[dict[str, object]] = [
        {"image": rel, "action": "rejected", "reason": reason, "template": ""} for rel, reason in found.rejected
    ]
    written: set[str] = set()
    failures: list[tuple[str, str]] = []
    counts = dict.fromkeys(("localized", "no_defect", "patches", "whole", "skipped"), 0)
    template_cache: dict[str, tuple[str, np.ndarray | None, str]] = {}  # path -> (sha256, pixels, error)

    def template_rel(path: str) -> str:
        p = Path(path)
        return p.relative_to(troot).as_posix() if p.is_relative_to(troot) else str(p)

    def load_template(path: str) -> tuple[str, np.ndarray | None, str]:
        if path not in template_cache:
            template_cache.clear()  # one entry: enough for `single`, bounded memory for the other rules
            try:
                template_cache[path] = (_sha256(Path(path)), decode(Path(path))[0], "")
            except ImageDecodeError as exc:
                template_cache[path] = ("", None, f"unusable template: {exc.reason}")
            except OSError as exc:
                template_cache[path] = ("", None, f"unusable template: {exc.strerror or exc}")
        return template_cache[path]

    def keep_whole(rel: str, sha: str, template: str, reason: str, always: bool = False) -> None:
        if always or params.unpaired == "passthrough":
            if rel in written:
                raise ValueError(f"{rel} is both an image and the name of a patch; rename it")
            _write_if_changed(out_dir / rel, (images_root / rel).read_bytes())
            written.add(rel)
            counts["whole"] += 1
            patch_rows.append({"patch": rel, "kind": "whole", "image": rel, "image_sha256": sha, "template": template})
            other_rows.append({"image": rel, "action": "passthrough", "reason": reason, "template": template})
        else:
            counts["skipped"] += 1
            other_rows.append({"image": rel, "action": "skipped", "reason": reason, "template": template})

    for n, rel in enumerate(found.images, start=1):
        if log is not None and n % 100 == 0:
            log(f"localize: {n}/{len(found.images)} images, {counts['patches']} patches")
        if rel in is_template:
            other_rows.append({"image": rel, "action": "template", "reason": f"template (rule {params.rule})"})
            continue
        sha = _sha256(images_root / rel)
        if rel in missing:
            keep_whole(rel, sha, "", "no template")
            continue
        tpath = pairing.pairs[rel]
        tname = template_rel(tpath)
        try:
            test, _ = decode(images_root / rel)
        except ImageDecodeError as exc:
            failures.append((rel, f"undecodable image: {exc.reason}"))
            keep_whole(rel, sha, tname, f"undecodable image: {exc.reason}", always=True)
            continue
        tsha, template, error = load_template(tpath)
        if template is not None and template.shape != test.shape:
            (th, tw), (h, w) = template.shape, test.shape
            error = f"size mismatch: template {tw}x{th}, image {w}x{h}"
        if error:
            failures.append((rel, error))
            keep_whole(rel, sha, tname, error)
            continue
        boxes = find_defects(test, template, params)
        if not boxes:
            counts["no_defect"] += 1
            other_rows.append(
                {"image": rel, "action": "no-defect", "reason": "no difference to the template", "template": tname}
            )
            continue
        counts["localized"] += 1
        for i, (box, (crop, patch)) in enumerate(zip(boxes, crop_boxes(test, boxes, params), strict=True)):
            name = _patch_name(rel, i, crop)
            _write_if_changed(out_dir / name, _png(patch))
            written.add(name)
            counts["patches"] += 1
            patch_rows.append(
                {
                    "patch": name,
                    "kind": "defect",
                    "image": rel,
                    "image_sha256": sha,
                    "template": tname,
                    "template_sha256": tsha,
                    **dict(zip(PATCH_COLUMNS[6:10], (box.x1, box.y1, box.x2, box.y2), strict=True)),
                    **dict(zip(PATCH_COLUMNS[10:14], (crop.x1, crop.y1, crop.x2, crop.y2), strict=True)),
                    "score": f"{box.score:.4f}",
                    "area": box.area,
                }
            )
    # whole images whose name looks like a patch of another image would be silently overwritten: refuse instead
    if len(written) != len(patch_rows):
        raise ValueError("an image name collides with a patch name; rename the image")
    other_rows.sort(key=lambda r: str(r["image"]))
    _write_if_changed(out_dir / "boxes.csv", _csv_bytes(PATCH_COLUMNS, patch_rows))
    _write_if_changed(out_dir / "unlocalized.csv", _csv_bytes(UNLOCALIZED_COLUMNS, other_rows))
    _remove_stale(out_dir, written | set(_TABLES))
    return LocalizeResult(
        out_dir=out_dir,
        images=len(found.images) + len(found.rejected),
        pairs=len(pairing.pairs),
        unpaired=len(pairing.missing),
        templates_excluded=len(pairing.templates),
        rejected=len(found.rejected),
        ignored=len(found.ignored),
        failures=tuple(failures),
        seconds=time.perf_counter() - start,
        **counts,
    )
