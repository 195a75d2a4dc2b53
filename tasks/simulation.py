"""Labelling economics: play the human from ground truth to measure accuracy per human label.

The simulated engineer asks ``label-next`` for a batch, labels it from the ground truth, and the labels are
propagated; rounds repeat until the budget (a share of the images) is spent. The result is what a real engineer
would get for that many labels, and ``results/simulate/metrics.json`` records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.annotation import HumanInputs, annotate_with_params, knn_graph, label_next
from tasks.config import Params
from tasks.evaluation import label_metrics


@dataclass(frozen=True)
class SimulationResult:
    metrics: dict[str, object]
    seeds: dict[str, str]
    rounds: list[dict[str, object]]


def simulate(
    images: list[str],
    vectors: np.ndarray,
    clusters: np.ndarray,
    distance: np.ndarray,
    cluster_confidence: np.ndarray,
    truth: dict[str, str],
    budget: float,
    rounds: int,
    params: Params,
) -> SimulationResult:
    """Spend ``budget`` (share of images, e.g. 0.02) on human labels in ``rounds`` rounds; report the outcome."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a share of the images in (0, 1], got {budget}")
    missing = [img for img in images if img not in truth]
    if missing:
        raise ValueError(f"{len(missing)} images have no ground-truth label, e.g. {missing[0]}")
    total = max(1, math.ceil(budget * len(images)))
    per_round = max(1, math.ceil(total / rounds))
    graph = knn_graph(vectors, params.annotate.neighbours)
    seeds: dict[str, str] = {}
    history: list[dict[str, object]] = []

    def run() -> tuple[object, dict[str, object]]:
        human = HumanInputs(cluster_names={}, seeds=dict(seeds), cluster_names_sha256=None, seeds_sha256=None)
        ann = annotate_with_params(params, images, vectors, clusters, cluster_confidence, human, graph)
        return ann, label_metrics([truth[i] for i in images], ann.labels, ann.needs_review)

    ann, _ = run()
    while len(seeds) < total:
        asked = label_next(
            images, vectors, clusters, distance, ann, set(seeds), min(per_round, total - len(seeds)), graph=graph
        )
        if not asked:
            break
        for i, _reason in asked:
            seeds[images[i]] = truth[images[i]]
        ann, m = run()
        history.append({"labels_used": len(seeds), **{k: v for k, v in m.items() if k != "per_class_recall"}})
    _, final = run()
    metrics = {
        **final,
        "labels_used": len(seeds),
        "budget": budget,
        "n_images": len(images),
        "rounds": len(history),
        "hand_labelling_cost_images": len(images),
        "labels_saved_share": 1 - len(seeds) / len(images),
    }
    return SimulationResult(metrics=metrics, seeds=seeds, rounds=history)
