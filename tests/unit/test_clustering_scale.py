"""The size switch of tasks.clustering: above LARGE_N vectors, k-means and SCAN fit on a sample and assign all."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from tasks import clustering
from tasks.clustering import cluster, knn_indices
from tasks.config import ClusterParams


def _blobs(sizes=(240, 120, 40), d=16, seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d)) * 4
    x = np.concatenate([c + rng.normal(size=(n, d)) * 0.5 for c, n in zip(centres, sizes, strict=True)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("kwargs", [{"method": "kmeans", "k": 3}, {"method": "scan", "k": 3, "epochs": 15, "heads": 3}])
def test_large_n_fits_on_a_sample_and_assigns_every_vector(kwargs, monkeypatch):
    x, y = _blobs()
    params = ClusterParams(**kwargs)
    small = cluster(x, params, seed=0)
    assert "fit_sample" not in small.model.info  # below the threshold: the exact, unsampled path
    monkeypatch.setattr(clustering, "LARGE_N", 150)
    large = cluster(x, params, seed=0)
    assert large.model.info["fit_sample"] == 150
    assert large.labels.shape == (len(x),) and large.labels.min() >= 0
    assert adjusted_rand_score(y, large.labels) > 0.9
    assert adjusted_rand_score(small.labels, large.labels) > 0.9
    again = cluster(x, params, seed=0)  # the sample is seeded
    assert (again.labels == large.labels).all()


def test_knn_neighbours_do_not_depend_on_the_block_size():
    x, _ = _blobs()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # the same neighbour sets; their order may differ where two similarities tie to the last float32 bit
    # (BLAS rounds a 7-row block and a 400-row block differently), and SCAN uses them as sets
    big, small = knn_indices(x, 5, chunk=4096), knn_indices(x, 5, chunk=7)
    assert (np.sort(big, axis=1) == np.sort(small, axis=1)).all()
