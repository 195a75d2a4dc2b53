"""Built-in synthetic AOI data set: IC-package surface crops with seven defect classes, three machines.

The pipeline needs data that behaves like a real inspection line without shipping any: a long-tailed class
mix, several machines with different sensors and file formats, file names that do not leak the label, and a
few planted bad files (corrupt, blank, blurred, duplicate) so that validation has something to catch.

Every scene is rendered at one canonical resolution in relative units, then "photographed" by a machine
(area down-sampling to its size, gain, noise, gamma, colour cast, bit depth, format). So a defect covers the
same share of the image on every machine, and only the sensor differs.

Everything is drawn from ``numpy.random.Generator`` seeded by ``seed`` (one child stream per image), and the
encoders write no timestamps: the same ``(n, seed)`` gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from tasks.datasets import to_grey_u8

CLASS_SHARES: dict[str, float] = {
    "defect-free": 0.354,
    "scratch": 0.20,
    "particle": 0.15,
    "void": 0.12,
    "discoloration": 0.09,
    "crack": 0.07,
    "chip-out": 0.016,
}
"""Long-tailed class mix (sums to 1). The rarest class is at most 1/20 of the largest for every n >= 282; below
that the floor of 3 images per class wins."""

CLASSES: tuple[str, ...] = tuple(CLASS_SHARES)
MIN_PER_CLASS = 3
MIN_N = 50
PLANTED_KINDS: tuple[str, ...] = ("corrupt", "blank", "blurred", "duplicate")
PLANTED_SHARE = 0.01

_CANVAS = 128  # canonical render side (px) = the largest machine; the others down-sample from it
_SUPERSAMPLE = 2  # drawn shapes are rasterised at 2x and reduced, for anti-aliasing
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Machine:
    """One simulated inspection machine: how it turns scene radiance into a file."""

    name: str
    size: int
    ext: str
    gain: float
    gamma: float
    noise: float  # read noise, std on the 0-1 scale
    shot: float  # signal-dependent noise: std = shot * sqrt(signal)
    cast: tuple[float, float, float] | None  # per-channel colour cast; None = grey sensor
    bits: int
    share: float


MACHINES: tuple[Machine, ...] = (
    Machine("machine-a", 96, ".png", gain=1.0, gamma=1.0, noise=0.006, shot=0.004, cast=None, bits=8, share=0.4),
    Machine("machine-b", 128, ".png", gain=1.3, gamma=0.8, noise=0.011, shot=0.009, cast=None, bits=16, share=0.35),
    Machine(
        "machine-c", 80, ".jpg", gain=0.8, gamma=1.2, noise=0.012, shot=0.008, cast=(1.06, 1, 0.88), bits=8, share=0.25
    ),
)
_JPEG_QUALITY = 90
_PNG_LEVEL = 1  # fast zlib level: files ~10 % larger, encoding several times faster
# Blurred plants only go to 8-bit machines: datasets.decode min-max stretches 16-bit images to 0-255, and the
# re-quantisation of a full-range smooth image alone gives a Laplacian variance near 1.7, so a blurred 16-bit
# image could not be told from a sharp one by the sharpness check. For the same reason they are never chip-outs
# (the blurred step to the bright substrate would stay "sharp" after 8-bit quantisation).
_BLUR_MACHINES = ("machine-a", "machine-c")
_CORRUPT_MACHINES = ("machine-a", "machine-b")  # "a valid PNG truncated to half its bytes" needs PNG machines
_BLUR_TRIES = 60
_BLUR_MAX_SHARPNESS = 0.6  # at 128 px; the pipeline (small images unenlarged) reads these <= ~1.1, flags < 2.0
_BLUR_MIN_CONTRAST = 2.5  # the pipeline flags std < 2.0 as blank; a blurred frame must not look blank


@dataclass(frozen=True)
class SynthReport:
    """What `generate` wrote, so callers (the synth stage, tests) need not re-read the folder."""

    out: Path
    n_images: int  # image files written, bad ones included
    class_counts: dict[str, int]
    planted: list[tuple[str, str]]  # (relative path, kind) of planted bad files


def class_counts(n: int) -> dict[str, int]:
    """Per-class image counts for ``n`` images: largest-remainder rounding of the shares, then every class
    raised to at least 3 by taking from the largest ones, so small sets still contain every class.

    Raises:
        ValueError: if ``n`` < 50.
    """
    if n < MIN_N:
        raise ValueError(f"n must be at least {MIN_N} (every class needs {MIN_PER_CLASS} images), got {n}")
    quotas = [n * share for share in CLASS_SHARES.values()]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        while counts[i] < MIN_PER_CLASS:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            counts[donor] -= 1
            counts[i] += 1
    return dict(zip(CLASSES, counts, strict=True))


def _largest_remainder(n: int, shares: list[float]) -> list[int]:
    quotas = [n * s / sum(shares) for s in shares]
    counts = [math.floor(q) for q in quotas]
    for i in sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------------------------------------------
# Scene rendering (canonical resolution, radiance on a 0-1 scale)
# --------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _lowfreq(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth random field (about zero mean, unit std) with about ``cells`` bumps across: cheap large-scale noise.

    Bicubic up-sampling of white noise keeps about 0.82 of its std whatever the factor, so no full-size pass is
    needed to normalise it.
    """
    small = rng.standard_normal((cells, cells), dtype=np.float32)
    small -= small.mean()
    big = Image.fromarray(small / 0.82).resize((_CANVAS, _CANVAS), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32)


class _Pen:
    """Rasterises lines and polygons at 2x and returns an anti-aliased 0-1 coverage mask at canvas size."""

    def __init__(self) -> None:
        self.img = Image.new("L", (_CANVAS * _SUPERSAMPLE, _CANVAS * _SUPERSAMPLE), 0)
        self.draw = ImageDraw.Draw(self.img)

    def polyline(self, pts: np.ndarray, widths: np.ndarray, values: np.ndarray | None = None) -> None:
        s = _SUPERSAMPLE
        for k in range(len(pts) - 1):
            w = max(1, int(round(float(widths[k]) * s)))
            fill = 255 if values is None else int(np.clip(values[k], 0, 1) * 255)
            a, b = (float(pts[k, 0]) * s, float(pts[k, 1]) * s), (float(pts[k + 1, 0]) * s, float(pts[k + 1, 1]) * s)
            self.draw.line([a, b], fill=fill, width=w)
            if w >= 3:  # round joints, otherwise thick segments leave notches
                r = w / 2
                self.draw.ellipse([b[0] - r, b[1] - r, b[0] + r, b[1] + r], fill=fill)

    def polygon(self, pts: np.ndarray, fill: int = 255) -> None:
        self.draw.polygon([(float(x) * _SUPERSAMPLE, float(y) * _SUPERSAMPLE) for x, y in pts], fill=fill)

    def mask(self) -> np.ndarray:
        return np.asarray(self.img.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def _shifted(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a`` moved by whole pixels, zero-filled (a cheap stand-in for sub-pixel shifts of soft masks)."""
    out = np.zeros_like(a)
    h, w = a.shape
    src = a[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    out[max(dy, 0) : max(dy, 0) + src.shape[0], max(dx, 0) : max(dx, 0) + src.shape[1]] = src
    return out


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, rough: float, aspect: float = 1.0) -> np.ndarray:
    """Irregular closed outline (x, y rows): a circle with smooth random radial wobble, optionally stretched."""
    m = int(rng.integers(14, 24))
    t = np.sort(rng.uniform(0, 2 * np.pi, m)) if rng.random() < 0.5 else np.linspace(0, 2 * np.pi, m, endpoint=False)
    harmonics = sum(rng.normal(0, rough / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in range(1, 6))
    rad = r * np.clip(1 + harmonics + rng.normal(0, rough * 0.25, m), 0.35, 1.9)
    rot = rng.uniform(0, np.pi)
    x, y = rad * np.cos(t) * aspect, rad * np.sin(t) / aspect
    return np.stack([cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot)], axis=1)


def _defect_centre(rng: np.random.Generator) -> tuple[float, float]:
    spread = 0.07 if rng.random() < 0.8 else 0.15
    cx, cy = np.clip(rng.normal(0.5, spread, 2), 0.25, 0.75) * _CANVAS
    return float(cx), float(cy)


@dataclass
class _Scene:
    """Radiance image plus what later layers need: substrate brightness, light direction, optional stain tint."""

    img: np.ndarray
    substrate: float
    light: float  # direction the light comes from (radians, image coordinates)
    tint_mask: np.ndarray | None = None
    tint: np.ndarray | None = None


def _edge_mask(angle: float, dist: float, ox: float, oy: float) -> np.ndarray:
    """Signed distance (px) beyond a straight package edge: > 0 outside the package. Normal at ``angle``."""
    yy, xx = _grid()
    return (xx - ox) * math.cos(angle) + (yy - oy) * math.sin(angle) - dist


def _add_package_edges(scene: _Scene, rng: np.random.Generator, signed: list[np.ndarray]) -> None:
    """Bright substrate beyond the package edge(s), with a narrow bevel highlight along the edge."""
    outside = np.maximum.reduce(signed) if len(signed) > 1 else signed[0]
    cover = np.clip(outside + 0.5, 0, 1)  # anti-aliased half-plane(s)
    substrate = scene.substrate * (1 + 0.04 * _lowfreq(rng, 6))
    bevel_w = _CANVAS * rng.uniform(0.008, 0.025)
    bevel = np.exp(-(((outside + bevel_w) / bevel_w) ** 2)) * rng.uniform(0.08, 0.25)
    scene.img = scene.img * (1 - cover) + substrate * cover + bevel * (1 - cover)


def _render_background(rng: np.random.Generator) -> tuple[_Scene, np.ndarray]:
    """Dark epoxy mould compound with fine filler grain and mottling; returns the scene and its grain layer."""
    base = rng.uniform(0.19, 0.32)
    grain_sigma = rng.uniform(0.45, 0.85)
    grain = ndimage.gaussian_filter(rng.standard_normal((_CANVAS, _CANVAS), dtype=np.float32), grain_sigma)
    grain /= grain.std() + 1e-6
    grain *= base * rng.uniform(0.10, 0.16)
    mottle = _lowfreq(rng, int(rng.integers(3, 7))) * base * rng.uniform(0.02, 0.05)
    img = np.full((_CANVAS, _CANVAS), base, dtype=np.float32) + mottle
    scene = _Scene(img=img, substrate=rng.uniform(0.55, 0.85), light=rng.uniform(0, 2 * np.pi))
    return scene, grain


def _add_marking(scene: _Scene, rng: np.random.Generator) -> None:
    """Fragment of laser marking: a few stroke glyphs, lighter than the compound, cut by the image border."""
    pen = _Pen()
    h = _CANVAS * rng.uniform(0.14, 0.24)
    w = h * 0.6
    stroke = h * rng.uniform(0.10, 0.16)
    top = rng.choice([rng.uniform(-0.35, 0.05) * h, _CANVAS - rng.uniform(0.6, 1.0) * h])
    x = rng.uniform(-0.5, 0.3) * w
    # 7-segment style strokes: endpoints on a 2 x 3 lattice
    segs = [((0, 0), (1, 0)), ((1, 0), (1, 1)), ((1, 1), (1, 2)), ((0, 2), (1, 2)), ((0, 1), (0, 2)),
            ((0, 0), (0, 1)), ((0, 1), (1, 1)), ((0, 0), (1, 1)), ((0, 2), (1, 1))]  # fmt: skip
    while x < _CANVAS:
        on = rng.random(len(segs)) < 0.5
        on[6] |= not on.any()
        for (ax, ay), (bx, by) in (s for s, keep in zip(segs, on, strict=True) if keep):
            pts = np.array([[x + ax * w, top + ay * h / 2], [x + bx * w, top + by * h / 2]], dtype=np.float32)
            pen.polyline(pts, np.array([stroke]))
        x += w * rng.uniform(1.35, 1.6)
    mask = pen.mask()
    scene.img += mask * rng.uniform(0.05, 0.12) * (1 + 0.3 * _lowfreq(rng, 24))


def _add_dimple(scene: _Scene, grain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pin-1 dimple: a large shallow polished disc near a corner, smoother and a little different in tone."""
    yy, xx = _grid()
    cx, cy = (rng.choice([0.0, 1.0], 2) + rng.uniform(-0.12, 0.12, 2)) * _CANVAS
    cx, cy = float(np.clip(cx, -0.05 * _CANVAS, 1.05 * _CANVAS)), float(np.clip(cy, -0.05 * _CANVAS, 1.05 * _CANVAS))
    r = _CANVAS * rng.uniform(0.16, 0.28)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    inside = np.clip(r - d + 0.5, 0, 1)
    rim = np.exp(-(((d - r) / (0.008 * _CANVAS)) ** 2))
    scene.img += inside * rng.uniform(-0.03, 0.03) + rim * rng.uniform(0.02, 0.05)
    return grain * (1 - 0.55 * inside)


def _crack(scene: _Scene, rng: np.random.Generator) -> None:
    """Thin dark jagged polyline at any angle and length, sometimes branching; faint bright lip on one side."""
    cx, cy = _defect_centre(rng)
    theta = rng.uniform(0, 2 * np.pi)
    length = _CANVAS * float(np.exp(rng.uniform(np.log(0.15), np.log(0.95))))
    width = _CANVAS * rng.uniform(0.008, 0.018)

    def walk(x0: float, y0: float, heading: float, total: float) -> np.ndarray:
        step = _CANVAS * rng.uniform(0.012, 0.03)
        pts, ang = [(x0, y0)], heading
        for _ in range(max(2, int(total / step))):
            ang = heading + 0.55 * (ang - heading) + rng.normal(0, 0.45)
            x0, y0 = x0 + step * math.cos(ang), y0 + step * math.sin(ang)
            pts.append((x0, y0))
        return np.array(pts, dtype=np.float32)

    main = walk(cx - 0.5 * length * math.cos(theta), cy - 0.5 * length * math.sin(theta), theta, length)
    pen = _Pen()
    taper = np.minimum(1.0, 0.35 + np.minimum(np.arange(len(main) - 1), np.arange(len(main) - 1)[::-1]) * 0.25)
    pen.polyline(main, width * taper * rng.uniform(0.8, 1.2, len(main) - 1))
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        k = int(rng.integers(1, len(main) - 1))
        heading = theta + rng.choice([-1, 1]) * rng.uniform(0.35, 1.1)
        branch = walk(float(main[k, 0]), float(main[k, 1]), heading, length * rng.uniform(0.2, 0.5))
        pen.polyline(branch, width * np.linspace(0.8, 0.35, len(branch) - 1))
    mask = pen.mask()
    dx, dy = math.cos(scene.light), math.sin(scene.light)
    lip = _shifted(mask, round(dy * 1.4), round(dx * 1.4)) * (1 - mask)
    scene.img = scene.img * (1 - mask * rng.uniform(0.75, 0.95)) + lip * rng.uniform(0.03, 0.1)


def _chip_out(scene: _Scene, rng: np.random.Generator, grain: np.ndarray) -> np.ndarray:
    """Irregular bite out of the package edge or corner, showing the bright substrate and a fracture face."""
    cx, cy = _defect_centre(rng)
    side = float(rng.integers(0, 4)) * np.pi / 2 + rng.normal(0, 0.03)
    dist = _CANVAS * rng.uniform(0.0, 0.18)
    signed = [_edge_mask(side, dist, cx, cy)]
    # nearest point of the edge to the defect centre
    qx, qy = cx + dist * math.cos(side), cy + dist * math.sin(side)
    if rng.random() < 0.35:  # corner: a second, perpendicular edge through the same point
        side2 = side + rng.choice([-1, 1]) * np.pi / 2
        signed.append(_edge_mask(side2, 0.0, qx, qy))
    else:
        along = rng.normal(0, 0.06) * _CANVAS
        qx, qy = qx - along * math.sin(side), qy + along * math.cos(side)
    r = _CANVAS * float(np.exp(rng.uniform(np.log(0.07), np.log(0.22))))
    pen = _Pen()
    pen.polygon(_blob(rng, qx, qy, r, rough=rng.uniform(0.12, 0.3), aspect=rng.uniform(1.0, 1.7)))
    bite = pen.mask()
    outside = np.maximum.reduce(signed) if len(signed) > 1 else signed[0]
    in_pkg = np.clip(0.5 - outside, 0, 1)
    chip = bite * in_pkg
    # fracture face: a rough sloped wall, dim at the broken rim, the bright substrate showing deeper in
    depth = np.clip(ndimage.gaussian_filter(bite, r * 0.25, truncate=2.5) * 2.2 - 1.0, 0, 1)
    rough = ndimage.gaussian_filter(rng.standard_normal(chip.shape, dtype=np.float32), 0.8)
    face = scene.substrate * (0.5 + 0.5 * depth) * (1 + rng.uniform(0.1, 0.25) * rough * (1 - depth))
    _add_package_edges(scene, rng, signed)
    rim = np.clip(bite - ndimage.grey_erosion(bite, size=3), 0, 1) * in_pkg
    scene.img = scene.img * (1 - chip) + face * chip - rim * scene.substrate * rng.uniform(0.15, 0.35)
    return grain * (1 - np.maximum(chip, np.clip(outside + 0.5, 0, 1)))


def _void(scene: _Scene, rng: np.random.Generator) -> None:
    """One or a few round pits: dark bowl, bright rim on the lit side, bright crescent on the far inner wall."""
    yy, xx = _grid()
    cx, cy = _defect_centre(rng)
    count = 1 if rng.random() < 0.6 else int(rng.integers(2, 5))
    lx, ly = math.cos(scene.light), math.sin(scene.light)
    for i in range(count):
        r = _CANVAS * float(np.exp(rng.uniform(np.log(0.02), np.log(0.09 if count == 1 else 0.05))))
        px, py = (cx, cy) if i == 0 else (cx + rng.normal(0, 0.08) * _CANVAS, cy + rng.normal(0, 0.08) * _CANVAS)
        dx, dy = xx - px, yy - py
        d = np.sqrt(dx * dx + dy * dy) / r
        facing = (dx * lx + dy * ly) / (d * r + 1e-3)  # +1 towards the light
        inside = np.clip((1 - d) * r + 0.5, 0, 1)
        bowl = 0.25 + 0.6 * np.clip(d, 0, 1) ** 2
        rim_w = rng.uniform(0.15, 0.4)
        rim = np.exp(-(((d - 1 - rim_w / 2) / (rim_w / 2)) ** 2)) * (0.45 + 0.55 * np.clip(facing, 0, 1))
        crescent = inside * np.clip(-facing, 0, 1) * np.exp(-(((d - 0.75) / 0.2) ** 2))
        scene.img = scene.img * (1 - inside * (1 - bowl * rng.uniform(0.3, 0.8)))
        scene.img += rim * rng.uniform(0.08, 0.25) + crescent * rng.uniform(0.05, 0.2)


def _scratch(scene: _Scene, rng: np.random.Generator) -> None:
    """Long thin bright line(s), straight or gently curved, smooth, fading at the ends."""
    cx, cy = _defect_centre(rng)
    theta = rng.uniform(0, np.pi)
    length = _CANVAS * rng.uniform(0.45, 1.4)
    bend = length * (rng.uniform(-0.1, 0.1) if rng.random() < 0.5 else 0.0)
    width = _CANVAS * rng.uniform(0.005, 0.013)
    pen = _Pen()
    count = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
    t = np.linspace(-0.5, 0.5, 40, dtype=np.float32)
    for i in range(count):
        off = 0.0 if i == 0 else rng.uniform(-0.12, 0.12) * _CANVAS
        ang = theta + (0 if i == 0 else rng.normal(0, 0.06))
        ln = length * (1 if i == 0 else rng.uniform(0.4, 1.0))
        ux, uy, nx, ny = math.cos(ang), math.sin(ang), -math.sin(ang), math.cos(ang)
        sag = bend * (1 - 4 * t**2) + off
        pts = np.stack([cx + t * ln * ux + sag * nx, cy + t * ln * uy + sag * ny], axis=1)
        fade = np.clip((0.5 - np.abs(t[:-1])) * rng.uniform(4, 12), 0, 1)
        vals = fade * (0.7 + 0.3 * np.cos(t[:-1] * rng.uniform(3, 12) + rng.uniform(0, 6)))
        pen.polyline(pts, np.full(len(t) - 1, width * (1 if i == 0 else rng.uniform(0.6, 1.0))), vals)
    mask = pen.mask()
    halo = ndimage.gaussian_filter(mask, 0.01 * _CANVAS, truncate=3.0)
    scene.img += mask * rng.uniform(0.25, 0.55) + halo * rng.uniform(0.02, 0.08)


def _particle(scene: _Scene, rng: np.random.Generator, grain: np.ndarray) -> np.ndarray:
    """Compact foreign particle, bright or dark, many sizes, with a soft shadow cast away from the light."""
    cx, cy = _defect_centre(rng)
    r = _CANVAS * float(np.exp(rng.uniform(np.log(0.02), np.log(0.12))))
    pen = _Pen()
    pen.polygon(_blob(rng, cx, cy, r, rough=rng.uniform(0.08, 0.3), aspect=rng.uniform(1.0, 1.6)))
    mask = pen.mask()
    sx, sy = -math.cos(scene.light) * r * rng.uniform(0.2, 0.45), -math.sin(scene.light) * r * rng.uniform(0.2, 0.45)
    shadow = ndimage.gaussian_filter(_shifted(mask, round(sy), round(sx)), max(1.0, r * 0.3), truncate=2.5)
    scene.img = scene.img * (1 - shadow * rng.uniform(0.3, 0.6))
    body = _lowfreq(rng, 32) * 0.08
    if rng.random() < 0.6:
        tone = rng.uniform(0.55, 0.95) * (1 + body)
        yy, xx = _grid()
        hx, hy = cx + math.cos(scene.light) * r * 0.35, cy + math.sin(scene.light) * r * 0.35
        tone = tone + 0.15 * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.3 * r) ** 2))
    else:
        tone = rng.uniform(0.02, 0.08) * (1 + body)
    scene.img = scene.img * (1 - mask) + tone * mask
    return grain * (1 - mask)


def _discoloration(scene: _Scene, rng: np.random.Generator) -> None:
    """Large, soft-edged, low-contrast stain: brighter, sometimes tinted, sometimes with a drying ring."""
    yy, xx = _grid()
    cx, cy = _defect_centre(rng)
    r = _CANVAS * rng.uniform(0.15, 0.4)
    aspect = rng.uniform(1.0, 1.6)
    rot = rng.uniform(0, np.pi)
    u = ((xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)) / (r * aspect)
    v = (-(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)) * aspect / r
    field = 1 - np.sqrt(u * u + v * v) + 0.25 * _lowfreq(rng, int(rng.integers(4, 9)))
    softness = rng.uniform(0.06, 0.2)
    mask = 0.5 + 0.5 * np.tanh(field / (2 * softness))  # logistic, overflow-free
    if rng.random() < 0.3:
        mask = mask + 1.5 * mask * (1 - mask)
    scene.img = scene.img * (1 + mask * rng.uniform(0.18, 0.45))
    if rng.random() < 0.5:
        tints = np.array([[1.25, 1.0, 0.65], [0.8, 1.0, 1.3], [1.3, 0.95, 0.8], [1.05, 1.15, 0.7]], dtype=np.float32)
        tint = tints[int(rng.integers(0, len(tints)))]
        scene.tint, scene.tint_mask = tint / float(tint @ _LUMA), mask.astype(np.float32)


def _render(
    rng: np.random.Generator, label: str, edges: bool = True
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One scene: (radiance, stain mask or None, tint or None) at canvas size; ``edges=False``: no package edge."""
    scene, grain = _render_background(rng)
    if rng.random() < 0.3 and edges and label != "chip-out":
        side = float(rng.integers(0, 4)) * np.pi / 2 + rng.normal(0, 0.03)
        c = _CANVAS / 2
        signed = [_edge_mask(side, _CANVAS * rng.uniform(0.22, 0.46), c, c)]
        if rng.random() < 0.3:
            signed.append(_edge_mask(side + np.pi / 2, _CANVAS * rng.uniform(0.25, 0.46), c, c))
        _add_package_edges(scene, rng, signed)
        outside = np.maximum.reduce(signed) if len(signed) > 1 else signed[0]
        grain = grain * (1 - np.clip(outside + 0.5, 0, 1) * 0.6)
    if rng.random() < 0.25:
        _add_marking(scene, rng)
    if rng.random() < 0.15:
        grain = _add_dimple(scene, grain, rng)
    if label == "crack":
        _crack(scene, rng)
    elif label == "chip-out":
        grain = _chip_out(scene, rng, grain)
    elif label == "void":
        _void(scene, rng)
    elif label == "scratch":
        _scratch(scene, rng)
    elif label == "particle":
        grain = _particle(scene, rng, grain)
    elif label == "discoloration":
        _discoloration(scene, rng)
    elif label != "defect-free":
        raise ValueError(f"unknown class {label!r}")
    yy, xx = _grid()
    g = rng.uniform(0.03, 0.15)
    ang = rng.uniform(0, 2 * np.pi)
    light = 1 + g * ((xx / _CANVAS - 0.5) * math.cos(ang) + (yy / _CANVAS - 0.5) * math.sin(ang))
    light -= rng.uniform(0, 0.15) * ((xx / _CANVAS - 0.5) ** 2 + (yy / _CANVAS - 0.5) ** 2)
    img = np.clip((scene.img + grain) * light, 0, None)
    return img.astype(np.float32), scene.tint_mask, scene.tint


# --------------------------------------------------------------------------------------------------------------
# Machines: scene -> sensor values -> file bytes
# --------------------------------------------------------------------------------------------------------------


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def _expose(
    machine: Machine, rng: np.random.Generator, img: np.ndarray, tint_mask: np.ndarray | None, tint: np.ndarray | None
) -> np.ndarray:
    """Sensor response on a 0-1 scale: area sampling, tint, colour cast, gain, noise, clipping, gamma."""
    grey = _resize(img, machine.size)
    if tint is not None and tint_mask is not None:
        m = _resize(tint_mask, machine.size)[..., None]
        rgb = grey[..., None] * (1 + m * (tint - 1))
    else:
        rgb = grey[..., None]
    if machine.cast is None:
        x = (rgb @ _LUMA if rgb.shape[2] == 3 else grey) * machine.gain
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * (machine.noise + machine.shot * np.sqrt(x))
    else:
        x = rgb * np.asarray(machine.cast, dtype=np.float32) * machine.gain
        common = rng.standard_normal(x.shape[:2] + (1,), dtype=np.float32)
        x = x + (0.7 * common + 0.3 * rng.standard_normal(x.shape, dtype=np.float32)) * (
            machine.noise + machine.shot * np.sqrt(x)
        )
    return np.clip(x, 0, 1) ** machine.gamma


def _encode(machine: Machine, y: np.ndarray) -> bytes:
    """File bytes for sensor values ``y`` (0-1): 8-bit grey PNG, 16-bit grey PNG or RGB JPEG."""
    buf = io.BytesIO()
    if machine.bits == 16:
        Image.fromarray(np.round(y * 65535).astype("<u2")).save(buf, format="PNG", compress_level=_PNG_LEVEL)
    elif machine.ext == ".jpg":
        Image.fromarray(np.round(y * 255).astype(np.uint8)).save(buf, format="JPEG", quality=_JPEG_QUALITY)
    else:
        Image.fromarray(np.round(y * 255).astype(np.uint8)).save(buf, format="PNG", compress_level=_PNG_LEVEL)
    return buf.getvalue()


def _blur(machine: Machine, y: np.ndarray) -> np.ndarray:
    """Heavy defocus: Gaussian blur of the sensor image, sigma >= 6 px and growing with the image size."""
    sigma = max(6.0, 0.1 * machine.size)
    return ndimage.gaussian_filter(y, (sigma, sigma) if y.ndim == 2 else (sigma, sigma, 0), mode="reflect")


def _thumb_sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image resized to 128 px on its longest side (0-255 scale).

    Worst case (largest) over bilinear, bicubic and Lanczos resizing of the 8-bit image. The pipeline measures
    images of 128 px or less as they are; there the planted frames read up to ~1.1 (all 125 of a 50k set), under
    its default threshold of 2.0, while normal images read > 100. Kept as it is so the generated bytes do not change.
    """
    h, w = grey.shape
    scale = 128 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8))
    filters = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)
    return max(float(ndimage.laplace(np.asarray(img.resize(size, f), dtype=np.float64)).var()) for f in filters)


def _blurred_bytes(machine: Machine, label: str, rng: np.random.Generator) -> bytes:
    """A defocused frame that the quality checks see as blurred, and only as blurred.

    8-bit quantisation of any smooth gradient leaves a Laplacian variance of a few tenths, and a bright
    package edge or a strong stain leaves more, while blurring also flattens contrast. So scenes (without
    package edges) are re-drawn until the frame keeps grey-level std >= 2.5 with thumbnail sharpness <= 0.6;
    after ``_BLUR_TRIES`` the closest one is kept.
    """
    best, best_score = b"", math.inf
    for _ in range(_BLUR_TRIES):
        data = _encode(machine, _blur(machine, _expose(machine, rng, *_render(rng, label, edges=False))))
        with Image.open(io.BytesIO(data)) as img:
            grey = to_grey_u8(img)
        sharpness, contrast = _thumb_sharpness(grey), float(grey.std())
        score = max(sharpness / _BLUR_MAX_SHARPNESS, _BLUR_MIN_CONTRAST / max(contrast, 1e-6))
        if score <= 1.0:
            return data
        if score < best_score:
            best, best_score = data, score
    return best


def _image_bytes(machine: Machine, label: str, kind: str | None, rng: np.random.Generator, ordinal: int = 0) -> bytes:
    """File bytes for one slot: a normal image of ``label``, or the planted ``kind`` made from one.

    ``ordinal`` numbers the blank frames, so that each gets its own grey level (see `_blank`).
    """
    if kind == "blank":
        return _encode(machine, _blank(machine, ordinal))
    if kind == "blurred":
        return _blurred_bytes(machine, label, rng)
    data = _encode(machine, _expose(machine, rng, *_render(rng, label)))
    return data[: len(data) // 2] if kind == "corrupt" else data


def _blank(machine: Machine, ordinal: int) -> np.ndarray:
    """Constant frame (lamp off, lens cap, no signal), std exactly 0.

    Blank frames get distinct grey levels (3 apart), so that no two decode to the same pixels: the validate stage
    would otherwise also call the second one a duplicate of the first. (16-bit frames all decode to 0 after the
    min-max stretch, hence at most one blank on a 16-bit machine.)
    """
    shape = (machine.size, machine.size) if machine.cast is None else (machine.size, machine.size, 3)
    return np.full(shape, (30 + (3 * ordinal) % 200) / 255, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Data set
# --------------------------------------------------------------------------------------------------------------


def _plan_planted(
    rng: np.random.Generator, labels: list[str], machines: list[Machine], n: int
) -> tuple[dict[int, str], dict[int, int]]:
    """Choose the slots that become bad files, and for each duplicate the slot it copies.

    Each class keeps at least two intact images. A duplicate copies an intact image of the same class and
    machine with a smaller index, so it is a byte copy with the right extension and a truthful label, and the
    copy (not the original) is the one that sorts second.
    """
    per_kind = max(1, round(n * PLANTED_SHARE / len(PLANTED_KINDS)))
    kinds: dict[int, str] = {}
    sources: dict[int, int] = {}
    intact = {c: labels.count(c) for c in CLASSES}
    for kind in PLANTED_KINDS:
        placed = 0
        for i in (int(i) for i in rng.permutation(n)):  # a fresh order per kind: no machine bias between kinds
            if placed == per_kind:
                break
            if i in kinds or i in sources.values() or intact[labels[i]] <= 2:
                continue
            if kind == "corrupt" and machines[i].name not in _CORRUPT_MACHINES:
                continue
            if (
                kind == "blank"
                and machines[i].bits == 16
                and any(k == "blank" and machines[j].bits == 16 for j, k in kinds.items())
            ):
                continue
            if kind == "blurred" and (machines[i].name not in _BLUR_MACHINES or labels[i] == "chip-out"):
                continue
            if kind == "duplicate":
                candidates = [
                    j for j in range(i)
                    if j not in kinds and labels[j] == labels[i] and machines[j] is machines[i]
                ]  # fmt: skip
                if not candidates:
                    continue
                sources[i] = candidates[int(rng.integers(0, len(candidates)))]
            kinds[i] = kind
            intact[labels[i]] -= 1
            placed += 1
    return kinds, sources


def _readme(n: int, seed: int, counts: dict[str, int], machine_counts: dict[str, int], planted: dict[str, int]) -> str:
    lines = [
        "Synthetic AOI data set of IC-package defect images",
        "",
        "generator: tasks/synthetic.py (aoi-autolabel)",
        f"seed: {seed}",
        f"n: {n} image files (planted bad files included)",
        "",
        "classes (label: images):",
        *(f"  {c}: {counts[c]}" for c in CLASSES),
        "",
        "machines (folder: size, format, gain, gamma, images):",
        *(
            f"  {m.name}/: {m.size}x{m.size}, "
            + ("16-bit grey PNG" if m.bits == 16 else "RGB JPEG q90" if m.ext == ".jpg" else "8-bit grey PNG")
            + f", gain {m.gain}, gamma {m.gamma}, {machine_counts[m.name]}"
            for m in MACHINES
        ),
        "",
        "planted bad files (kind: files): " + ", ".join(f"{k}: {planted[k]}" for k in PLANTED_KINDS),
        "",
        "labels.csv   path,label for every image file (planted ones keep the label they were drawn with)",
        "planted.csv  path,kind of the planted bad files (corrupt, blank, blurred, duplicate);",
        "             a duplicate is a byte copy of an earlier-sorted image of the same machine and class",
        "File names carry no label; the index runs over a shuffled order.",
        "",
    ]
    return "\n".join(lines)


def generate(out: Path, n: int = 2000, seed: int = 0) -> SynthReport:
    """Write the synthetic AOI data set (images, labels.csv, planted.csv, README.txt) into ``out``.

    The default data of the project: it lets the whole pipeline run, and be tested, with no external data.

    Raises:
        FileExistsError: if ``out`` exists and is not an empty folder (never overwrite someone's data).
        ValueError: if ``n`` < 50.
    """
    out = Path(out)
    counts = class_counts(n)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder exists and is not empty: {out}")

    rng = np.random.default_rng(seed)
    labels = [c for c in CLASSES for _ in range(counts[c])]
    labels = [labels[i] for i in rng.permutation(n)]
    machine_idx = [k for k, c in enumerate(_largest_remainder(n, [m.share for m in MACHINES])) for _ in range(c)]
    machines = [MACHINES[machine_idx[i]] for i in rng.permutation(n)]
    kinds, sources = _plan_planted(rng, labels, machines, n)

    source_set = set(sources.values())
    blank_ordinal = {i: k for k, i in enumerate(sorted(i for i, kind in kinds.items() if kind == "blank"))}
    width = max(6, len(str(n - 1)))
    rel = [f"{machines[i].name}/img-{i:0{width}d}{machines[i].ext}" for i in range(n)]
    for m in MACHINES:
        (out / m.name).mkdir(parents=True, exist_ok=True)

    originals: dict[int, bytes] = {}
    for i in range(n):  # duplicates come after their originals (smaller index), so one pass does
        if i in sources:
            data = originals[sources[i]]
        else:
            rng_i = np.random.default_rng([seed, i])
            data = _image_bytes(machines[i], labels[i], kinds.get(i), rng_i, blank_ordinal.get(i, 0))
        (out / rel[i]).write_bytes(data)
        if i in source_set:
            originals[i] = data

    with (out / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows(sorted(zip(rel, labels, strict=True)))
    planted = sorted((rel[i], kind) for i, kind in kinds.items())
    with (out / "planted.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "kind"])
        w.writerows(planted)
    machine_counts = {m.name: sum(1 for x in machines if x is m) for m in MACHINES}
    planted_counts = {k: sum(1 for v in kinds.values() if v == k) for k in PLANTED_KINDS}
    (out / "README.txt").write_text(_readme(n, seed, counts, machine_counts, planted_counts))
    return SynthReport(out=out, n_images=n, class_counts=counts, planted=planted)
