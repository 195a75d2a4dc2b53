"""External metrics against ground-truth labels: how well clusters match defect types.

- ``nmi``, ``ari``: scikit-learn, label-permutation invariant.
- ``acc``: Hungarian accuracy, the best one-to-one matching of clusters to classes (scipy).
- ``macro_recall`` and ``per_class_recall``: each cluster mapped to its majority class (many-to-one, as an
  engineer naming clusters would), then recall per class: rare classes count as much as common ones.
- ``purity``: share of images in their cluster's majority class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def hungarian_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Best one-to-one cluster→class matching accuracy (unmatched clusters count as wrong)."""
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    table = _table(t, p)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(y_true))


def _table(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


def majority_mapping(y_true: Sequence[str], clusters: np.ndarray) -> dict[int, str]:
    """Each cluster → its most frequent true class (ties broken by class name)."""
    mapping: dict[int, str] = {}
    y = np.asarray(y_true)
    for c in np.unique(clusters):
        values, counts = np.unique(y[clusters == c], return_counts=True)
        mapping[int(c)] = str(values[np.argmax(counts)])
    return mapping


def evaluate(y_true: Sequence[str], clusters: np.ndarray) -> dict[str, object]:
    """All external metrics for ``clusters`` against ``y_true`` (same order, same length)."""
    y = np.asarray(y_true)
    clusters = np.asarray(clusters)
    if len(y) != len(clusters) or len(y) == 0:
        raise ValueError("need the same, non-zero number of labels and cluster assignments")
    mapping = majority_mapping(y, clusters)
    pred = np.array([mapping[int(c)] for c in clusters])
    classes = sorted(set(y.tolist()))
    per_class = {c: float(np.mean(pred[y == c] == c)) for c in classes}
    counts = {c: int(np.sum(y == c)) for c in classes}
    n_rare = max(1, round(0.2 * len(classes)))
    rare = sorted(classes, key=lambda c: (counts[c], c))[:n_rare]
    return {
        "nmi": float(normalized_mutual_info_score(y, clusters)),
        "ari": float(adjusted_rand_score(y, clusters)),
        "acc": hungarian_accuracy(y, clusters),
        "purity": float(np.mean(pred == y)),
        "macro_recall": float(np.mean(list(per_class.values()))),
        "per_class_recall": per_class,
        "rare_classes": rare,
        "rare_class_recall": float(np.mean([per_class[c] for c in rare])),
        "class_counts": counts,
        "n_labelled": int(len(y)),
        "n_classes": len(classes),
        "cluster_to_class": {str(k): v for k, v in mapping.items()},
    }


def label_metrics(y_true: Sequence[str], labels: Sequence[str], needs_review: np.ndarray) -> dict[str, object]:
    """How good the final labels are: overall, among the auto-accepted ones, and per class.

    ``coverage`` is the share of images accepted without review; ``macro_recall`` averages per-class recall of
    the final labels, so a rare class counts as much as a common one.
    """
    y, lab = np.asarray(y_true), np.asarray(labels)
    accepted = ~np.asarray(needs_review, dtype=bool)
    correct = y == lab
    per_class = {str(c): float(correct[y == c].mean()) for c in sorted(set(y.tolist()))}
    return {
        "overall_accuracy": float(correct.mean()) if len(y) else float("nan"),
        "auto_accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else float("nan"),
        "coverage": float(accepted.mean()) if len(y) else float("nan"),
        "macro_recall": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        "per_class_recall": per_class,
    }
