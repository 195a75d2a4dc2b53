"""Cluster quality on the built-in synthetic set: the check that a new embed/cluster default does not lower it.

``tasks.synthetic.generate(n=2000, seed=0)`` (the data of ``make demo`` / ``autolabel run``), every readable file
standardised with the pipeline's ``standardize_image``, then ``fit_embedder`` → ``cluster`` → ``evaluate`` with
params.yaml as is (64 px, k from params.yaml) and optional ``--set section.key=value`` overrides (YAML values).
Prints one line per seed and the median; ``--out`` writes them as JSON. No labels are used before evaluation.

    python bench/quality_synthetic.py --seeds 0 1 2
    python bench/quality_synthetic.py --seeds 0 1 2 --set 'embed.blocks={morph: 1, simclr: 1}'
    python bench/quality_synthetic.py --seeds 0 1 2 --compare cluster.consensus=2   # + a second clustering

``--compare cluster.key=value`` also clusters the same vectors with that override (one line per seed and variant).
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.clustering import cluster  # noqa: E402
from tasks.config import ClusterParams, EmbedParams, load_params  # noqa: E402
from tasks.embedding import fit_embedder  # noqa: E402
from tasks.evaluation import evaluate  # noqa: E402
from tasks.standardize import standardize_image  # noqa: E402
from tasks.synthetic import generate  # noqa: E402

KEYS = ("acc", "nmi", "ari", "macro_recall")


def images_and_labels(n: int, seed: int, size_params) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "synth"
        generate(out, n=n, seed=seed)
        df = pd.read_csv(out / "labels.csv", dtype=str)
        images, labels = [], []
        for path, label in zip(df["path"], df["label"], strict=True):
            try:
                images.append(standardize_image(out / path, size_params, 50_000_000))
            except Exception:  # noqa: BLE001 - unreadable planted files are skipped, as validation would
                continue
            labels.append(label)
    return np.stack(images), np.array(labels)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="section.key=value (YAML value), embed/cluster")
    ap.add_argument("--simclr-runs", type=int, default=1, help="fit_embedder's simclr_runs (SimCLR trainings "
                    "of epochs/N epochs each, concatenated)")
    ap.add_argument("--crop-min-scale", type=float, default=0.6, help="fit_embedder's crop_min_scale (smallest "
                    "crop of a SimCLR view)")
    ap.add_argument("--compare", action="append", default=[], help="cluster.key=value (YAML value): also cluster "
                    "the same vectors with this override (repeatable, one variant each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    over: dict[str, dict] = {"embed": {}, "cluster": {}}
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        over[section][name] = yaml.safe_load(value)
    eparams = EmbedParams(**{**params.embed.model_dump(), **over["embed"]})
    cparams = ClusterParams(**{**params.cluster.model_dump(), **over["cluster"]})
    variants = {"": cparams}
    for item in args.compare:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section != "cluster":
            raise SystemExit(f"--compare takes cluster.key=value, got {item!r}")
        variants[item] = ClusterParams(**{**cparams.model_dump(), name: yaml.safe_load(value)})
    images, y = images_and_labels(2000, 0, params.standardize)
    print(f"# synthetic: {len(images)} readable images, {len(set(y))} classes, k = {cparams.k}", flush=True)
    records = []
    for seed in args.seeds:
        start = time.perf_counter()
        options = {"simclr_runs": args.simclr_runs, "crop_min_scale": args.crop_min_scale}
        _, vectors, rep = fit_embedder(images, eparams, seed, **options)
        embed_s = time.perf_counter() - start
        for variant, vparams in variants.items():
            start = time.perf_counter()
            result = cluster(vectors, vparams, seed)
            cluster_s = time.perf_counter() - start
            m = evaluate(y, result.labels)
            rec = {"seed": seed, **({"variant": variant} if variant else {}),
                   **{k: round(float(m[k]), 4) for k in KEYS},
                   "train_seconds": rep.train_seconds, "embed_total_seconds": round(embed_s, 1),
                   "cluster_seconds": round(cluster_s, 2)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    med = {}
    for variant in variants:
        group = [r for r in records if r.get("variant", "") == variant]
        keys = (*KEYS, "train_seconds", "embed_total_seconds", "cluster_seconds")
        med[variant or "base"] = {k: float(np.median([r[k] for r in group])) for k in keys}
        print("median", variant or "base", json.dumps(med[variant or "base"]))
    if len(variants) == 1:
        med = med["base"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "embed": eparams.model_dump(),
            "options": {"simclr_runs": args.simclr_runs, "crop_min_scale": args.crop_min_scale},
            "cluster": cparams.model_dump(),
            "compare": args.compare,
            "records": records,
            "median": med,
        }
        args.out.write_text(json.dumps(blob, indent=1))


if __name__ == "__main__":
    main()
