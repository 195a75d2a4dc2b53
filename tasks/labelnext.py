"""Workspace-level commands around human labelling: ``label-next`` and ``simulate``.

Both read the outputs of the last run (vectors, clusters, current labels) from the workspace, so asking what to
label next costs seconds, not a retrain.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.annotation import Annotation, annotate_with_params, label_next, load_human_inputs
from tasks.config import load_params
from tasks.datasets import read_labels
from tasks.publishing import montage
from tasks.simulation import simulate
from tasks.workspace import Workspace


def _load(ws: Workspace) -> tuple[list[str], np.ndarray, pd.DataFrame, pd.DataFrame]:
    for stage, name in (("embed", "vectors.npy"), ("cluster", "assignments.csv"), ("annotate", "labels.csv")):
        if not (ws.stage_dir(stage) / name).is_file():
            raise FileNotFoundError(f"{ws.stage_dir(stage) / name} is missing: run `autolabel run` first")
    assignments = pd.read_csv(ws.stage_dir("cluster") / "assignments.csv")
    labels = pd.read_csv(ws.stage_dir("annotate") / "labels.csv", keep_default_na=False)
    vectors = np.asarray(np.load(ws.stage_dir("embed") / "vectors.npy", mmap_mode="r"))
    return list(assignments["image"]), vectors, assignments, labels


def write_label_next(workspace: Path, n: int) -> Path:
    """Write ``results/label-next/next.csv`` (rank, image, cluster, current label, confidence, reason) and a montage.

    Images already in ``human/seed_labels.csv`` are never asked again. With seeds, the propagation is redone from
    ``human/`` (seconds) for its margins, which rank the uncertain images; labels.csv only keeps the calibrated
    confidence.
    """
    ws = Workspace.at(workspace)
    images, vectors, assignments, labels = _load(ws)
    seeds_path = ws.human / "seed_labels.csv"
    labelled: set[str] = set()
    if seeds_path.is_file():
        with open(seeds_path, newline="") as fh:
            labelled = {row["image"] for row in csv.DictReader(fh)}
    current = Annotation(
        labels=list(labels["label"]),
        confidence=labels["confidence"].to_numpy(dtype=float),
        needs_review=labels["needs_review"].astype(str).eq("True").to_numpy(),
        source=list(labels["label_source"]),
    )
    clusters = assignments["cluster"].to_numpy()
    human = load_human_inputs(ws.human, set(images), int(ws.read_json("cluster")["n_clusters"]))
    if human.seeds:
        fresh = annotate_with_params(
            load_params(ws.params), images, vectors, clusters, assignments["confidence"].to_numpy(), human
        )
        current = Annotation(current.labels, current.confidence, current.needs_review, current.source, fresh.margin)
    picks = label_next(images, vectors, clusters, assignments["distance"].to_numpy(), current, labelled, n)
    out = ws.stage_dir("label-next")
    out.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame(
        [
            {
                "rank": r + 1,
                "image": images[i],
                "cluster": int(clusters[i]),
                "current_label": current.labels[i],
                "confidence": round(float(current.confidence[i]), 4),
                "reason": reason,
            }
            for r, (i, reason) in enumerate(picks)
        ]
    )
    rows.to_csv(out / "next.csv", index=False)
    standardized = np.load(ws.stage_dir("standardize") / "images.npy", mmap_mode="r")
    order = [i for i, _ in picks]
    montage(
        standardized[order] if order else standardized[:0],
        f"label next: {len(order)} images, in rank order",
        columns=min(10, max(1, len(order))),
    ).save(out / "next.png")
    return out / "next.csv"


def run_simulation(
    workspace: Path, labels_csv: Path, budget: float, rounds: int, overrides: list[str] | None = None
) -> Path:
    """Play the human from ``labels_csv`` on the workspace's last run; write ``results/simulate/``.

    The settings are the workspace's recorded params.yaml (those of its last run) with ``overrides`` (``KEY=VALUE``)
    on top, recorded in the metrics.
    """
    ws = Workspace.at(workspace)
    params = load_params(ws.params, overrides)
    images, vectors, assignments, _ = _load(ws)
    truth = read_labels(labels_csv, known=set(images))
    keep = [i for i, img in enumerate(images) if img in truth]  # e.g. reference images that carry no label
    result = simulate(
        [images[i] for i in keep],
        vectors[keep],
        assignments["cluster"].to_numpy()[keep],
        assignments["distance"].to_numpy()[keep],
        assignments["confidence"].to_numpy()[keep],
        truth,
        budget,
        rounds,
        params,
    )
    out = ws.stage_dir("simulate")
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image": list(result.seeds), "label": list(result.seeds.values())}).to_csv(
        out / "seed_labels.csv", index=False
    )
    pd.DataFrame(result.rounds).to_csv(out / "rounds.csv", index=False)
    metrics = {**result.metrics, "n_unlabelled_images_skipped": len(images) - len(keep), "overrides": overrides or []}
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    return ws.write_json("simulate", metrics)
