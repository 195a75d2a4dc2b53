"""Drift of a new batch against the data the champion models were trained on.

The clusterer carries a small reference of its training data (``reference_stats``: distance quantiles, cluster
shares, the embedding's mean and spread), so a refresh can tell, with the champion alone, whether a new batch still
looks like what the models know. Three signals, each with a limit in ``params.yaml``'s ``refresh`` section:

- ``far_share``: share of new images farther from their cluster than the ``far_quantile`` of training distances
  (about ``1 - far_quantile`` when nothing changed; new defect types or a new machine push it up);
- ``psi``: population stability index of the cluster shares (a classic: > 0.25 is a significant shift);
- ``mean_shift``: RMS over dimensions of the mean's move in units of the training spread.

No single signal suffices: when a new machine shifts every image the same way (inverted lighting, a rotation),
the centred, normalised vectors all point alike and may sit close to one prototype, so ``far_share`` stays low
while the cluster shares collapse (``psi``) and the mean moves (``mean_shift``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tasks.config import RefreshParams

_QUANTILES = np.linspace(0.0, 1.0, 1001)


def reference_stats(vectors: np.ndarray, labels: np.ndarray, distance: np.ndarray, k: int) -> dict[str, Any]:
    """What a later batch is compared with: computed once at training time, stored in the clusterer."""
    x = np.asarray(vectors, np.float64)
    shares = np.bincount(labels[labels >= 0], minlength=k)[:k] / max(int((labels >= 0).sum()), 1)
    return {
        "n": int(len(x)),
        "distance_quantiles": np.quantile(distance, _QUANTILES).astype(np.float32),
        "cluster_shares": shares.astype(np.float64),
        "mean": x.mean(axis=0).astype(np.float32),
        "std": x.std(axis=0).astype(np.float32),
    }


@dataclass(frozen=True)
class DriftReport:
    far_share: float
    far_threshold: float
    psi: float
    mean_shift: float
    n_images: int
    drifted: bool
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def psi(expected: np.ndarray, actual: np.ndarray, floor: float = 1e-4) -> float:
    """Population stability index between two share vectors (floored so empty bins stay finite)."""
    e = np.maximum(np.asarray(expected, np.float64), floor)
    a = np.maximum(np.asarray(actual, np.float64), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def measure(
    reference: dict[str, Any], vectors: np.ndarray, labels: np.ndarray, distance: np.ndarray, params: RefreshParams
) -> DriftReport:
    """Compare a batch (its vectors and champion assignments) with the training reference."""
    if len(vectors) == 0:
        raise ValueError("no images to measure drift on")
    threshold = float(np.interp(params.far_quantile, _QUANTILES, reference["distance_quantiles"]))
    far_share = float((np.asarray(distance) > threshold).mean())
    k = len(reference["cluster_shares"])
    shares = np.bincount(np.asarray(labels)[labels >= 0], minlength=k)[:k] / max(len(labels), 1)
    stability = psi(reference["cluster_shares"], shares)
    std = np.maximum(np.asarray(reference["std"], np.float64), 1e-6)
    moved = (np.asarray(vectors, np.float64).mean(axis=0) - reference["mean"]) / std
    shift = float(np.sqrt(np.mean(moved**2)))
    reasons = []
    if far_share > params.max_far_share:
        reasons.append(f"far_share {far_share:.3f} > {params.max_far_share}")
    if stability > params.max_psi:
        reasons.append(f"psi {stability:.3f} > {params.max_psi}")
    if shift > params.max_mean_shift:
        reasons.append(f"mean_shift {shift:.3f} > {params.max_mean_shift}")
    return DriftReport(
        far_share=far_share,
        far_threshold=threshold,
        psi=stability,
        mean_shift=shift,
        n_images=int(len(vectors)),
        drifted=bool(reasons),
        reasons=reasons,
    )
