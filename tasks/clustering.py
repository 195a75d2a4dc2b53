"""Clustering embedding vectors into candidate defect types, with a confidence per image.

k-means (scikit-learn) on L2-normalised vectors. Confidence is the margin between the nearest and the second
nearest centre, ``1 - d1 / d2``: 0 on a border between two clusters, towards 1 deep inside one. It needs no
assumption about cluster sizes, so rare defect types that form small clusters are not penalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from tasks.config import ClusterParams


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # (N,) int cluster id
    confidence: np.ndarray  # (N,) float in [0, 1]
    distance: np.ndarray  # (N,) distance to the own centre
    model: KMeans


def margin_confidence(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centre, its distance, and ``1 - d1/d2`` from an ``(N, k)`` distance matrix."""
    order = np.argsort(distances, axis=1)
    rows = np.arange(len(distances))
    d1, d2 = distances[rows, order[:, 0]], distances[rows, order[:, 1]]
    conf = np.where(d2 > 0, 1.0 - d1 / np.maximum(d2, 1e-12), 0.0)
    return order[:, 0], d1, np.clip(conf, 0.0, 1.0)


def cluster(vectors: np.ndarray, params: ClusterParams, seed: int) -> Clustering:
    """Fit k-means with ``params.k`` clusters (fewer when there are fewer images)."""
    k = min(params.k, len(vectors))
    if k < 2:
        raise ValueError(f"clustering needs at least 2 images, got {len(vectors)}")
    model = KMeans(n_clusters=k, n_init=params.n_init, random_state=seed).fit(vectors)
    return assign(model, vectors)


def assign(model: KMeans, vectors: np.ndarray) -> Clustering:
    """Assign vectors to a fitted model's clusters (also used for new batches with the champion model)."""
    labels, dist, conf = margin_confidence(model.transform(vectors))
    return Clustering(labels=labels.astype(np.int64), confidence=conf, distance=dist, model=model)


def internal_metrics(vectors: np.ndarray, labels: np.ndarray, seed: int, sample: int = 5000) -> dict[str, object]:
    """Label-free quality: silhouette (on a sample) and cluster sizes."""
    from sklearn.metrics import silhouette_score

    sizes = np.bincount(labels)
    n_used = int((sizes > 0).sum())
    sil = (
        float(silhouette_score(vectors, labels, sample_size=min(sample, len(labels)), random_state=seed))
        if n_used > 1 and len(labels) > n_used
        else float("nan")
    )
    return {
        "silhouette": sil,
        "cluster_sizes": {str(i): int(s) for i, s in enumerate(sizes)},
        "smallest_cluster": int(sizes.min()),
        "largest_cluster": int(sizes.max()),
    }
