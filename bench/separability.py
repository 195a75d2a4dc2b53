"""How much of each defect type the descriptor blocks carry: a supervised check for the label-free issue 4.

For each set and each descriptor block of ``tasks.descriptors`` (and all of them side by side), a class-balanced
logistic regression is cross-validated (5 stratified folds, every label used) and its per-class recall printed.
This is not something the pipeline can do without labels. It says where to work: a class the block separates
linearly but the clustering never finds is a clustering (or weighting) problem; a class the block cannot separate
even with every label is a feature problem.

    python bench/separability.py                       # full, longtail, synthetic
    python bench/separability.py --sets longtail --blocks morph

Sets: ``full`` and ``longtail`` as in ``bench/quality.py`` (the same cached standardised images), ``synthetic`` as
in ``bench/quality_synthetic.py`` (``tasks.synthetic.generate(n=2000, seed=0)``). Writes
``bench/results/separability.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BLOCKS = ("morph", "stats", "lbp")


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    from tasks.config import StandardizeParams, load_params

    size = load_params(ROOT / "params.yaml").standardize.size
    if name == "synthetic":
        from quality_synthetic import images_and_labels

        return images_and_labels(2000, 0, StandardizeParams(size=size))
    from quality import load_set

    return load_set(name, False, size)


def recalls(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Per-class recall of a class-balanced logistic regression, 5-fold stratified cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, x, y, cv=folds)
    return {str(c): round(float((pred[y == c] == c).mean()), 3) for c in np.unique(y)}


def main(argv: list[str] | None = None) -> None:
    from tasks.descriptors import describe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["full", "longtail", "synthetic"])
    ap.add_argument("--blocks", nargs="+", default=[*BLOCKS, "all"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "separability.json")
    args = ap.parse_args(argv)
    out: dict[str, dict[str, object]] = {}
    for name in args.sets:
        images, y = load(name)
        features = {b: describe(b, images) for b in BLOCKS if b in args.blocks or "all" in args.blocks}
        if "all" in args.blocks:
            features["all"] = np.hstack([features[b] for b in BLOCKS])
        for block in args.blocks:
            t = time.perf_counter()
            rec = recalls(features[block], y)
            macro = round(float(np.mean(list(rec.values()))), 3)
            out[f"{name}/{block}"] = {
                "n": len(y),
                "macro_recall": macro,
                "per_class_recall": rec,
                "seconds": round(time.perf_counter() - t, 1),
            }
            print(f"{name:9s} {block:6s} n={len(y):5d} macro recall {macro:.3f}  {rec}", flush=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
