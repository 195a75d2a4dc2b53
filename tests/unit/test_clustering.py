"""Every clustering method on small synthetic vectors: real scikit-learn and torch, no mocks."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from tasks.clustering import assign, cluster, knn_graph, knn_indices, modularity
from tasks.config import ClusterParams


def _blobs(sizes=(120, 60, 10), d=16, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated groups, one of them rare."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), d)) * 4
    x = np.concatenate([c + rng.normal(size=(n, d)) * 0.5 for c, n in zip(centres, sizes, strict=True)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    return x.astype(np.float32), y


FAST_SCAN = {"epochs": 15, "heads": 3}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "kmeans", "k": 3},
        {"method": "scan", "k": 3, **FAST_SCAN},
        {"method": "scan", "k": 3, "hidden": 16, "self_label": True, "self_label_threshold": 0.9, **FAST_SCAN},
        {"method": "agglomerative", "k": 3},
        {"method": "hdbscan", "min_cluster_size": 5},
    ],
)
def test_methods_recover_groups_including_the_rare_one(kwargs, tmp_path):
    x, y = _blobs()
    result = cluster(x, ClusterParams(**kwargs), seed=0)
    assert result.labels.shape == (len(x),) and result.labels.min() >= 0
    assert adjusted_rand_score(y, result.labels) > 0.9, kwargs
    rare = np.bincount(result.labels[y == 2]).argmax()
    assert (result.labels[y != 2] != rare).all()  # the 10-image group keeps its own cluster
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()
    assert (result.distance >= 0).all()
    # the saved model assigns new vectors the same way (the refresh flow)
    joblib.dump(result.model, tmp_path / "model.pkl")
    again = assign(joblib.load(tmp_path / "model.pkl"), x)
    assert (again.labels == result.labels).mean() > 0.98
    assert np.allclose(again.distance, result.distance, atol=1e-5)


def test_kmeans_k_zero_chooses_k_by_silhouette():
    x, _ = _blobs(sizes=(50, 50, 50, 50))
    result = cluster(x, ClusterParams(method="kmeans", k=0, k_min=2, k_max=6, n_init=3), seed=0)
    assert result.model.n_clusters == 4
    assert set(result.model.info["k_scores"]) == {2, 3, 4, 5, 6}


def test_scan_is_deterministic_and_reports_its_heads():
    x, _ = _blobs()
    params = ClusterParams(method="scan", k=3, **FAST_SCAN)
    a, b = cluster(x, params, seed=1), cluster(x, params, seed=1)
    assert (a.labels == b.labels).all() and np.allclose(a.confidence, b.confidence)
    assert len(a.model.info["head_losses"]) == 3 and 0 <= a.model.info["best_head"] < 3


def test_over_clustering_and_confidence_margin():
    x, y = _blobs()
    result = cluster(x, ClusterParams(method="kmeans", k=6, n_init=3), seed=0)
    assert result.model.n_clusters == 6
    # many-to-one: every cluster is (almost) pure
    for c in range(6):
        members = y[result.labels == c]
        assert len(members) == 0 or np.bincount(members).max() / len(members) > 0.95


def test_hdbscan_noise_goes_to_review():
    x, _ = _blobs()
    scattered = np.random.default_rng(5).normal(size=(6, x.shape[1])).astype(np.float32) * 8
    result = cluster(np.concatenate([x, scattered]), ClusterParams(method="hdbscan", min_cluster_size=5), seed=0)
    n_noise = result.model.info["n_noise"]
    assert n_noise >= 1
    assert (result.confidence == 0.0).sum() >= n_noise


def test_knn_excludes_self():
    x, _ = _blobs(sizes=(20, 20))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    nn = knn_indices(x, 5, chunk=7)
    assert nn.shape == (40, 5) and not (nn == np.arange(40)[:, None]).any()


def test_invalid_k_is_refused():
    with pytest.raises(ValueError):
        ClusterParams(k=1)
    with pytest.raises(ValueError, match="at least 2 images"):
        cluster(np.zeros((1, 3), np.float32), ClusterParams(k=2), seed=0)


def test_modularity_of_known_partitions():
    # two disjoint 4-cliques: the right split scores 1/2, everything in one cluster 0, a wrong split below both
    nn = np.array([[j for j in range(4) if j != i] for i in range(4)] * 1)
    nn = np.concatenate([nn, nn + 4])
    graph = knn_graph(nn)
    right = np.repeat([0, 1], 4)
    assert modularity(graph, right) == pytest.approx(0.5)
    assert modularity(graph, np.zeros(8, int)) == pytest.approx(0.0)
    assert modularity(graph, np.tile([0, 1], 4)) < 0


def test_scan_candidates_are_chosen_by_modularity_and_recorded():
    x, y = _blobs(sizes=(150, 150, 12))
    params = ClusterParams(method="scan", k=3, entropy_weight=[2.0, 0.5], init=["kmeans", "spectral"], **FAST_SCAN)
    result = cluster(x, params, seed=0)
    cands = result.model.info["candidates"]
    assert {(c["init"], c["entropy_weight"]) for c in cands} == {
        ("kmeans", 2.0), ("kmeans", 0.5), ("spectral", 2.0), ("spectral", 0.5)
    }
    best = max(cands, key=lambda c: c["modularity"])
    assert (result.model.info["init"], result.model.info["entropy_weight"]) == (best["init"], best["entropy_weight"])
    assert adjusted_rand_score(y, result.labels) > 0.9


def test_entropy_weight_must_be_non_negative():
    with pytest.raises(ValueError, match="entropy_weight"):
        ClusterParams(entropy_weight=[2.0, -1.0])
    with pytest.raises(ValueError, match="entropy_weight"):
        ClusterParams(entropy_weight=[])
    with pytest.raises(ValueError):
        ClusterParams(init=["ward"])


def test_spectral_start_on_a_sample_above_spectral_n(monkeypatch):
    """Above SPECTRAL_N the spectral start is fitted on a sample and the rest join their nearest cluster."""
    import tasks.clustering as clustering

    x, y = _blobs(sizes=(150, 150, 30))
    monkeypatch.setattr(clustering, "SPECTRAL_N", 120)
    sizes: list[int] = []  # the real spectral_labels, recording the size of the graph it solves
    real = clustering.spectral_labels
    monkeypatch.setattr(clustering, "spectral_labels", lambda g, k, s: sizes.append(g.shape[0]) or real(g, k, s))
    params = ClusterParams(method="scan", k=3, init=["spectral"], entropy_weight=0.5, **FAST_SCAN)
    result = cluster(x, params, seed=0)
    assert sizes == [120] and result.model.info["init"] == "spectral"
    assert adjusted_rand_score(y, result.labels) > 0.9


def test_scan_consensus_keeps_the_medoid_of_all_runs_candidates():
    x, y = _blobs()
    params = ClusterParams(method="scan", k=3, consensus=2, **FAST_SCAN)
    result = cluster(x, params, seed=0)
    info = result.model.info
    # 2 runs x 2 inits x 2 entropy weights, pooled; the kept one agrees best with the others
    assert info["consensus"] == 2
    assert len(info["candidates"]) == 8
    assert {c["seed"] for c in info["candidates"]} == {0, 1}
    mean_ari = [c["mean_ari"] for c in info["candidates"]]
    assert mean_ari[info["medoid"]] == max(mean_ari)
    assert adjusted_rand_score(y, result.labels) > 0.9
    # the model is the medoid's head: assigning the same vectors reproduces the labels
    assert (assign(result.model, x).labels == result.labels).all()
    # off (the default): the modularity winner of one run, no consensus record
    assert "consensus" not in cluster(x, ClusterParams(method="scan", k=3, **FAST_SCAN), seed=0).model.info


def test_consensus_of_one_run_is_refused_at_load():
    with pytest.raises(ValueError, match="consensus must be 0 .off. or at least 2"):
        ClusterParams(method="scan", consensus=1)
    with pytest.raises(ValueError):
        ClusterParams(method="scan", consensus=-1)
