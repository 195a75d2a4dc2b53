"""Cluster quality on real defect patches (DeepPCB): every embedding and clustering method, baselines included.

Runs the pipeline's own code, as ``tasks/stages.py`` does: ``tasks.standardize`` → ``tasks.embedding.fit_embedder``
→ ``tasks.clustering.cluster`` → ``tasks.evaluation.evaluate``, on

- ``full``: all clean rows of ``labels.csv`` (9,732 patches, 6 nearly balanced classes), k = 6;
- ``longtail``: ``labels-longtail.csv`` (2,324 patches, imbalance 100), k = 12 mapped many-to-one;

and prints one table (median over seeds) and writes ``bench/results/quality.json``. No labels are used before
evaluation. ``--quick`` uses a stratified 3,000-image subset of ``full`` (and the whole long-tail set).

    python bench/quality.py --quick                # iterate (a few minutes)
    python bench/quality.py --seeds 0 1 2          # final numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.clustering import cluster  # noqa: E402
from tasks.config import ClusterParams, EmbedParams, load_params  # noqa: E402
from tasks.embedding import TORCH_METHODS, fit_embedder  # noqa: E402
from tasks.evaluation import evaluate  # noqa: E402
from tasks.standardize import standardize_image  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "deeppcb-patches"
RESULTS = ROOT / "bench" / "results" / "quality.json"

# name → (embed overrides, cluster overrides[, fit_embedder keyword options]). Baselines first (as in the issue:
# k-means).
BASELINES = {
    "raw pixels + PCA": ({"method": "raw"}, {"method": "kmeans"}),
    "HOG": ({"method": "hog"}, {"method": "kmeans"}),
    "LBP": ({"method": "lbp"}, {"method": "kmeans"}),
    "untrained CNN": ({"method": "cnn"}, {"method": "kmeans"}),
    "plain SimCLR": ({"method": "simclr"}, {"method": "kmeans"}),
}
METHODS = {
    "stats → k-means": ({"method": "stats"}, {"method": "kmeans"}),
    "morph → k-means": ({"method": "morph"}, {"method": "kmeans"}),
    "SimCLR+stats+LBP → SCAN": (
        {"method": "combo", "blocks": {"simclr": 1.0, "stats": 0.5, "lbp": 0.5}},
        {"method": "scan"},
    ),
    "SimCLR+stats+LBP+morph → SCAN": (
        {"method": "combo", "blocks": {"simclr": 1.0, "stats": 1.0, "lbp": 1.0, "morph": 1.0}},
        {"method": "scan"},
    ),
    "morph → SCAN (candidates by modularity)": ({"method": "morph"}, {}),
    "default embedding → SCAN, k-means start only, entropy 2 (old selection)": (
        {},
        {"init": ["kmeans"], "entropy_weight": 2.0},
    ),
    # issue 4, third round: a SimCLR block (params.yaml's simclr recipe) beside the descriptors
    "previous default: morph 1 + stats ½ + LBP ½ → SCAN (candidates by modularity)": (
        {"method": "combo", "blocks": {"morph": 1.0, "stats": 0.5, "lbp": 0.5}},
        {},
    ),
    "morph 1 + stats ½ + LBP ½ + SimCLR 1 → SCAN (candidates by modularity)": (
        {"method": "combo", "blocks": {"morph": 1.0, "stats": 0.5, "lbp": 0.5, "simclr": 1.0}},
        {},
    ),
    "default with SimCLR 30 epochs on up to 10k images → SCAN": ({"epochs": 30, "max_train_images": 10000}, {}),
    "morph 1 + SimCLR 1 → SCAN (candidates by modularity)": (
        {"method": "combo", "blocks": {"morph": 1.0, "simclr": 1.0}},
        {},
    ),
    # issue 4, fourth round: the template-free defect-area crop as an extra descriptor block (tasks/descriptors.py)
    "default + crop ½ → SCAN (candidates by modularity)": (
        {"method": "combo", "blocks": {"morph": 1.0, "stats": 0.5, "lbp": 0.5, "simclr": 0.5, "crop": 0.5}},
        {},
    ),
    "default + crop 0.35 → SCAN (candidates by modularity)": (
        {"method": "combo", "blocks": {"morph": 1.0, "stats": 0.5, "lbp": 0.5, "simclr": 0.5, "crop": 0.35}},
        {},
    ),
    # issue 4, fifth round: SimCLR options of fit_embedder (keyword options, third element), params.yaml otherwise
    "default, SimCLR as 2 trainings of 5 epochs (seeds s, s+1000), weight ½/√2 each → SCAN": (
        {},
        {},
        {"simclr_runs": 2},
    ),
    "default, SimCLR views keep the central half (crops ≥ 75 %, was 60 %) → SCAN": ({}, {}, {"crop_min_scale": 0.75}),
    # issue 4, sixth round: consensus of the SCAN candidates of 2 clustering seeds (medoid by mean ARI)
    "default embedding → SCAN consensus of 2 runs (medoid of 8 candidates by mean ARI)": ({}, {"consensus": 2}),
    "default embedding → k-means": ({}, {"method": "kmeans"}),
    "default embedding → HDBSCAN": ({}, {"method": "hdbscan"}),
    "default embedding → agglomerative": ({}, {"method": "agglomerative"}),
    "default + SCAN self-labelling → SCAN": ({}, {"self_label": True}),
}
DEFAULT_NAME = "DEFAULT (params.yaml): morph 1 + stats ½ + LBP ½ + SimCLR ½ → SCAN, candidates by modularity"
KEYS = ("acc", "nmi", "ari", "macro_recall", "rare_class_recall")


def set_rows(name: str, quick: bool, seed: int = 0) -> pd.DataFrame:
    """The clean rows (path, label) of a set; ``quick`` on ``full``: the stratified 3,000-image subset."""
    csv = DATA / ("labels-longtail.csv" if name == "longtail" else "labels.csv")
    df = pd.read_csv(csv, keep_default_na=False, dtype=str)
    df = df[df["other_class_in_crop"] == ""].reset_index(drop=True)
    if quick and name == "full":
        rng = np.random.default_rng(seed)
        share = 3000 / len(df)
        keep = []
        for _, group in df.groupby("label"):
            keep.extend(rng.choice(group.index.to_numpy(), size=round(len(group) * share), replace=False).tolist())
        df = df.loc[sorted(keep)].reset_index(drop=True)
    return df


def load_set(name: str, quick: bool, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standardised images (the pipeline's own standardisation, default lighting) and their labels."""
    from tasks.config import StandardizeParams

    df = set_rows(name, quick, seed)
    cache = Path("/tmp") / f"aoi-quality-{name}-{'quick' if quick else 'all'}-{size}.npz"
    if cache.is_file():
        blob = np.load(cache, allow_pickle=False)
        if list(blob["paths"]) == df["path"].tolist():
            return blob["images"], df["label"].to_numpy(dtype=str)
    params = StandardizeParams(size=size)
    images = np.stack([standardize_image(DATA / p, params, 50_000_000) for p in df["path"]])
    np.savez(cache, images=images, paths=np.array(df["path"].tolist()))
    return images, df["label"].to_numpy(dtype=str)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    defaults = load_params(ROOT / "params.yaml")
    methods = {**BASELINES, DEFAULT_NAME: ({}, {}), **METHODS}
    if args.methods:
        methods = {k: v for k, v in methods.items() if any(m.lower() in k.lower() for m in args.methods)}
    records: list[dict[str, Any]] = []
    for set_name in args.sets:
        images, y = load_set(set_name, args.quick, defaults.standardize.size)
        k = 6 if set_name == "full" else 12
        print(f"# {set_name}: {len(images)} images, {len(set(y))} classes, k = {k}", flush=True)
        shared: dict = {}  # descriptor blocks do not depend on the seed: fitted once
        for seed in args.seeds:
            torch_seed = seed if seed in args.seeds[: args.ssl_seeds] else args.seeds[0]
            for name, (e_over, c_over, *rest) in methods.items():
                options = rest[0] if rest else {}
                eparams = EmbedParams(**{**defaults.embed.model_dump(), **e_over})
                cparams = ClusterParams(**{**defaults.cluster.model_dump(), "k": k, **c_over})
                blocks = eparams.blocks if eparams.method == "combo" else {eparams.method: 1.0}
                # torch blocks shared only between methods with the same training settings (seed, embed params
                # other than the block weights, keyword options); descriptor blocks by all
                recipe = json.dumps(
                    {**eparams.model_dump(exclude={"method", "blocks"}), **options, "seed": torch_seed}, sort_keys=True
                )
                per_seed = shared.setdefault(("torch", recipe), {})
                desc = shared.setdefault("desc", {})
                cache = {**desc, **per_seed}
                model, vectors, rep = fit_embedder(images, eparams, torch_seed, cache=cache, **options)
                for key, value in cache.items():
                    (per_seed if key.split("-")[0] in TORCH_METHODS else desc)[key] = value
                start = time.perf_counter()
                result = cluster(vectors, cparams, seed)
                cluster_s = time.perf_counter() - start
                m = evaluate(y, result.labels)
                rec = {
                    "set": set_name,
                    "method": name,
                    "seed": seed,
                    "ssl_seed": torch_seed if any(b in TORCH_METHODS for b in blocks) else None,
                    "embed": {
                        "method": eparams.method,
                        "blocks": blocks if eparams.method == "combo" else None,
                        **options,
                    },
                    "cluster": {"method": cparams.method, "k": cparams.k},
                    **{key: round(float(m[key]), 4) for key in KEYS},
                    "per_class_recall": {c: round(v, 4) for c, v in m["per_class_recall"].items()},
                    "n_clusters": int(result.model.n_clusters),
                    "train_seconds": rep.train_seconds,
                    "embed_seconds": rep.embed_seconds,
                    "cluster_seconds": round(cluster_s, 2),
                }
                records.append(rec)
                if args.partial:
                    args.partial.write_text(json.dumps({"records": records, "median": medians(records)}, indent=1))
                print(
                    f"{set_name:8s} seed {seed} {name:40s} acc {rec['acc']:.3f} nmi {rec['nmi']:.3f} "
                    f"ari {rec['ari']:.3f} mrec {rec['macro_recall']:.3f} rare {rec['rare_class_recall']:.3f} "
                    f"min-class {min(rec['per_class_recall'].values()):.2f} train {rec['train_seconds']:.0f}s "
                    f"embed {rec['embed_seconds']:.0f}s cluster {cluster_s:.0f}s",
                    flush=True,
                )
    return {
        "quick": args.quick,
        "seeds": args.seeds,
        "ssl_seeds": args.seeds[: args.ssl_seeds],
        "threads": args.threads,
        "machine": platform.platform(),
        "params": defaults.as_dict(),
        "records": records,
        "median": medians(records),
    }


def medians(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    df = pd.DataFrame(records)
    out = []
    for (set_name, method), g in df.groupby(["set", "method"], sort=False):
        row = {"set": set_name, "method": method, "n_seeds": len(g)}
        for key in (*KEYS, "train_seconds", "embed_seconds", "cluster_seconds"):
            row[key] = round(float(g[key].median()), 4)
        per_class = pd.DataFrame(list(g["per_class_recall"])).median()
        row["min_class_recall"] = round(float(per_class.min()), 4)
        row["per_class_recall"] = {c: round(float(v), 4) for c, v in per_class.items()}
        out.append(row)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    head = (
        "| set | method | ACC | NMI | ARI | macro recall | rare-class recall | min class recall "
        "| training s | embedding s | clustering s |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in summary:
        lines.append(
            f"| {r['set']} | {r['method']} | {r['acc']:.3f} | {r['nmi']:.3f} | {r['ari']:.3f} | "
            f"{r['macro_recall']:.3f} | {r['rare_class_recall']:.3f} | {r['min_class_recall']:.2f} | "
            f"{r['train_seconds']:.0f} | {r['embed_seconds']:.0f} | {r['cluster_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3,000-image stratified subset of the full set")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ssl-seeds", type=int, default=99, help="train self-supervised blocks for the first N seeds "
                    "only (later seeds reuse the first seed's; their clustering still varies)")
    ap.add_argument("--sets", nargs="+", default=["longtail", "full"], choices=["full", "longtail"])
    ap.add_argument("--methods", nargs="*", help="substrings of method names to run (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--partial", type=Path, help="rewrite this JSON after every run (long benchmarks)")
    args = ap.parse_args(argv)
    result = run(args)
    print()
    print(table(result["median"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
