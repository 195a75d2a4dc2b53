"""From anonymous clusters to labels: human inputs, what to label next, propagation, calibrated confidence.

Humans give two kinds of input, kept as versioned files in the workspace (``human/``):

- ``cluster_names.yaml``: cluster id → label (several clusters may share a label: over-clustering is normal,
  one defect type often forms several clusters);
- ``seed_labels.csv``: ``image,label`` for a few images.

Seed labels are propagated over the k-nearest-neighbour graph of the embeddings (label spreading), which follows
the data's own manifold instead of assuming round, balanced clusters. Once there are enough seeds, the graph can
also be built in the embedding plus a block learned from the seeds (:func:`seed_space`, an LDA projection): the
seeds say which directions separate the classes the human cares about. Which of the two spaces is used is decided
by the seeds themselves (held-out accuracy in cross-validation), so a handful of seeds cannot make it worse. The raw
propagation score is calibrated on the seeds themselves (cross-validated: hide a fold of seeds, propagate from the
rest, and fit an isotonic map from score to "was right"), so ``confidence`` means the estimated probability that
the label is correct. Images below ``accept_confidence`` abstain (``needs_review``). With
``annotate.probe_weight > 0`` the spreading's class shares are mixed with a supervised probe fitted on the seeds
(:func:`probe_scores`, a logistic regression), in the calibration folds as in the final labels.

``label-next`` asks about the images nearest a decision boundary: the smallest *margin* between the propagated
shares of the two likeliest classes (margin sampling). The calibrated confidence is a step function of the score
(isotonic), so large groups of images tie on it and cannot be ranked by it.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from tasks.config import Params

HUMAN_SEED = "human seed"
SEED_PROPAGATION = "seed propagation"
NAMED_CLUSTER = "human-named cluster"
UNNAMED = "unnamed cluster"
EMBEDDING_SPACE = "embedding"
SEED_METRIC_SPACE = "seed-metric"  # the embedding plus the block learned from the seeds
BLEND_SPACE = "blend"  # both graphs (embedding, seed metric), their class scores averaged (annotate.space_rule: blend)
SPACE_RULES = ("better", "blend", "margin")


class HumanInputError(ValueError):
    """A cluster-name or seed-label file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class HumanInputs:
    cluster_names: dict[int, str]
    seeds: dict[str, str]
    cluster_names_sha256: str | None
    seeds_sha256: str | None

    @property
    def digest(self) -> str:
        """One hash over both files (empty inputs hash the empty string)."""
        return hashlib.sha256(f"{self.cluster_names_sha256 or ''}:{self.seeds_sha256 or ''}".encode()).hexdigest()

    def as_lineage(self) -> dict[str, str | None]:
        return {
            "cluster_names_sha256": self.cluster_names_sha256,
            "seed_labels_sha256": self.seeds_sha256,
            "hash": self.digest,
        }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_cluster_names(path: Path, n_clusters: int) -> dict[int, str]:
    """Parse and check a cluster-name YAML file (``3: crack``); errors name the line."""
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise HumanInputError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HumanInputError(f"{path}: expected a mapping of cluster id → label, e.g. '3: crack'")
    lines = {str(k): i for i, line in enumerate(text.splitlines(), start=1) for k in [line.split(":", 1)[0].strip()]}
    names: dict[int, str] = {}
    for key, label in data.items():
        line = lines.get(str(key), "?")
        try:
            cluster = int(key)
        except (TypeError, ValueError):
            raise HumanInputError(f"{path}:{line}: cluster id must be an integer, got {key!r}") from None
        if not 0 <= cluster < n_clusters:
            raise HumanInputError(f"{path}:{line}: unknown cluster {cluster} (this run has 0..{n_clusters - 1})")
        if not isinstance(label, str) or not label.strip():
            raise HumanInputError(f"{path}:{line}: label for cluster {cluster} must be a non-empty string")
        names[cluster] = label.strip()
    return names


def load_seeds(path: Path, images: set[str]) -> dict[str, str]:
    """Parse and check a seed-label CSV (``image,label``); errors name the line."""
    seeds: dict[str, str] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "label"} <= set(reader.fieldnames):
            raise HumanInputError(f"{path}:1: header must have the columns image,label (found {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
            if not image or not label:
                raise HumanInputError(f"{path}:{line}: empty image or label")
            if Path(image).is_absolute() or ".." in Path(image).parts:
                raise HumanInputError(f"{path}:{line}: image path must be relative to the image folder: {image}")
            if image not in images:
                raise HumanInputError(f"{path}:{line}: image not in this data version (or quarantined): {image}")
            if image in seeds and seeds[image] != label:
                raise HumanInputError(f"{path}:{line}: {image} is labelled twice, {seeds[image]!r} and {label!r}")
            seeds[image] = label
    return seeds


def load_human_inputs(folder: Path, images: set[str], n_clusters: int) -> HumanInputs:
    """Read ``folder/cluster_names.yaml`` and ``folder/seed_labels.csv`` when present."""
    names_path, seeds_path = folder / "cluster_names.yaml", folder / "seed_labels.csv"
    names = load_cluster_names(names_path, n_clusters) if names_path.is_file() else {}
    seeds = load_seeds(seeds_path, images) if seeds_path.is_file() else {}
    return HumanInputs(
        cluster_names=names,
        seeds=seeds,
        cluster_names_sha256=_sha(names_path) if names_path.is_file() else None,
        seeds_sha256=_sha(seeds_path) if seeds_path.is_file() else None,
    )


def knn_graph(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of each vector's ``k`` nearest neighbours (itself excluded)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(vectors) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(vectors)
    dist, idx = nn.kneighbors(vectors)
    return idx[:, 1:], 1.0 - dist[:, 1:]


def spread(
    neighbours: np.ndarray,
    seed_index: np.ndarray,
    seed_class: np.ndarray,
    n_classes: int,
    alpha: float = 0.99,
    iterations: int = 50,
) -> np.ndarray:
    """Label spreading on a kNN graph (Zhou et al. 2004): class scores ``(N, C)`` for every node.

    Written on the sparse neighbour lists rather than with ``sklearn.semi_supervised.LabelSpreading`` so that the
    graph is built once and reused across calibration folds and rounds of ``label-next``.
    """
    from scipy import sparse

    n, k = neighbours.shape
    rows = np.repeat(np.arange(n), k)
    w = sparse.csr_matrix((np.ones(n * k), (rows, neighbours.ravel())), shape=(n, n))
    w = w.maximum(w.T)  # symmetric
    d = np.asarray(w.sum(axis=1)).ravel()
    d_inv = sparse.diags(1.0 / np.sqrt(np.maximum(d, 1e-12)))
    s = d_inv @ w @ d_inv
    y0 = np.zeros((n, n_classes))
    y0[seed_index, seed_class] = 1.0
    f = y0.copy()
    for _ in range(iterations):
        f = alpha * (s @ f) + (1 - alpha) * y0
    # class mass normalisation (Zhu et al. 2003): a class with many seeds must not flood its neighbours; seeds
    # picked by label-next are far from uniform over classes
    mass = f.sum(axis=0)
    return f / np.where(mass > 0, mass, 1.0)


def spread_on(
    neighbours: np.ndarray | tuple[np.ndarray, ...], seed_index: np.ndarray, seed_class: np.ndarray, n_classes: int
) -> np.ndarray:
    """:func:`spread` on one graph, or the mean (equal weights) of its class scores on each of several graphs."""
    if isinstance(neighbours, tuple):
        return np.mean([spread(g, seed_index, seed_class, n_classes) for g in neighbours], axis=0)
    return spread(neighbours, seed_index, seed_class, n_classes)


def _scores(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and a raw confidence score in [0, 1] (share of the top class; 0 where nothing reached)."""
    total = f.sum(axis=1)
    pred = f.argmax(axis=1)
    raw = np.where(total > 1e-12, f.max(axis=1) / np.maximum(total, 1e-12), 0.0)
    return pred, raw


def _margin(f: np.ndarray) -> np.ndarray:
    """Share of the top class minus share of the runner-up, in [0, 1]; 0 where nothing reached the node."""
    total = np.maximum(f.sum(axis=1), 1e-12)
    if f.shape[1] < 2:
        return np.where(f.sum(axis=1) > 1e-12, 1.0, 0.0)
    top2 = np.partition(f, f.shape[1] - 2, axis=1)[:, -2:]
    return np.where(f.sum(axis=1) > 1e-12, (top2[:, 1] - top2[:, 0]) / total, 0.0)


def _fill_unreached(
    f: np.ndarray, vectors: np.ndarray, seed_index: np.ndarray, seed_class: np.ndarray
) -> np.ndarray:
    """Nodes the spreading never reached (a graph component without seeds) take their nearest seed's class;
    returns their indices, whose confidence the caller sets to 0 so that they go to review (the filled row alone
    would score 1: one class holds all of its tiny weight)."""
    unreached = np.flatnonzero(f.sum(axis=1) <= 1e-12)
    if len(unreached) == 0 or len(seed_index) == 0:
        return unreached
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=1, metric="cosine").fit(np.asarray(vectors)[seed_index])
    nearest = nn.kneighbors(np.asarray(vectors)[unreached], return_distance=False)[:, 0]
    f[unreached, seed_class[nearest]] = 1e-9
    return unreached


def seed_space_possible(seed_class: np.ndarray, weight: float) -> bool:
    """Enough seeds for :func:`seed_space`: at least 2 classes and 2 seeds per class on average."""
    n_classes = len(np.unique(seed_class))
    return weight > 0 and n_classes >= 2 and len(seed_class) >= 2 * n_classes


def seed_space(vectors: np.ndarray, seed_index: np.ndarray, seed_class: np.ndarray, weight: float) -> np.ndarray | None:
    """The vectors with a block learned from the seeds appended: a shrinkage LDA projection (``C - 1`` dims).

    Clusters and the embedding are learned without labels, so their neighbourhoods mix classes that look alike;
    the seeds say which directions separate the classes the human cares about. The LDA block (mean norm scaled to
    ``weight`` times the original vectors') pulls same-class neighbours together without discarding the label-free
    geometry, which still carries images far from every seed. None when there are too few seeds for a stable fit
    (fewer than 2 classes or fewer than 2 seeds per class on average) or ``weight`` is 0.
    """
    if not seed_space_possible(seed_class, weight):
        return None
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = np.asarray(vectors, dtype=np.float64)
    with warnings.catch_warnings():  # a class with one seed has no spread of its own: a zero covariance is right
        warnings.filterwarnings("ignore", message="Only one sample available", category=UserWarning)
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(x[seed_index], seed_class)
    z = lda.transform(x)
    x_scale = max(float(np.linalg.norm(x, axis=1).mean()), 1e-12)
    z_scale = max(float(np.linalg.norm(z, axis=1).mean()), 1e-12)
    return np.hstack([x / x_scale, weight * z / z_scale]).astype(np.float32)


def probe_scores(
    vectors: np.ndarray, seed_index: np.ndarray, seed_class: np.ndarray, n_classes: int
) -> np.ndarray | None:
    """Class probabilities ``(N, n_classes)`` of a logistic-regression probe fitted on the seed vectors only.

    Columns are the class indices ``0..n_classes-1``; a class without a seed here has probability 0. None when the
    seeds hold fewer than 2 classes (nothing to fit). Standardised inputs, ``C=1``, balanced class weights (rare
    classes have few seeds).
    """
    if len(np.unique(seed_class)) < 2:
        return None
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(vectors)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    probe.fit(x[seed_index], seed_class)
    proba = np.zeros((len(x), n_classes))
    proba[:, probe.classes_] = probe.predict_proba(x)
    return proba


def mix_probe(f: np.ndarray, proba: np.ndarray | None, weight: float) -> np.ndarray:
    """``(1 - weight) * S + weight * P``: S the spreading scores ``f`` as per-row shares, P the probe's
    probabilities (:func:`probe_scores`, fitted on the seeds of the same fold only); rows the spreading never
    reached stay 0 (they keep the nearest-seed fallback and confidence 0 of :func:`_fill_unreached`). ``f`` itself
    when ``weight`` is 0 or there is no probe (fewer than 2 classes among the seeds).

    Why (issue 5, labelling economics): label spreading does not use more labels well (DeepPCB clean set: overall
    accuracy .938 at a 2 % budget, .929 at 5 %), while the classes are linearly separable in the same vectors (a
    logistic regression on all labels: .97); a probe fitted on the seeds gains from every extra label, and the
    graph still carries the rare classes that have one or two seeds.
    """
    if weight <= 0 or proba is None:
        return f
    total = f.sum(axis=1, keepdims=True)
    reached = total[:, 0] > 1e-12
    shares = np.divide(f, total, out=np.zeros_like(f, dtype=float), where=total > 0)
    combined = (1 - weight) * shares + weight * proba
    combined[~reached] = 0.0
    return combined


Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(spread class scores, seed indices, their classes) → the class scores labels are predicted and scored from (e.g.
:func:`mix_probe`); fitted on the given seeds only."""

NeighboursFor = Callable[[np.ndarray, np.ndarray], np.ndarray | tuple[np.ndarray, ...]]
"""(seed indices, their classes) → the kNN lists the labels spread on (the graph may depend on the seeds); a tuple
of them: the class scores are averaged over the graphs (:func:`spread_on`)."""


@dataclass(frozen=True)
class HeldOut:
    """Every seed's propagation score and whether its label came out right when its fold was hidden."""

    raw: np.ndarray
    hit: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.hit.mean()) if len(self.hit) else float("nan")


def cross_validate(
    neighbours_for: NeighboursFor,
    seed_index: np.ndarray,
    seed_class: np.ndarray,
    n_classes: int,
    folds: int,
    seed: int,
    scorer: Scorer | None = None,
) -> HeldOut | None:
    """Hide each fold of seeds in turn and propagate from the rest; None when there are too few seeds.

    Each fold's graph is built from the other folds' seeds only (``neighbours_for``): a metric learned from the
    held-out seeds would make them look easier than the images they stand for. ``scorer`` (the probe of
    :func:`mix_probe`), when given, turns each fold's spread scores into the final ones, fitted on the fold's
    training seeds only.
    """
    if len(seed_index) < 2 * folds or n_classes < 2:
        return None
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(len(seed_index)) % folds
    raws, hits = [], []
    for f_id in range(folds):
        held = fold_of == f_id
        neighbours = neighbours_for(seed_index[~held], seed_class[~held])
        f = spread_on(neighbours, seed_index[~held], seed_class[~held], n_classes)
        if scorer is not None:
            f = scorer(f, seed_index[~held], seed_class[~held])
        pred, raw = _scores(f[seed_index[held]])
        raws.append(raw)
        hits.append(pred == seed_class[held])
    return HeldOut(np.concatenate(raws), np.concatenate(hits))


def choose_space(checked: dict[str, HeldOut | None], rule: str = "better") -> str:
    """The space the seed labels spread in, from each candidate's cross-validation (``annotate.space_rule``).

    better: the seed metric when its held-out accuracy is higher than the embedding's (ties: the embedding).
    margin: the seed metric unless the embedding predicts held-out seeds better by more than one standard error of
    the paired difference (both spaces are cross-validated on the same folds, so seed i is held out in both):
    a difference the folds can flip does not switch the space.
    blend: both graphs, class scores averaged (:data:`BLEND_SPACE`), when it could be cross-validated.
    Too few seeds for a candidate (no cross-validation): the embedding.
    """
    if rule not in SPACE_RULES:
        raise ValueError(f"unknown space rule {rule!r}; one of {SPACE_RULES}")
    plain_cv, metric_cv = checked.get(EMBEDDING_SPACE), checked.get(SEED_METRIC_SPACE)
    if rule == "blend":
        return BLEND_SPACE if checked.get(BLEND_SPACE) is not None else EMBEDDING_SPACE
    if plain_cv is None or metric_cv is None:
        return EMBEDDING_SPACE
    if rule == "margin":
        d = metric_cv.hit.astype(float) - plain_cv.hit.astype(float)
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        return EMBEDDING_SPACE if float(d.mean()) < -se else SEED_METRIC_SPACE
    return SEED_METRIC_SPACE if metric_cv.accuracy > plain_cv.accuracy else EMBEDDING_SPACE


def calibrator(held_out: HeldOut | None) -> Callable[[np.ndarray], np.ndarray]:
    """Score → P(correct), isotonic on the held-out seeds; the identity when there are none."""
    from sklearn.isotonic import IsotonicRegression

    if held_out is None:
        return lambda raw: raw
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    iso.fit(held_out.raw, held_out.hit.astype(float))
    return iso.predict


@dataclass(frozen=True)
class Annotation:
    labels: list[str]
    confidence: np.ndarray
    needs_review: np.ndarray
    source: list[str]
    # propagation margin (top minus runner-up class share, before calibration; 1 for seeds): what label-next ranks
    # by. None when there are no seeds or the annotation was read back from a labels.csv.
    margin: np.ndarray | None = None
    # where the seed labels spread (EMBEDDING_SPACE or SEED_METRIC_SPACE) and each candidate space's held-out seed
    # accuracy (cross-validated; what chose the space). None / empty without seeds.
    space: str | None = None
    held_out_accuracy: dict[str, float] = field(default_factory=dict)


def annotate(
    images: list[str],
    vectors: np.ndarray,
    clusters: np.ndarray,
    cluster_confidence: np.ndarray,
    human: HumanInputs,
    accept_confidence: float,
    review_below: float,
    k: int = 10,
    folds: int = 5,
    seed: int = 0,
    graph: tuple[np.ndarray, np.ndarray] | None = None,
    metric_weight: float = 1.0,
    space_rule: str = "blend",
    probe_weight: float = 0.0,
) -> Annotation:
    """A label, a confidence and a source for every image.

    Order of authority: a human seed; else a confident seed propagation; else the human name of its cluster;
    else an uncertain propagation (needs review); else the anonymous cluster. ``graph`` is the kNN graph of
    ``vectors`` when the caller has it. With ``metric_weight > 0`` and enough seeds, the labels also spread on the
    graph of :func:`seed_space`; ``space_rule`` says how the two are combined or chosen (:func:`choose_space`):
    by default (blend) the two class-score matrices are averaged, which does not flip with the calibration folds.
    With ``probe_weight > 0`` the propagated shares are mixed with a logistic probe on the seeds (:func:`mix_probe`),
    in every calibration fold (probe fitted on that fold's training seeds) and for the final labels alike.
    """
    n = len(images)
    labels = [f"cluster-{int(c)}" for c in clusters]
    source = [UNNAMED] * n
    confidence = np.asarray(cluster_confidence, dtype=float).copy()
    needs_review = confidence < review_below
    margin = None
    space, held_out = None, {}
    for i, c in enumerate(clusters):
        if int(c) in human.cluster_names:
            labels[i], source[i] = human.cluster_names[int(c)], NAMED_CLUSTER
    if human.seeds:
        classes = sorted(set(human.seeds.values()))
        index = {img: i for i, img in enumerate(images)}
        seed_index = np.array([index[img] for img in human.seeds])
        seed_class = np.array([classes.index(lab) for lab in human.seeds.values()])
        plain: list[np.ndarray] = [graph[0]] if graph is not None else []

        def embedding_graph(idx: np.ndarray, cls: np.ndarray) -> np.ndarray:
            if not plain:
                plain.append(knn_graph(vectors, k)[0])
            return plain[0]

        learned_graphs: dict[bytes, np.ndarray] = {}  # a fold's graph serves the blend and the metric alone

        def seed_metric_graph(idx: np.ndarray, cls: np.ndarray) -> np.ndarray:
            key = idx.tobytes() + cls.tobytes()
            if key not in learned_graphs:
                learned = seed_space(vectors, idx, cls, metric_weight)
                learned_graphs[key] = embedding_graph(idx, cls) if learned is None else knn_graph(learned, k)[0]
            return learned_graphs[key]

        def blend_graphs(idx: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return embedding_graph(idx, cls), seed_metric_graph(idx, cls)

        # the space the labels spread in: both graphs (blend), or one chosen by the held-out seeds
        n_classes = len(classes)
        spaces: dict[str, NeighboursFor] = {EMBEDDING_SPACE: embedding_graph}
        if seed_space_possible(seed_class, metric_weight):
            spaces[SEED_METRIC_SPACE] = seed_metric_graph
            if space_rule == "blend":
                spaces[BLEND_SPACE] = blend_graphs
        probes: dict[bytes, np.ndarray | None] = {}  # a fold's probe serves every candidate space

        def probe_scorer(f: np.ndarray, idx: np.ndarray, cls: np.ndarray) -> np.ndarray:
            key = idx.tobytes() + cls.tobytes()
            if key not in probes:
                probes[key] = probe_scores(vectors, idx, cls, n_classes)
            return mix_probe(f, probes[key], probe_weight)

        scorer = probe_scorer if probe_weight > 0 else None
        checked = {
            name: cross_validate(fn, seed_index, seed_class, n_classes, folds, seed, scorer)
            for name, fn in spaces.items()
        }
        space = choose_space(checked, space_rule)  # too few seeds: the label-free space
        neighbours = spaces[space](seed_index, seed_class)
        f = spread_on(neighbours, seed_index, seed_class, n_classes)
        if scorer is not None:
            f = scorer(f, seed_index, seed_class)
        margin = _margin(f)  # before the fallback: a node no seed reached is as uncertain as it gets
        unreached = _fill_unreached(f, vectors, seed_index, seed_class)
        pred, raw = _scores(f)
        prob = np.clip(calibrator(checked[space])(raw), 0, 1)
        prob[unreached] = 0.0  # no evidence at all (calibration, fitted on reached seeds, knows nothing of them)
        held_out = {name: round(c.accuracy, 4) for name, c in checked.items() if c is not None}
        for i in range(n):
            if source[i] == NAMED_CLUSTER and prob[i] < accept_confidence:
                continue  # a human-named cluster beats an unsure propagation
            labels[i], source[i], confidence[i] = classes[pred[i]], SEED_PROPAGATION, prob[i]
        needs_review = confidence < accept_confidence
        for img, lab in human.seeds.items():
            i = index[img]
            labels[i], source[i], confidence[i], needs_review[i], margin[i] = lab, HUMAN_SEED, 1.0, False, 1.0
    return Annotation(
        labels=labels,
        confidence=confidence,
        needs_review=needs_review,
        source=source,
        margin=margin,
        space=space,
        held_out_accuracy=held_out,
    )


def annotate_with_params(
    params: Params,
    images: list[str],
    vectors: np.ndarray,
    clusters: np.ndarray,
    cluster_confidence: np.ndarray,
    human: HumanInputs,
    graph: tuple[np.ndarray, np.ndarray] | None = None,
) -> Annotation:
    """:func:`annotate` with the settings of params.yaml (``annotate.*``, ``cluster.review_below``, the seed)."""
    return annotate(
        images,
        vectors,
        clusters,
        cluster_confidence,
        human,
        accept_confidence=params.annotate.accept_confidence,
        review_below=params.cluster.review_below,
        k=params.annotate.neighbours,
        folds=params.annotate.calibration_folds,
        seed=params.base.seed,
        graph=graph,
        metric_weight=params.annotate.metric_weight,
        space_rule=params.annotate.space_rule,
        probe_weight=params.annotate.probe_weight,
    )


def review_order(annotation: Annotation, clusters: np.ndarray) -> np.ndarray:
    """Indices of the images that need review, most informative first.

    Lowest confidence first, but interleaved across clusters so that a small cluster's doubts are not buried
    under a big cluster's.
    """
    todo = np.flatnonzero(annotation.needs_review)
    if len(todo) == 0:
        return todo
    order = todo[np.argsort(annotation.confidence[todo], kind="stable")]
    rank_in_cluster = np.zeros(len(order), dtype=int)
    seen: dict[int, int] = {}
    for j, i in enumerate(order):
        c = int(clusters[i])
        rank_in_cluster[j] = seen.get(c, 0)
        seen[c] = rank_in_cluster[j] + 1
    return order[np.lexsort((annotation.confidence[order], rank_in_cluster))]


def _components(neighbours: np.ndarray) -> np.ndarray:
    """Connected component of every node of the (symmetrised) kNN graph."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    n, k = neighbours.shape
    w = sparse.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), neighbours.ravel())), shape=(n, n))
    return connected_components(w, directed=True, connection="weak")[1]


def label_next(
    images: list[str],
    vectors: np.ndarray,
    clusters: np.ndarray,
    distance: np.ndarray,
    annotation: Annotation,
    labelled: set[str],
    n: int,
    graph: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[tuple[int, str]]:
    """The ``n`` images whose labels would help most: ``[(index, reason)]``.

    1. the most typical unlabelled image of every cluster that has no human label yet (small clusters included:
       rare defect types often *are* the small clusters), smallest clusters first;
    2. then the images nearest a decision boundary: smallest propagation margin between the two likeliest
       classes (``annotation.margin``; the calibrated confidence when there is none), skipping near-duplicates of
       images already chosen (a label on one of two look-alikes tells little about the other).
    """
    chosen: list[tuple[int, str]] = []
    taken: set[int] = set()
    is_labelled = np.array([img in labelled for img in images])
    sizes = np.bincount(clusters)
    covered = {int(c) for c in clusters[is_labelled]}
    for c in sorted(set(int(x) for x in clusters) - covered, key=lambda c: (sizes[c], c)):
        members = np.flatnonzero((clusters == c) & ~is_labelled)
        if len(members) and len(chosen) < n:
            i = int(members[np.argmin(distance[members])])
            chosen.append((i, f"most typical image of cluster {c} ({sizes[c]} images), which has no label yet"))
            taken.add(i)
    if len(chosen) >= n:
        return chosen[:n]
    neighbours = (graph or knn_graph(vectors, 10))[0]
    blocked = set(taken) | set(np.flatnonzero(is_labelled).tolist())
    near = {int(j) for i in taken for j in neighbours[i, :3]}
    margin = annotation.margin
    # nodes no seed reached have margin 0 and tie: one per connected part of the graph is enough to reach the rest
    component = _components(neighbours) if margin is not None and (margin <= 0).any() else None
    asked_parts: set[int] = set()
    for i in np.argsort(annotation.confidence if margin is None else margin, kind="stable"):
        i = int(i)
        if len(chosen) >= n:
            break
        if i in blocked or i in near:
            continue
        if component is not None and margin[i] <= 0:
            if int(component[i]) in asked_parts:
                continue
            asked_parts.add(int(component[i]))
        why = f"confidence {annotation.confidence[i]:.2f} for {annotation.labels[i]!r}"
        if margin is not None and margin[i] <= 0:
            why = f"no seed label reaches it (a part of the neighbour graph without seeds), {why}"
        elif margin is not None:
            why = f"margin {margin[i]:.3f} over the runner-up class, {why}"
        chosen.append((i, f"uncertain: {why}"))
        near.update(int(j) for j in neighbours[i, :3])
    return chosen
