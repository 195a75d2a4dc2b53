"""Would a template-free "defect-area crop" in the standardize step help clustering? (measurement only)

Each image is decoded and lighting-normalised as ``tasks.standardize.standardize_image`` does (params.yaml's
``standardize``), then, before the square padding and resize, cropped to a square around its most anomalous
region, found without a template and without labels:

- ``median``: residual ``|image - median_filter(image, side/4)|`` (a local background estimate), smoothed;
- ``tophat``: white + black morphological top-hat with a square of side/6 (structures smaller than the square:
  specks, blobs, thin lines; large pads and their straight edges are removed by the opening/closing), smoothed.

The crop is centred on the residual's maximum; its side is ``max(side/3, 2 x the extent of the region above half
the peak)``; the outer side/16 is ignored when looking for the peak, and the window is shifted to stay inside the
image (edge replication only pads a window larger than the short side). Then ``to_square`` as usual.

Embedding, clustering and evaluation are the pipeline's own (``fit_embedder`` → ``cluster`` → ``evaluate``) as in
``bench/quality_synthetic.py``, but with the DESCRIPTOR BLOCKS ONLY (morph 1 + stats ½ + LBP ½, i.e. params.yaml's
``embed.blocks`` without simclr) for the baseline and the crop variants alike, to keep it fast. Descriptors do not
depend on the seed, so each variant is embedded once and clustered per seed.

Crop as an EXTRA block (the ``whole + crop block`` variants): the whole image is kept and embedded as in the
baseline, and the cropped image is embedded too, with ``CROP_BLOCKS`` (stats ¼ + LBP ¼: total weight ½ beside the
whole image's 2); the two vector sets are concatenated. ``fit_embedder`` already z-scores each block, L2-normalises
it per image and multiplies it by its weight, so the concatenation is exactly the combo embedding of the five blocks
{morph 1, stats ½, LBP ½, crop stats ¼, crop LBP ¼}: no further scaling.

In-pipeline crop (the ``pipeline blocks + crop descriptor`` variants): no native-resolution crop; the baseline's
standardised images are embedded with the pipeline's own blocks plus the ``crop`` descriptor of
``tasks/descriptors.py`` (residual, crop and stats + LBP all on the standardised S x S image), i.e.
``{morph 1, stats ½, lbp ½, crop w}``. w = ½ is the requested weight; w = 0.354 = √(¼² + ¼²) gives the crop part the
same L2 norm as the bench's two ¼ blocks (weights are norms, see ``tasks/embedding.py``); 0.25 and 0.42 bracket them.

Sets: (a) ``tasks.synthetic.generate(n=2000, seed=0)`` (k from params.yaml); (b) the DeepPCB 3k quick subset of
``bench/quality.py --quick`` (k = 6; its patches are already defect-centred, so a good crop must not hurt them).

    python bench/defect_crop.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/quality.py

from tasks.clustering import cluster  # noqa: E402
from tasks.config import ClusterParams, EmbedParams, load_params  # noqa: E402
from tasks.datasets import decode  # noqa: E402
from tasks.embedding import fit_embedder  # noqa: E402
from tasks.evaluation import evaluate  # noqa: E402
from tasks.standardize import normalise_lighting, to_square  # noqa: E402
from tasks.synthetic import generate  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "deeppcb-patches"
RESULTS = ROOT / "bench" / "results" / "defect-crop.json"
KEYS = ("acc", "nmi", "ari", "macro_recall")
MAX_PIXELS = 50_000_000


def _odd(x: float) -> int:
    n = max(3, int(round(x)))
    return n if n % 2 else n + 1


def residual_median(grey: np.ndarray) -> np.ndarray:
    """|image - local median background| (window side/4), lightly smoothed."""
    g = grey.astype(np.float32)
    side = min(g.shape)
    bg = ndimage.median_filter(g, size=_odd(side / 4), mode="nearest")
    return ndimage.gaussian_filter(np.abs(g - bg), sigma=max(1.0, side / 64))


def residual_tophat(grey: np.ndarray) -> np.ndarray:
    """White + black top-hat with a square of side/6: small bright and dark structures, not large pads."""
    g = grey.astype(np.float32)
    side = min(g.shape)
    size = _odd(side / 6)
    white = g - ndimage.grey_opening(g, size=(size, size), mode="nearest")
    black = ndimage.grey_closing(g, size=(size, size), mode="nearest") - g
    return ndimage.gaussian_filter(white + black, sigma=max(1.0, side / 64))


def crop_around_peak(grey: np.ndarray, residual: np.ndarray, min_share: float = 1 / 3) -> np.ndarray:
    """Square crop centred on the residual's maximum, side max(min_share·side, 2x the region's extent).

    The outer side/16 of the image is ignored when looking for the maximum (filter border effects), and the window
    is shifted to stay inside the image; edge replication only pads a window larger than the image's short side.
    """
    h, w = grey.shape
    border = max(1, min(h, w) // 16)
    inner = np.full_like(residual, -np.inf)
    inner[border: h - border, border: w - border] = residual[border: h - border, border: w - border]
    cy, cx = np.unravel_index(int(np.argmax(inner)), inner.shape)
    peak = float(residual[cy, cx])
    extent = 0
    if peak > 0:
        lab, _ = ndimage.label(residual >= 0.5 * peak)
        ys, xs = np.nonzero(lab == lab[cy, cx])
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    crop = int(min(max(h, w), max(round(min_share * min(h, w)), 2 * extent)))
    if crop > min(h, w):  # only then is padding needed
        ph, pw = max(0, crop - h), max(0, crop - w)
        grey = np.pad(grey, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="edge")
        cy, cx = cy + ph // 2, cx + pw // 2
        h, w = grey.shape
    top = int(np.clip(cy - crop // 2, 0, h - crop))
    left = int(np.clip(cx - crop // 2, 0, w - crop))
    return grey[top: top + crop, left: left + crop]


CROP_BLOCKS = {"stats": 0.25, "lbp": 0.25}  # the extra block on the crop: total weight ½ (the whole image's: 2)

# name -> (residual for the crop, whether the crop is an extra block beside the whole image instead of replacing it,
#          weight of the in-pipeline ``crop`` descriptor block (on the standardised images) or None)
VARIANTS = {
    "baseline (no crop)": (None, False, None),
    "crop: median residual": (residual_median, False, None),
    "crop: top-hat": (residual_tophat, False, None),
    "whole + crop block: median residual": (residual_median, True, None),
    "whole + crop block: top-hat": (residual_tophat, True, None),
    "pipeline blocks + crop descriptor 0.25": (None, False, 0.25),
    "pipeline blocks + crop descriptor 0.354": (None, False, round(float(np.sqrt(0.125)), 3)),
    "pipeline blocks + crop descriptor 0.42": (None, False, 0.42),
    "pipeline blocks + crop descriptor 0.5": (None, False, 0.5),
}


def standardize_cropped(path: Path, sparams, residual_fn) -> np.ndarray:
    grey, _ = decode(path, max_pixels=MAX_PIXELS)
    grey = normalise_lighting(grey, sparams.lighting, sparams.percentiles)
    if residual_fn is not None:
        grey = crop_around_peak(grey, residual_fn(grey))
    return to_square(grey, sparams.size)


def load_synthetic(root: Path) -> tuple[list[Path], np.ndarray]:
    df = pd.read_csv(root / "labels.csv", dtype=str)
    paths, labels = [], []
    for path, label in zip(df["path"], df["label"], strict=True):
        try:
            decode(root / path, max_pixels=MAX_PIXELS)
        except Exception:  # noqa: BLE001 - unreadable planted files are skipped, as in quality_synthetic.py
            continue
        paths.append(root / path)
        labels.append(label)
    return paths, np.array(labels)


def load_deeppcb_quick(seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """The stratified 3,000-image subset of bench/quality.py --quick (its own row selection)."""
    from quality import set_rows

    df = set_rows("full", quick=True, seed=seed)
    return [DATA / p for p in df["path"]], df["label"].to_numpy(dtype=str)


def run_set(name, paths, y, k, sparams, eparams, cparams_base, seeds, variants, records):
    print(f"# {name}: {len(paths)} images, {len(set(y))} classes, k = {k}", flush=True)
    cparams = ClusterParams(**{**cparams_base.model_dump(), "k": k})
    for vname in variants:
        fn, extra, crop_weight = VARIANTS[vname]
        t0 = time.perf_counter()
        images = np.stack([standardize_cropped(p, sparams, None if extra else fn) for p in paths])
        crops = np.stack([standardize_cropped(p, sparams, fn) for p in paths]) if extra else None
        std_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vparams = eparams
        if crop_weight is not None:  # the descriptor block on the standardised images, beside the usual blocks
            vparams = EmbedParams(**{**eparams.model_dump(), "blocks": {**eparams.blocks, "crop": crop_weight}})
        _, vectors, report = fit_embedder(images, vparams, 0)
        crop_s = report.block_seconds.get("crop")
        if extra:  # each block already carries its weight (L2 norm), so concatenating is the combo convention
            crop_params = EmbedParams(**{**eparams.model_dump(), "blocks": CROP_BLOCKS})
            vectors = np.concatenate([vectors, fit_embedder(crops, crop_params, 0)[1]], 1)
        emb_s = time.perf_counter() - t0
        for seed in seeds:
            t0 = time.perf_counter()
            result = cluster(vectors, cparams, seed)
            cl_s = time.perf_counter() - t0
            m = evaluate(y, result.labels)
            rec = {"set": name, "variant": vname, "seed": seed, **{kk: round(float(m[kk]), 4) for kk in KEYS},
                   "standardize_s": round(std_s, 1), "embed_s": round(emb_s, 1), "cluster_s": round(cl_s, 1),
                   "n_images": len(paths)}
            if crop_s is not None:
                rec["crop_block_s"] = crop_s
            print(json.dumps(rec), flush=True)
            rec["per_class_recall"] = {c: round(float(r), 3) for c, r in m["per_class_recall"].items()}
            records.append(rec)


def summarise(records):
    rows = []
    for (s, v), grp in pd.DataFrame(records).groupby(["set", "variant"], sort=False):
        med = {kk: float(np.median(grp[kk])) for kk in (*KEYS, "standardize_s", "embed_s", "cluster_s")}
        classes = grp["per_class_recall"].iloc[0]
        per_class = {c: float(np.median([r[c] for r in grp["per_class_recall"]])) for c in classes}
        if "crop_block_s" in grp and grp["crop_block_s"].notna().all():
            med["crop_block_s"] = float(np.median(grp["crop_block_s"]))
            med["crop_block_s_per_1000"] = round(1000 * med["crop_block_s"] / float(grp["n_images"].iloc[0]), 2)
        rows.append({"set": s, "variant": v, "seeds": grp["seed"].tolist(), **med,
                     "per_seed": {kk: grp[kk].tolist() for kk in KEYS}, "per_class_recall_median": per_class})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sets", nargs="+", default=["synthetic", "deeppcb-quick"], choices=["synthetic", "deeppcb-quick"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    blocks = {b: w for b, w in params.embed.blocks.items() if b != "simclr"}
    eparams = EmbedParams(**{**params.embed.model_dump(), "method": "combo", "blocks": blocks})
    records: list[dict] = []
    started = time.time()
    for set_name in args.sets:
        if set_name == "synthetic":
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "synth"
                generate(out, n=2000, seed=0)
                paths, y = load_synthetic(out)
                run_set(set_name, paths, y, params.cluster.k, params.standardize, eparams, params.cluster,
                        args.seeds, args.variants, records)
        else:
            paths, y = load_deeppcb_quick()
            run_set(set_name, paths, y, 6, params.standardize, eparams, params.cluster, args.seeds, args.variants,
                    records)
        rows = summarise(records)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"embed": eparams.model_dump(), "crop_blocks": CROP_BLOCKS,
                                        "cluster": params.cluster.model_dump(),
                                        "standardize": params.standardize.model_dump(), "seeds": args.seeds,
                                        "wall_seconds": round(time.time() - started, 1),
                                        "median": rows, "records": records}, indent=1))
    print("\n| set | variant | ACC | NMI | ARI | macro recall | standardize s | embed s | cluster s (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in summarise(records):
        print(f"| {r['set']} | {r['variant']} | {r['acc']:.3f} | {r['nmi']:.3f} | {r['ari']:.3f} | "
              f"{r['macro_recall']:.3f} | {r['standardize_s']:.0f} | {r['embed_s']:.0f} | {r['cluster_s']:.0f} |")
    print("\nper-class recall (median over seeds):")
    for r in summarise(records):
        recalls = ", ".join(f"{c} {v:.2f}" for c, v in r["per_class_recall_median"].items())
        print(r["set"], "|", r["variant"], "|", recalls)


if __name__ == "__main__":
    main()
