"""Clustering embedding vectors into candidate defect types, with a confidence per image.

Methods (``cluster.method``):

- ``kmeans``: k-means on the vectors. ``cluster.k: 0`` chooses k in ``k_min..k_max`` by the silhouette (label-free).
  A k larger than the number of defect types is *over-clustering*: engineers name clusters, and several clusters
  may get the same name (many-to-one), which keeps rare types from being swallowed by common ones.
- ``scan``: a neighbour-consistency head (SCAN, Van Gansbeke et al. 2020) on the fixed vectors: each image and its
  ``neighbours`` nearest neighbours are pushed into the same cluster, an entropy term keeps every cluster in use;
  ``heads`` heads are trained from different starts and the one with the lowest loss (its own, label-free) is kept;
  optional self-labelling on the confident images. This is done once per start partition (``init``: k-means and/or
  spectral clustering of the neighbour graph) and per ``entropy_weight``, and of these candidates the partition with
  the highest modularity on the neighbour graph is kept: label-free, and not biased to equal sizes, so a rare type
  that forms a tight group can keep its own cluster (a low entropy weight from a spectral start allows that; a high
  one from k-means suits balanced data). ``consensus: N`` (N >= 2) repeats that candidate search with N seeds on
  one shared neighbour graph and keeps, of all N x candidates partitions, the medoid: the one with the highest mean
  adjusted Rand index to the others (label-free; damps partitions that one seed's starts produce and the others
  do not). The model is the medoid's head, so assignment is unchanged.
- ``hdbscan``: density-based (scikit-learn HDBSCAN) on a PCA projection; finds the number of clusters itself;
  noise points are attached to the nearest cluster with confidence 0 (they go to review).
- ``agglomerative``: Ward linkage on a PCA projection (fitted on at most ``max_fit`` images).

Every method returns a :class:`ClusterModel` that can :func:`assign` new vectors later (the refresh flow):
nearest prototype (k-means, HDBSCAN, agglomerative) or the trained head (SCAN). Confidence is a margin in [0, 1]:
``1 - d1/d2`` between the nearest and second-nearest prototypes, or ``p1 - p2`` between the two most probable
clusters of the head. Neither assumes balanced clusters. ``distance`` is the cosine distance to the own cluster's
prototype (smaller = more typical; it orders montages and review).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from tasks.config import ClusterParams

METHODS = ("kmeans", "scan", "hdbscan", "agglomerative")
LARGE_N = 50_000
"""k-means and SCAN are fitted on a seeded sample of this many vectors when there are more, and then every vector is
assigned by the fitted model (prototypes or head), as ``agglomerative`` does with ``max_fit``. SCAN's exact nearest
neighbours cost n**2: 100k vectors took minutes, 1M would take hours (bench/perf.py, "Performance" in
bench/RESULTS.md); a sample this large still gives each of a few dozen clusters hundreds of members."""


@dataclass
class ClusterModel:
    """Everything needed to assign new vectors: plain numpy arrays, picklable, no torch needed."""

    method: str
    prototypes: np.ndarray  # (k, d) L2-normalised cluster centres, in the space the vectors are compared in
    mean: np.ndarray  # (d,) centring applied before comparison
    head: list[tuple[np.ndarray, np.ndarray]] | None = None  # SCAN: [(W, b), ...] layers, ReLU between
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(len(self.prototypes))

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        return assign(self, vectors).labels


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # (N,) int cluster id
    confidence: np.ndarray  # (N,) float in [0, 1]
    distance: np.ndarray  # (N,) cosine distance to the own cluster's prototype
    model: ClusterModel


def _prep(vectors: np.ndarray, mean: np.ndarray) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float32) - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def margin_confidence(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centre, its distance, and ``1 - d1/d2`` from an ``(N, k)`` distance matrix."""
    order = np.argsort(distances, axis=1)
    rows = np.arange(len(distances))
    d1, d2 = distances[rows, order[:, 0]], distances[rows, order[:, 1]]
    conf = np.where(d2 > 0, 1.0 - d1 / np.maximum(d2, 1e-12), 0.0)
    return order[:, 0], d1, np.clip(conf, 0.0, 1.0)


def _head_probs(head: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    h = x
    for i, (w, b) in enumerate(head):
        h = h @ w.T + b
        if i < len(head) - 1:
            h = np.maximum(h, 0)
    h = h - h.max(axis=1, keepdims=True)
    p = np.exp(h)
    return p / p.sum(axis=1, keepdims=True)


def assign(model: ClusterModel, vectors: np.ndarray) -> Clustering:
    """Assign vectors to a fitted model's clusters (also used for new batches with the champion model)."""
    x = _prep(vectors, model.mean)
    cos_dist = np.clip(1.0 - x @ model.prototypes.T, 0.0, 2.0)
    if model.head is not None:
        p = _head_probs(model.head, x)
        top = np.sort(p, axis=1)
        labels = p.argmax(axis=1)
        conf = np.clip(top[:, -1] - top[:, -2], 0.0, 1.0)
    else:
        labels, _, conf = margin_confidence(np.sqrt(np.maximum(cos_dist, 0.0)))
    dist = cos_dist[np.arange(len(x)), labels]
    return Clustering(labels=labels.astype(np.int64), confidence=conf, distance=dist, model=model)


def _prototypes(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    protos = np.zeros((k, x.shape[1]), np.float32)
    for c in range(k):
        members = x[labels == c]
        if len(members):
            protos[c] = members.mean(axis=0)
    return protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Consecutive ids 0..k-1 for the labels >= 0 (noise = -1 kept)."""
    uniq = np.unique(labels[labels >= 0])
    remap = {int(u): i for i, u in enumerate(uniq)}
    return np.array([remap.get(int(v), -1) for v in labels]), len(uniq)


def _kmeans(x: np.ndarray, k: int, n_init: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)


def choose_k(x: np.ndarray, k_min: int, k_max: int, n_init: int, seed: int, sample: int = 3000) -> tuple[int, dict]:
    """k in ``k_min..k_max`` with the best silhouette (cosine, on a sample): a label-free criterion."""
    from sklearn.metrics import silhouette_score

    scores = {}
    for k in range(k_min, min(k_max, len(x) - 1) + 1):
        labels = _kmeans(x, k, n_init, seed)
        scores[k] = float(
            silhouette_score(x, labels, metric="cosine", sample_size=min(sample, len(x)), random_state=seed)
        )
    best = max(scores, key=lambda k: scores[k])
    return best, scores


def _pca(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    dims = min(dims, x.shape[1], len(x))
    return PCA(n_components=dims, random_state=seed).fit_transform(x).astype(np.float32)


def knn_indices(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Indices of the ``k`` nearest neighbours (cosine, self excluded) of L2-normalised rows, in chunks."""
    k = min(k, len(x) - 1)
    chunk = max(1, min(chunk, (1 << 24) // len(x)))  # block + argpartition temporaries ~256 MB whatever n
    out = np.empty((len(x), k), np.int64)
    for i in range(0, len(x), chunk):
        sim = x[i : i + chunk] @ x.T
        sim[np.arange(len(sim)), np.arange(i, i + len(sim))] = -np.inf
        part = np.argpartition(-sim, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1)
        out[i : i + chunk] = np.take_along_axis(part, order, axis=1)
    return out


class _Heads:
    """``H`` SCAN heads trained together as batched tensors (linear, or one hidden ReLU layer)."""

    def __init__(self, n_heads: int, d: int, k: int, hidden: int, gen, init: np.ndarray | None):
        import torch

        def lin(fan_in: int, fan_out: int):
            bound = 1.0 / np.sqrt(fan_in)
            w = (torch.rand((n_heads, fan_out, fan_in), generator=gen) * 2 - 1) * bound
            return w.requires_grad_(), torch.zeros((n_heads, fan_out)).requires_grad_()

        self.layers = [lin(d, hidden), lin(hidden, k)] if hidden else [lin(d, k)]
        if init is not None and not hidden:  # head 0 starts as the k-means prototype classifier
            with torch.no_grad():
                self.layers[0][0][0] = torch.from_numpy(init) * 10.0

    def parameters(self) -> list:
        return [t for layer in self.layers for t in layer]

    def logits(self, x):
        import torch

        h = x.unsqueeze(0).expand(len(self.layers[0][0]), -1, -1)  # (H, B, d)
        for i, (w, b) in enumerate(self.layers):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h  # (H, B, k)

    def export(self, head: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(w[head].detach().numpy().copy(), b[head].detach().numpy().copy()) for w, b in self.layers]


def _scan_loss(p_a, p_b, entropy_weight: float):
    """Per-head SCAN loss: neighbour consistency minus ``entropy_weight`` x entropy of the mean prediction."""
    import torch

    cons = -torch.log((p_a * p_b).sum(-1).clamp_min(1e-8)).mean(-1)  # (H,)
    mean = p_a.mean(-2)
    neg_entropy = (mean * torch.log(mean.clamp_min(1e-8))).sum(-1)
    return cons + entropy_weight * neg_entropy


def _scan(
    x: np.ndarray,
    k: int,
    params: ClusterParams,
    seed: int,
    init: np.ndarray,
    nn: np.ndarray | None = None,
    entropy_weight: float | None = None,
) -> tuple[list, dict]:
    """Train ``params.heads`` SCAN heads on fixed, L2-normalised vectors; return the best head's layers.

    Head 0 starts as the prototype classifier of the partition ``init``; ``nn`` are the neighbour indices
    (:func:`knn_indices`, computed here when not given).
    """
    import torch

    ew = _entropy_weights(params)[0] if entropy_weight is None else float(entropy_weight)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation (and stall on a busy machine)
    try:
        gen = torch.Generator().manual_seed(seed)
        n, d = x.shape
        nn_idx = torch.from_numpy(knn_indices(x, params.neighbours) if nn is None else nn)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        heads = _Heads(params.heads, d, k, params.hidden, gen, _prototypes(x, init, k))
        opt = torch.optim.Adam(heads.parameters(), lr=params.lr, weight_decay=1e-4)
        bs = min(512, n)
        if params.hidden:  # a hidden-layer head 0 cannot be set to the prototypes: fit it to the init partition
            target = torch.from_numpy(np.asarray(init, dtype=np.int64))
            for _ in range(5):
                perm = torch.randperm(n, generator=gen)
                for s in range(max(1, n // bs)):
                    idx = perm[s * bs : (s + 1) * bs]
                    loss = torch.nn.functional.cross_entropy(heads.logits(xt[idx])[0], target[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        for _ in range(params.epochs):
            perm = torch.randperm(n, generator=gen)
            for s in range(max(1, n // bs)):
                idx = perm[s * bs : (s + 1) * bs]
                nb = nn_idx[idx, torch.randint(0, nn_idx.shape[1], (len(idx),), generator=gen)]
                p_a = torch.softmax(heads.logits(xt[idx]), -1)
                p_b = torch.softmax(heads.logits(xt[nb]), -1)
                loss = _scan_loss(p_a, p_b, ew).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        # each head's own loss on every image and all its neighbours: the label-free model selection
        with torch.no_grad():
            p = torch.softmax(heads.logits(xt), -1)  # (H, N, k)
            scores = []
            for h in range(params.heads):
                cons = -torch.log((p[h].unsqueeze(1) * p[h][nn_idx]).sum(-1).clamp_min(1e-8)).mean()
                mean = p[h].mean(0)
                scores.append(float(cons + ew * (mean * torch.log(mean.clamp_min(1e-8))).sum()))
        best = int(np.argmin(scores))
        layers = heads.export(best)
        if params.self_label:
            layers = _self_label(layers, xt, k, params, gen)
    finally:
        torch.set_num_threads(threads)
    return layers, {"head_losses": [round(v, 5) for v in scores], "best_head": best}


def _entropy_weights(params: ClusterParams) -> list[float]:
    w = params.entropy_weight
    return [float(v) for v in w] if isinstance(w, list) else [float(w)]


def knn_graph(nn: np.ndarray):
    """Symmetric 0/1 sparse adjacency of a nearest-neighbour list ``(N, m)`` (i~j when either lists the other)."""
    from scipy import sparse

    n, m = nn.shape
    a = sparse.csr_matrix((np.ones(n * m, np.float32), (np.repeat(np.arange(n), m), nn.ravel())), shape=(n, n))
    a = a.maximum(a.T)
    return a.tocsr()


def modularity(graph, labels: np.ndarray) -> float:
    """Newman modularity of a partition of an undirected graph: the share of edges inside clusters minus what
    random wiring with the same degrees would put there. Label-free; unlike k-means inertia or SCAN's entropy term
    it does not favour equal cluster sizes, and unlike plain neighbour agreement it does not favour one giant
    cluster, so a small, tight cluster (a rare defect type) scores as well as a large one."""
    from scipy import sparse

    labels = np.asarray(labels)
    k = int(labels.max()) + 1
    member = sparse.csr_matrix((np.ones(len(labels)), (np.arange(len(labels)), labels)), shape=(len(labels), k))
    inside = float((member.T @ graph @ member).diagonal().sum())
    two_m = float(graph.sum())
    degree = np.asarray(member.T @ np.asarray(graph.sum(axis=1)).ravel()).ravel()
    return inside / two_m - float(((degree / two_m) ** 2).sum())


def spectral_labels(graph, k: int, seed: int) -> np.ndarray | None:
    """Spectral clustering of the neighbour graph (sklearn, ``cluster_qr``: no k-means restarts), or ``None`` when
    it cannot run (too few images). Unlike k-means it follows the graph, so it keeps small dense groups."""
    from sklearn.cluster import SpectralClustering

    if graph.shape[0] <= 2 * k:
        return None
    sc = SpectralClustering(k, affinity="precomputed", random_state=seed, assign_labels="cluster_qr")
    labels = sc.fit_predict(graph)
    return _relabel(labels)[0] if len(np.unique(labels)) >= 2 else None


SPECTRAL_N = 10_000
"""The spectral start is computed on a seeded sample of this many vectors (its eigen-solve grows faster than n: 27 s
for 20k on a loaded core) and the others join their nearest spectral cluster; SCAN then refines on all of them."""


def _spectral_start(x: np.ndarray, graph, k: int, params: ClusterParams, seed: int) -> np.ndarray | None:
    if len(x) <= SPECTRAL_N:
        return spectral_labels(graph, k, seed)
    idx = np.sort(np.random.default_rng(seed).choice(len(x), size=SPECTRAL_N, replace=False))
    sub = spectral_labels(knn_graph(knn_indices(x[idx], params.neighbours)), k, seed)
    if sub is None:
        return None
    protos = _prototypes(x[idx], sub, int(sub.max()) + 1)
    labels = np.argmax(x @ protos.T, axis=1)
    labels[idx] = sub
    return labels


def _scan_candidate_list(
    x: np.ndarray, k: int, params: ClusterParams, seed: int, kmeans_labels: np.ndarray, nn: np.ndarray, graph
) -> list[dict]:
    """One SCAN head per init (``cluster.init``) and entropy weight, each with its partition and graph modularity."""
    inits: dict[str, np.ndarray] = {}
    for name in params.init:
        labels = kmeans_labels if name == "kmeans" else _spectral_start(x, graph, k, params, seed)
        if labels is not None:
            inits[name] = labels
    out = []
    for name, init in inits.items():
        for ew in _entropy_weights(params):
            head, info = _scan(x, k, params, seed, init, nn=nn, entropy_weight=ew)
            labels = _head_probs(head, x).argmax(axis=1)
            q = modularity(graph, labels)
            out.append(
                {
                    "head": head,
                    "labels": labels,
                    "modularity": q,
                    "seed": seed,
                    "info": {**info, "init": name, "entropy_weight": ew},
                }
            )
    assert out  # kmeans labels always exist; the config forbids an empty init list
    return out


def _candidate_row(c: dict) -> dict:
    return {
        "init": c["info"]["init"],
        "entropy_weight": c["info"]["entropy_weight"],
        "modularity": round(c["modularity"], 5),
    }


def _scan_candidates(
    x: np.ndarray, k: int, params: ClusterParams, seed: int, kmeans_labels: np.ndarray
) -> tuple[list, dict]:
    """SCAN heads from every init (``cluster.init``) and entropy weight; the partition with the highest
    modularity on the neighbour graph wins (label-free model selection across candidates). With
    ``cluster.consensus`` N >= 2, see :func:`_scan_consensus`."""
    nn = knn_indices(x, params.neighbours)
    graph = knn_graph(nn)
    if params.consensus >= 2:
        return _scan_consensus(x, k, params, seed, kmeans_labels, nn, graph)
    cands = _scan_candidate_list(x, k, params, seed, kmeans_labels, nn, graph)
    best = max(cands, key=lambda c: c["modularity"])  # first of equals, as before
    return best["head"], {**best["info"], "candidates": [_candidate_row(c) for c in cands]}


def _scan_consensus(
    x: np.ndarray, k: int, params: ClusterParams, seed: int, kmeans_labels: np.ndarray, nn: np.ndarray, graph
) -> tuple[list, dict]:
    """``cluster.consensus`` runs of the candidate search (seeds ``seed + r``; run 0 reuses the k-means start of
    :func:`cluster`), pooled; the medoid partition (highest mean ARI to the other candidates) is kept, ties going
    to the higher modularity. Memory: the candidates' label vectors only (no n x n co-association)."""
    pool: list[dict] = []
    for r in range(params.consensus):
        start = kmeans_labels if r == 0 else _kmeans(x, k, params.n_init, seed + r)
        pool.extend(_scan_candidate_list(x, k, params, seed + r, start, nn, graph))
    m = len(pool)
    agree = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            agree[i, j] = agree[j, i] = adjusted_rand_score(pool[i]["labels"], pool[j]["labels"])
    mean_ari = (agree.sum(1) - 1.0) / max(m - 1, 1)
    best = max(range(m), key=lambda i: (round(float(mean_ari[i]), 9), pool[i]["modularity"]))
    rows = [
        {**_candidate_row(c), "seed": c["seed"], "mean_ari": round(float(a), 5)}
        for c, a in zip(pool, mean_ari, strict=True)
    ]
    chosen = pool[best]
    return chosen["head"], {
        **chosen["info"],
        "seed": chosen["seed"],
        "consensus": params.consensus,
        "medoid": best,
        "candidates": rows,
    }


def _self_label(layers, xt, k: int, params: ClusterParams, gen) -> list[tuple[np.ndarray, np.ndarray]]:
    """SCAN's self-labelling: train on the head's own confident predictions (class-balanced cross-entropy)."""
    import torch
    from torch.nn import functional as F

    params_t = [(torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()) for w, b in layers]

    def logits(x):
        h = x
        for i, (w, b) in enumerate(params_t):
            h = h @ w.T + b
            if i < len(params_t) - 1:
                h = torch.relu(h)
        return h

    opt = torch.optim.Adam([t for pair in params_t for t in pair], lr=params.lr * 0.5, weight_decay=1e-4)
    bs = min(512, len(xt))
    for _ in range(max(1, params.epochs // 4)):
        with torch.no_grad():
            conf, target = torch.softmax(logits(xt), 1).max(1)
            mask = conf > params.self_label_threshold
        if int(mask.sum()) < k:
            break
        counts = torch.bincount(target[mask], minlength=k).float()
        weight = torch.where(counts > 0, counts.sum() / (k * counts.clamp_min(1)), torch.zeros_like(counts))
        chosen = torch.nonzero(mask).squeeze(1)
        chosen = chosen[torch.randperm(len(chosen), generator=gen)]
        for s in range(0, len(chosen), bs):
            idx = chosen[s : s + bs]
            noisy = xt[idx] + 0.02 * torch.randn(xt[idx].shape, generator=gen)
            loss = F.cross_entropy(logits(noisy), target[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return [(w.detach().numpy().copy(), b.detach().numpy().copy()) for w, b in params_t]


def cluster(vectors: np.ndarray, params: ClusterParams, seed: int) -> Clustering:
    """Fit ``params.method`` on ``vectors`` ``(N, d)`` and assign every vector."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n = len(vectors)
    if n < 2:
        raise ValueError(f"clustering needs at least 2 images, got {n}")
    mean = vectors.mean(axis=0) if params.center else np.zeros(vectors.shape[1], np.float32)
    x = _prep(vectors, mean)
    info: dict[str, Any] = {}
    method = params.method
    if method in ("kmeans", "scan"):
        fit = x
        if n > LARGE_N:  # fit on a sample, assign all (see LARGE_N)
            fit = x[np.sort(np.random.default_rng(seed).choice(n, size=LARGE_N, replace=False))]
            info["fit_sample"] = LARGE_N
        if params.k == 0:
            k, scores = choose_k(fit, params.k_min, min(params.k_max, len(fit) - 1), params.n_init, seed)
            info["k_scores"] = scores
        else:
            k = min(params.k, n)
        labels = _kmeans(fit, k, params.n_init, seed)
        if method == "scan" and k >= 2:
            head, scan_info = _scan_candidates(fit, k, params, seed, labels)
            info.update(scan_info)
            labels = _head_probs(head, fit).argmax(axis=1)
            model = ClusterModel(method, _prototypes(fit, labels, k), mean, head=head, info=info)
            return assign(model, vectors)
        return assign(ClusterModel(method, _prototypes(fit, labels, k), mean, info=info), vectors)
    elif method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        z = _pca(x, params.pca_dims, seed)
        min_size = params.min_cluster_size or max(5, n // 100)
        raw = HDBSCAN(min_cluster_size=min(min_size, n), min_samples=params.min_samples).fit_predict(z)
        labels, k = _relabel(raw)
        if k < 2:  # no density structure: fall back to k-means so the run still yields clusters
            k = min(max(params.k, 2), n)
            labels = _kmeans(x, k, params.n_init, seed)
            info["fallback"] = "kmeans"
        protos = _prototypes(x, labels, k)
        model = ClusterModel(method, protos, mean, info={**info, "n_noise": int((labels < 0).sum())})
        result = assign(model, vectors)
        noise = labels < 0
        conf = np.where(noise, 0.0, result.confidence)
        return Clustering(result.labels, conf, result.distance, model)
    elif method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        k = min(params.k or 8, n)
        rng = np.random.default_rng(seed)
        fit_idx = np.sort(rng.choice(n, size=min(n, params.max_fit), replace=False))
        z = _pca(x, params.pca_dims, seed)
        sub = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z[fit_idx])
        labels = np.full(n, -1)
        labels[fit_idx] = sub
    else:
        raise ValueError(f"cluster.method: unknown {method!r}; choose from {', '.join(METHODS)}")
    model = ClusterModel(method, _prototypes(x, labels, k), mean, info=info)
    return assign(model, vectors)


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
