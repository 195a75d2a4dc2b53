"""Score a label set made by ``autolabel run --templates`` on DeepPCB pairs against the annotated boxes.

Localisation recall through the flow (an annotated box is found when a patch's crop covers it with IoU >= 0.5 or
contains its centre, the rule of bench/localize.py), the same counting only over patches that reached labels.csv
(not quarantined), spurious patches, and the cluster metrics of the labelled patches mapped to ground truth: a
patch takes the class of the annotated box its defect box overlaps most (or whose centre its crop holds).

    nice -n 10 .venv/bin/autolabel run --images ../shared/data/deeppcb-pairs/images \\
        --templates ../shared/data/deeppcb-pairs/images --set localize.rule=suffix --workspace /tmp/pcb-pairs
    .venv/bin/python bench/localize_flow.py /tmp/pcb-pairs/labelsets/<id>
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.evaluation import evaluate  # noqa: E402
from tasks.localize import Box  # noqa: E402


def _box(row: dict[str, str], keys: tuple[str, str, str, str]) -> Box:
    return Box(*(int(row[k]) for k in keys))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labelset", type=Path, help="WS/labelsets/<id> of a run with --templates")
    ap.add_argument("--data", type=Path, default=ROOT / ".." / "shared" / "data" / "deeppcb-pairs")
    args = ap.parse_args(argv)
    gt: dict[str, list[tuple[Box, str]]] = defaultdict(list)
    with (args.data / "boxes.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):  # the flow names images relative to --images: the file name here
            gt[Path(r["image"]).name].append((_box(r, ("x1", "y1", "x2", "y2")), r["label"]))
    with (args.labelset / "localize" / "boxes.csv").open(newline="") as fh:
        defects = [r for r in csv.DictReader(fh) if r["kind"] == "defect"]
    with (args.labelset / "labels.csv").open(newline="") as fh:
        labels = {r["image"]: r for r in csv.DictReader(fh)}
    crop_keys = ("crop_x0", "crop_y0", "crop_x1", "crop_y1")
    klass: dict[str, str] = {}
    for r in defects:
        crop, box = _box(r, crop_keys), _box(r, ("x0", "y0", "x1", "y1"))
        scored = [(box.iou(g), crop.finds(g), label) for g, label in gt.get(r["image"], [])]
        if scored and max(scored)[:2] != (0.0, False):
            klass[r["patch"]] = max(scored)[2]

    def recall(rows: list[dict[str, str]]) -> tuple[float, dict[str, float]]:
        crops: dict[str, list[Box]] = defaultdict(list)
        for r in rows:
            crops[r["image"]].append(_box(r, crop_keys))
        per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for image, boxes in gt.items():
            for g, label in boxes:
                per[label][0] += any(c.finds(g) for c in crops.get(image, []))
                per[label][1] += 1
        found, total = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
        return found / total, {k: round(v[0] / v[1], 3) for k, v in sorted(per.items())}

    all_recall, per_class = recall(defects)
    labelled_recall, _ = recall([r for r in defects if r["patch"] in labels])
    keep = [p for p in labels if p in klass]
    metrics = evaluate([klass[p] for p in keep], np.array([int(labels[p]["cluster"]) for p in keep]))
    report = {
        "pairs": len(gt),
        "annotated_boxes": sum(len(v) for v in gt.values()),
        "defect_patches": len(defects),
        "recall": round(all_recall, 4),
        "recall_per_class": per_class,
        "recall_labelled_patches": round(labelled_recall, 4),
        "patches_not_labelled": sum(r["patch"] not in labels for r in defects),
        "spurious_patches": len(defects) - len(klass),
        "spurious_per_image": round((len(defects) - len(klass)) / len(gt), 3),
        "labelled_patches_with_class": len(keep),
        "class_counts": dict(Counter(klass[p] for p in keep)),
        **{k: metrics[k] for k in ("acc", "nmi", "ari", "macro_recall", "per_class_recall")},
    }
    print(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
