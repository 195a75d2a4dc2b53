"""cluster.stable_graph (bench/RESULTS.md, "Seventh round"): SCAN's neighbour graph keeps only the edges two
embeddings agree on. Real numpy, scikit-learn, torch and lightly; no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from tasks.clustering import _neighbours, _prep, cluster, knn_graph, knn_indices, stable_neighbours
from tasks.config import ClusterParams, EmbedParams, Params, load_params
from tasks.embedding import GRAPH_SEED_OFFSET, fit_embedder, fit_graph_vectors

FAST_SCAN = {"epochs": 15, "heads": 3}


def _unit(x: np.ndarray) -> np.ndarray:
    return _prep(x, np.zeros(x.shape[1], np.float32))


def _groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three groups (60, 40, 12 images). In view 1 groups 0 and 1 touch (a bridge of shared neighbours), in view 2
    groups 1 and 2 touch; apart from that the views are two noisy copies of the same images."""
    rng = np.random.default_rng(seed)
    sizes = (60, 40, 12)
    y = np.repeat(np.arange(3), sizes)
    base = rng.normal(size=(3, 16)) * 4
    own = rng.normal(size=(len(y), 16)) * 0.6
    one = base.copy()
    one[1] = one[0] + rng.normal(size=16) * 0.6  # 0 and 1 nearly coincide in view 1
    two = base.copy()
    two[2] = two[1] + rng.normal(size=16) * 0.6  # 1 and 2 nearly coincide in view 2
    v1 = one[y] + own + rng.normal(size=own.shape) * 0.2
    v2 = two[y] + own + rng.normal(size=own.shape) * 0.2
    return v1.astype(np.float32), v2.astype(np.float32), y


def test_stable_neighbours_keep_exactly_the_edges_both_views_list():
    v1, v2, _ = _groups()
    a, b = _unit(v1), _unit(v2)
    m = 8
    nn, counts = stable_neighbours([a, b], m)
    first, second = knn_indices(a, m), knn_indices(b, m)
    for i in range(len(a)):
        both = [j for j in first[i] if j in set(second[i])]
        expected = both or [first[i][0]]  # fallback: the first view's nearest neighbour
        assert counts[i] == len(expected)
        assert nn[i, : counts[i]].tolist() == expected  # in the first view's order
        assert set(nn[i].tolist()) == set(expected)  # the padding repeats kept neighbours only
    assert counts.min() >= 1 and counts.max() <= m and (counts < m).any()
    # the graph SCAN and the modularity selection see: the symmetrised kept edges, nothing else
    graph = knn_graph(nn, counts)
    kept = {(i, int(j)) for i in range(len(a)) for j in nn[i, : counts[i]]}
    assert {(int(i), int(j)) for i, j in zip(*graph.nonzero(), strict=True)} == kept | {(j, i) for i, j in kept}
    assert graph.max() == 1  # no edge counted twice


def test_identical_views_give_the_plain_neighbour_graph():
    v1, _, _ = _groups()
    x = _unit(v1)
    nn, counts, graph = _neighbours([x, x.copy()], 10)
    assert (counts == 10).all() and np.array_equal(nn, knn_indices(x, 10))
    assert (graph != knn_graph(knn_indices(x, 10))).nnz == 0


def test_the_stable_graph_drops_bridges_that_only_one_view_has():
    v1, v2, y = _groups()
    x1, x2 = _unit(v1 - v1.mean(0)), _unit(v2 - v2.mean(0))
    cross = lambda g: sum(y[i] != y[j] for i, j in zip(*g.nonzero(), strict=True))  # noqa: E731
    plain = knn_graph(knn_indices(x1, 10))
    _, _, stable = _neighbours([x1, x2], 10)
    assert cross(plain) > 50  # view 1 alone links groups 0 and 1
    assert cross(stable) < cross(plain) / 5
    params = ClusterParams(method="scan", k=3, stable_graph=True, **FAST_SCAN)
    result = cluster(v1, params, seed=0, graph_vectors=v2)
    info = result.model.info["stable_graph"]
    assert 1 <= info["mean_neighbours"] < 10 and info["edges"] == stable.nnz // 2
    assert adjusted_rand_score(y, result.labels) > 0.9


def test_off_by_default_and_graph_vectors_are_then_ignored():
    v1, v2, _ = _groups()
    assert ClusterParams().stable_graph is False and load_params().cluster.stable_graph is False
    params = ClusterParams(method="scan", k=3, **FAST_SCAN)
    plain = cluster(v1, params, seed=0)
    again = cluster(v1, params, seed=0, graph_vectors=v2)
    assert np.array_equal(plain.labels, again.labels) and "stable_graph" not in again.model.info


def test_stable_graph_is_validated():
    with pytest.raises(ValueError, match="stable_graph needs method scan"):
        ClusterParams(method="kmeans", stable_graph=True)
    with pytest.raises(ValueError, match="stable_graph needs a trained block"):
        Params(embed={"method": "combo", "blocks": {"morph": 1.0, "stats": 0.5}}, cluster={"stable_graph": True})
    with pytest.raises(ValueError):
        ClusterParams(stable_graph="sometimes")
    assert Params(cluster={"stable_graph": True}).cluster.stable_graph  # the default blocks include simclr
    v1, v2, _ = _groups()
    params = ClusterParams(method="scan", k=3, stable_graph=True, **FAST_SCAN)
    with pytest.raises(ValueError, match="needs a second embedding"):
        cluster(v1, params, seed=0)
    with pytest.raises(ValueError, match="graph_vectors has 10 rows"):
        cluster(v1, params, seed=0, graph_vectors=v2[:10])


def _images(n=24, size=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.normal(120, 8, (n, size, size))
    out[1::2, size // 3 : -size // 3, size // 3 : -size // 3] = 230
    return np.clip(out, 0, 255).astype(np.uint8)


def test_graph_vectors_retrain_simclr_on_another_seed_and_share_the_descriptors():
    torch.set_num_threads(1)
    images = _images()
    params = EmbedParams(
        method="combo", blocks={"stats": 0.5, "simclr": 0.5}, epochs=1, batch_size=8, input_size=0, max_train_images=16
    )
    cache: dict = {}
    _, first, _ = fit_embedder(images, params, seed=0, cache=cache)
    second, report = fit_graph_vectors(images, params, seed=0, cache=cache)
    _, direct, _ = fit_embedder(images, params, seed=GRAPH_SEED_OFFSET)
    assert report.epochs == 1 and report.train_seconds > 0  # trained again, the same epochs
    assert np.allclose(second, direct, atol=1e-6)  # = the embedding of seed + 1000
    d = len(cache["stats"][0].mean)
    assert np.array_equal(first[:, :d], second[:, :d])  # the descriptor block is the same
    assert not np.allclose(first[:, d:], second[:, d:])  # the SimCLR block is another training


def test_the_stages_write_and_use_the_second_embedding(tmp_path):
    import pandas as pd

    from tasks.stages import run_cluster, run_embed
    from tasks.workspace import Workspace

    ws = Workspace.at(tmp_path)
    std = ws.stage_dir("standardize")
    std.mkdir(parents=True)
    images = _images(n=40)
    np.save(std / "images.npy", images)
    pd.DataFrame({"image": [f"{i}.png" for i in range(len(images))], "sha256": "x"}).to_csv(
        std / "index.csv", index=False
    )
    embed = {"blocks": {"stats": 0.5, "simclr": 0.5}, "epochs": 1, "batch_size": 8, "input_size": 0}
    small = {"k": 2, "neighbours": 5, **FAST_SCAN}
    off = Params(base={"threads": 1}, embed=embed, cluster=small)
    run_embed(ws, off)
    assert not (ws.stage_dir("embed") / "graph_vectors.npy").exists()  # off: nothing extra
    run_cluster(ws, off)
    on = Params(base={"threads": 1}, embed=embed, cluster={**small, "stable_graph": True})
    with pytest.raises(FileNotFoundError, match="graph_vectors.npy is missing"):
        run_cluster(ws, on)
    metrics = run_embed(ws, on)
    graph = np.load(ws.stage_dir("embed") / "graph_vectors.npy")
    vectors = np.load(ws.stage_dir("embed") / "vectors.npy")
    assert graph.shape == vectors.shape and not np.allclose(graph, vectors)
    assert metrics["graph_train_seconds"] > 0
    run_cluster(ws, on)
    import joblib

    assert "stable_graph" in joblib.load(ws.stage_dir("cluster") / "model.pkl").info
