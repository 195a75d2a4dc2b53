from pathlib import Path

import numpy as np
import pytest

from tasks.annotation import (
    BLEND_SPACE,
    EMBEDDING_SPACE,
    HUMAN_SEED,
    NAMED_CLUSTER,
    SEED_METRIC_SPACE,
    SEED_PROPAGATION,
    UNNAMED,
    HeldOut,
    HumanInputError,
    HumanInputs,
    _margin,
    annotate,
    annotate_with_params,
    choose_space,
    cross_validate,
    knn_graph,
    label_next,
    load_cluster_names,
    load_seeds,
    review_order,
    seed_space,
    spread,
)
from tasks.config import Params, load_params
from tasks.evaluation import label_metrics

ROOT = Path(__file__).resolve().parents[2]


def _blobs(seed=0):
    """Three well-separated classes, one of them rare (like a rare defect type), on the unit sphere."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 4
    counts = {"common": 120, "medium": 60, "rare": 8}
    x, y = [], []
    for c, (name, n) in zip(centres, counts.items(), strict=True):
        x.append(c + rng.normal(0, 0.5, (n, 8)))
        y += [name] * n
    v = np.concatenate(x)
    return v / np.linalg.norm(v, axis=1, keepdims=True), np.array(y)


def _none():
    return HumanInputs({}, {}, None, None)


def test_seed_propagation_labels_everything_with_few_seeds():
    v, y = _blobs()
    images = [f"img{i}.png" for i in range(len(y))]
    seeds = {}
    for name in ("common", "medium", "rare"):
        for i in np.flatnonzero(y == name)[:4]:
            seeds[images[i]] = name
    clusters = np.zeros(len(y), dtype=int)
    ann = annotate(images, v, clusters, np.ones(len(y)), HumanInputs({}, seeds, None, "x"), 0.9, 0.1, k=8, folds=3)
    m = label_metrics(list(y), ann.labels, ann.needs_review)
    assert m["overall_accuracy"] > 0.97 and m["per_class_recall"]["rare"] == 1.0
    assert set(ann.source) == {HUMAN_SEED, SEED_PROPAGATION}
    assert all(ann.confidence[[images.index(s) for s in seeds]] == 1.0)
    assert 0.0 <= ann.confidence.min() and ann.confidence.max() <= 1.0


def test_calibrated_confidence_abstains_on_ambiguous_images():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(200, 8))  # no structure: propagation is a guess
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    y = np.array(["a", "b"] * 100)
    images = [f"i{i}" for i in range(200)]
    seeds = {images[i]: y[i] for i in range(40)}
    ann = annotate(images, v, np.zeros(200, int), np.ones(200), HumanInputs({}, seeds, None, "x"), 0.9, 0.1, folds=4)
    assert ann.needs_review[40:].mean() > 0.8  # honest: unsure labels go to review


def test_named_clusters_and_unnamed():
    v, y = _blobs()
    images = [f"img{i}.png" for i in range(len(y))]
    clusters = np.array([{"common": 0, "medium": 1, "rare": 2}[c] for c in y])
    conf = np.full(len(y), 0.5)
    ann = annotate(images, v, clusters, conf, HumanInputs({0: "crack", 2: "void"}, {}, "h", None), 0.9, 0.2)
    assert {ann.labels[i] for i in np.flatnonzero(clusters == 0)} == {"crack"}
    assert {ann.source[i] for i in np.flatnonzero(clusters == 1)} == {UNNAMED}
    assert ann.labels[int(np.flatnonzero(clusters == 1)[0])] == "cluster-1"
    assert {ann.source[i] for i in np.flatnonzero(clusters == 2)} == {NAMED_CLUSTER}


def test_label_next_asks_every_cluster_first_small_ones_included():
    v, y = _blobs()
    images = [f"img{i}.png" for i in range(len(y))]
    clusters = np.array([{"common": 0, "medium": 1, "rare": 2}[c] for c in y])
    dist = np.linalg.norm(v - v.mean(0), axis=1)
    ann = annotate(images, v, clusters, np.full(len(y), 0.5), _none(), 0.9, 0.2)
    picks = label_next(images, v, clusters, dist, ann, set(), 6)
    assert [int(clusters[i]) for i, _ in picks[:3]] == [2, 1, 0]  # smallest cluster first
    assert "most typical" in picks[0][1] and len(picks) == 6 and len({i for i, _ in picks}) == 6
    labelled = {images[i] for i, _ in picks}
    again = label_next(images, v, clusters, dist, ann, labelled, 5)
    assert not labelled & {images[i] for i, _ in again}


def test_label_next_ranks_uncertain_images_by_propagation_margin():
    from tasks.annotation import Annotation

    v, y = _blobs()
    images = [f"img{i}.png" for i in range(len(y))]
    clusters = np.zeros(len(y), dtype=int)
    dist = np.zeros(len(y))
    seeds = {images[i]: y[i] for name in ("common", "medium") for i in np.flatnonzero(y == name)[:4]}
    ann = annotate(images, v, clusters, np.ones(len(y)), HumanInputs({}, seeds, None, "x"), 0.9, 0.1, k=8, folds=3)
    assert ann.margin is not None and ann.margin.shape == (len(y),)
    assert np.all(ann.margin[[images.index(s) for s in seeds]] == 1.0) and ann.margin.min() >= 0.0
    # calibrated confidences tie (a step function); the margin still ranks: the least certain image comes first
    flat = Annotation(ann.labels, np.full(len(y), 0.5), ann.needs_review, ann.source, margin=ann.margin)
    labelled = set(seeds) | {images[int(np.argmin(dist))]}
    picks = label_next(images, v, clusters, dist, flat, labelled, 1)
    free = [i for i in range(len(y)) if images[i] not in labelled]
    assert picks[0][0] == free[int(np.argmin(ann.margin[free]))] and "margin" in picks[0][1]
    # the rare class has no seed: its images sit between the two seeded classes, at the smallest margins
    assert y[picks[0][0]] == "rare"


def test_label_next_asks_once_per_part_of_the_graph_no_seed_reaches():
    v, y = _blobs()
    far = np.flatnonzero(y == "medium")  # a separate blob: no seed there, nothing reaches it
    images = [f"img{i}.png" for i in range(len(y))]
    clusters = np.zeros(len(y), dtype=int)
    seeds = {images[i]: "common" for i in np.flatnonzero(y == "common")[:3]}
    seeds.update({images[i]: "rare" for i in np.flatnonzero(y == "rare")[:2]})
    graph = knn_graph(v, 5)
    ann = annotate(images, v, clusters, np.ones(len(y)), HumanInputs({}, seeds, None, "x"), 0.9, 0.1, graph=graph)
    assert np.all(ann.margin[far] == 0.0)
    picks = label_next(images, v, clusters, np.zeros(len(y)), ann, set(seeds), 5, graph=graph)
    assert len(picks) == 5 and sum(i in set(far.tolist()) for i, _ in picks) == 1


def test_images_no_seed_reaches_go_to_review():
    """A blob without seeds and not linked to any seed in the kNN graph: labelled by the nearest seed's class, but
    never auto-accepted (its raw score is 0, not the 1 a single filled class would give)."""
    v, y = _blobs()
    far = np.flatnonzero(y == "medium")
    images = [f"img{i}.png" for i in range(len(y))]
    seeds = {images[i]: "common" for i in np.flatnonzero(y == "common")[:6]}
    seeds.update({images[i]: "rare" for i in np.flatnonzero(y == "rare")[:4]})
    ann = annotate(
        images, v, np.zeros(len(y), int), np.ones(len(y)), HumanInputs({}, seeds, None, "x"), 0.9, 0.1, k=5, folds=2,
        graph=knn_graph(v, 5),
    )
    assert ann.needs_review[far].all() and (ann.confidence[far] < 0.9).all()
    assert {ann.labels[i] for i in far} <= {"common", "rare"}
    reached = np.setdiff1d(np.arange(len(y)), far)
    assert not ann.needs_review[reached].all()  # the seeded blobs are still accepted


def test_review_order_interleaves_clusters():
    from tasks.annotation import Annotation

    ann = Annotation(["x"] * 6, np.array([0.1, 0.2, 0.3, 0.4, 0.05, 0.9]), np.array([1, 1, 1, 1, 1, 0], bool), [""] * 6)
    order = review_order(ann, np.array([0, 0, 0, 0, 1, 1]))
    assert order.tolist() == [4, 0, 1, 2, 3]


def test_human_input_files_are_validated_with_line_numbers(tmp_path):
    names = tmp_path / "names.yaml"
    names.write_text("0: crack\n1: void\n7: scratch\n")
    with pytest.raises(HumanInputError, match=r"names.yaml:3: unknown cluster 7"):
        load_cluster_names(names, n_clusters=5)
    names.write_text("0: crack\n  bad: [\n")
    with pytest.raises(HumanInputError, match=r"names.yaml:\d+: not valid YAML"):
        load_cluster_names(names, n_clusters=5)
    names.write_text("0: crack\n1: crack\n")
    assert load_cluster_names(names, 5) == {0: "crack", 1: "crack"}
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("image,label\na.png,crack\n../b.png,void\n")
    with pytest.raises(HumanInputError, match=r"seeds.csv:3: image path must be relative"):
        load_seeds(seeds, {"a.png", "b.png"})
    seeds.write_text("image,label\na.png,crack\nzzz.png,void\n")
    with pytest.raises(HumanInputError, match=r"seeds.csv:3: image not in this data version"):
        load_seeds(seeds, {"a.png"})
    seeds.write_text("path;label\n")
    with pytest.raises(HumanInputError, match=r"seeds.csv:1: header"):
        load_seeds(seeds, {"a.png"})


def test_knn_graph_excludes_self():
    v, _ = _blobs()
    idx, sim = knn_graph(v, 5)
    assert idx.shape == (len(v), 5) and not (idx == np.arange(len(v))[:, None]).any()
    assert (sim <= 1.0 + 1e-9).all()


def _nuisance(seed=0):
    """Two classes apart along one weak direction, under a strong nuisance direction (lighting, machine)."""
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b"] * 200)
    v = rng.normal(0, 1, (len(y), 6))
    v[:, 0] *= 12  # nuisance: most of the variance, no class information
    v[:, 1] += np.where(y == "a", -1.5, 1.5)
    return v.astype(np.float32), y


def _nuisance_seeded(n_seeds: int = 40):
    """:func:`_nuisance` with image names, the first ``n_seeds`` images as seeds, one cluster of confidence 1."""
    v, y = _nuisance()
    images = [f"i{i}" for i in range(len(y))]
    human = HumanInputs({}, {images[i]: y[i] for i in range(n_seeds)}, None, "x")
    return v, y, images, human, np.zeros(len(y), int), np.ones(len(y))


def test_seed_metric_is_used_when_held_out_seeds_say_it_helps():
    v, y, images, human, clusters, conf = _nuisance_seeded()
    plain = annotate(images, v, clusters, conf, human, 0.9, 0.1, metric_weight=0.0, space_rule="better")
    learned = annotate(images, v, clusters, conf, human, 0.9, 0.1, metric_weight=1.0, space_rule="better")
    acc = {name: label_metrics(list(y[40:]), a.labels[40:], a.needs_review[40:])["overall_accuracy"]
           for name, a in (("plain", plain), ("learned", learned))}
    assert plain.space == EMBEDDING_SPACE and learned.space == SEED_METRIC_SPACE
    assert learned.held_out_accuracy[SEED_METRIC_SPACE] > learned.held_out_accuracy[EMBEDDING_SPACE]
    assert acc["learned"] > 0.9 and acc["learned"] > acc["plain"] + 0.15, acc


def test_too_few_seeds_keep_the_label_free_space():
    v, y = _nuisance()
    images = [f"i{i}" for i in range(len(y))]
    seeds = {images[0]: y[0], images[1]: y[1], images[2]: y[2]}  # fewer than 2 per class on average
    ann = annotate(images, v, np.zeros(len(y), int), np.ones(len(y)), HumanInputs({}, seeds, None, "x"), 0.9, 0.1)
    assert ann.space == EMBEDDING_SPACE and ann.held_out_accuracy == {}


def test_each_fold_graph_is_built_without_its_held_out_seeds():
    v, y = _nuisance()
    neighbours = knn_graph(v, 10)[0]
    seed_index = np.arange(40)
    seed_class = (y[:40] == "b").astype(int)
    seen: list[set[int]] = []

    def neighbours_for(idx, cls):
        seen.append(set(idx.tolist()))
        return neighbours

    held = cross_validate(neighbours_for, seed_index, seed_class, 2, folds=4, seed=0)
    hidden = [set(range(40)) - s for s in seen]
    assert len(seen) == 4 and all(len(h) == 10 for h in hidden)
    assert set().union(*hidden) == set(range(40))  # every seed held out exactly once
    assert held is not None and len(held.raw) == len(held.hit) == 40


def _held(hits):
    hits = np.asarray(hits, dtype=bool)
    return HeldOut(np.full(len(hits), 0.5), hits)


def test_margin_rule_keeps_the_seed_metric_unless_the_embedding_is_clearly_better():
    # 20 held-out seeds, both spaces on the same folds: both right on 10, only the metric on 3, only the embedding
    # on 4, neither on 3; d = metric - embedding: mean -0.05, SE 0.135 -> "better" switches to the embedding,
    # "margin" does not (a one-seed difference that the folds could flip)
    metric = [True] * 10 + [True] * 3 + [False] * 4 + [False] * 3
    plain_close = [True] * 10 + [False] * 3 + [True] * 4 + [False] * 3
    close = {EMBEDDING_SPACE: _held(plain_close), SEED_METRIC_SPACE: _held(metric)}
    assert choose_space(close, "better") == EMBEDDING_SPACE
    assert choose_space(close, "margin") == SEED_METRIC_SPACE
    # the embedding right on all 20 (6 more): mean(d) = -0.3, SE = 0.105 -> the embedding under both rules
    clear = {EMBEDDING_SPACE: _held([True] * 20), SEED_METRIC_SPACE: _held(metric)}
    assert choose_space(clear, "better") == choose_space(clear, "margin") == EMBEDDING_SPACE
    # a tie: "better" keeps the embedding, "margin" the seed metric; too few seeds: the embedding for every rule
    tie = {EMBEDDING_SPACE: _held(metric), SEED_METRIC_SPACE: _held(metric)}
    assert (choose_space(tie, "better"), choose_space(tie, "margin")) == (EMBEDDING_SPACE, SEED_METRIC_SPACE)
    for rule in ("better", "margin", "blend"):
        assert choose_space({EMBEDDING_SPACE: None}, rule) == EMBEDDING_SPACE
    with pytest.raises(ValueError, match="space rule"):
        choose_space(clear, "best")


def test_blend_spreads_on_both_graphs_and_averages_the_scores():
    v, y, images, human, clusters, conf = _nuisance_seeded()
    blend = annotate(images, v, clusters, conf, human, 0.9, 0.1, space_rule="blend")
    assert blend.space == BLEND_SPACE
    assert set(blend.held_out_accuracy) == {EMBEDDING_SPACE, SEED_METRIC_SPACE, BLEND_SPACE}
    seed_index, seed_class = np.arange(40), (y[:40] == "b").astype(int)
    f_plain = spread(knn_graph(v, 10)[0], seed_index, seed_class, 2)
    f_metric = spread(knn_graph(seed_space(v, seed_index, seed_class, 1.0), 10)[0], seed_index, seed_class, 2)
    expected = (f_plain + f_metric) / 2
    assert np.allclose(blend.margin[40:], _margin(expected)[40:])
    assert blend.labels[40:] == [("a", "b")[c] for c in expected.argmax(axis=1)[40:]]
    # neither space alone gives these margins: the blend is not one of the two spaces under another name
    assert not np.allclose(_margin(f_plain)[40:], _margin(expected)[40:])
    assert not np.allclose(_margin(f_metric)[40:], _margin(expected)[40:])
    # "better" spreads on the seed-metric graph alone here (it predicts held-out seeds better)
    better = annotate(images, v, clusters, conf, human, 0.9, 0.1, space_rule="better")
    assert better.space == SEED_METRIC_SPACE and np.allclose(better.margin[40:], _margin(f_metric)[40:])


def test_the_project_default_averages_the_two_spaces():
    # bench/RESULTS.md "Averaging the two spaces, or a margin for the seed metric": the blend is the default
    v, y, images, human, _, _ = _nuisance_seeded()
    params = load_params(ROOT / "params.yaml")
    assert params.annotate.space_rule == Params().annotate.space_rule == "blend"
    ann = annotate_with_params(params, images, v, np.zeros(len(y), int), np.ones(len(y)), human)
    assert ann.space == BLEND_SPACE
    assert annotate(images, v, np.zeros(len(y), int), np.ones(len(y)), human, 0.9, 0.1).space == BLEND_SPACE


def _plain_probe(v, seed_index, seed_class):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    return probe.fit(v[seed_index], seed_class)


def test_probe_weight_one_labels_like_a_plain_logistic_regression_on_the_seeds():
    v, y, images, human, clusters, conf = _nuisance_seeded()
    seed_index, seed_class = np.arange(40), (y[:40] == "b").astype(int)
    probe = _plain_probe(v, seed_index, seed_class)
    ann = annotate(images, v, clusters, conf, human, 0.9, 0.1, probe_weight=1.0)
    expected = [("a", "b")[c] for c in probe.predict(v)]
    assert ann.labels[40:] == expected[40:]
    assert np.allclose(ann.margin[40:], _margin(probe.predict_proba(v))[40:])
    # the spreading alone labels some images otherwise: the test would notice a probe that is not used
    spread_only = annotate(images, v, clusters, conf, human, 0.9, 0.1)
    assert spread_only.labels[40:] != expected[40:]
    # half and half: a mix of both, so its margins are neither the probe's nor the spreading's
    half = annotate(images, v, clusters, conf, human, 0.9, 0.1, probe_weight=0.5)
    assert not np.allclose(half.margin[40:], ann.margin[40:])
    assert not np.allclose(half.margin[40:], spread_only.margin[40:])


def test_probe_columns_follow_the_class_indices_and_absent_classes_get_zero():
    from tasks.annotation import probe_scores

    v, y = _blobs()
    seed_index = np.concatenate([np.flatnonzero(y == "common")[:5], np.flatnonzero(y == "rare")[:5]])
    seed_class = np.array([0] * 5 + [2] * 5)  # class 1 has no seed here
    p = probe_scores(v, seed_index, seed_class, 3)
    assert p.shape == (len(y), 3) and np.all(p[:, 1] == 0) and np.allclose(p.sum(axis=1), 1)
    assert (p.argmax(axis=1)[y == "rare"] == 2).all() and (p.argmax(axis=1)[y == "common"] == 0).all()
    assert probe_scores(v, seed_index[:5], seed_class[:5], 3) is None  # one class: nothing to fit


def test_held_out_seeds_are_never_scored_by_a_probe_that_saw_them():
    # no structure, more dimensions than seeds: a probe memorises its training seeds, so a probe fitted on all the
    # seeds would score every held-out seed right; honest folds are at chance
    rng = np.random.default_rng(3)
    v = rng.normal(size=(300, 80))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    y = np.array(["a", "b"] * 150)
    images = [f"i{i}" for i in range(300)]
    human = HumanInputs({}, {images[i]: y[i] for i in range(60)}, None, "x")
    seed_index, seed_class = np.arange(60), (y[:60] == "b").astype(int)
    probe = _plain_probe(v, seed_index, seed_class)
    assert (probe.predict(v[:60]) == seed_class).all()  # the premise: it memorises
    ann = annotate(images, v, np.zeros(300, int), np.ones(300), human, 0.9, 0.1, folds=4, probe_weight=1.0)
    assert max(ann.held_out_accuracy.values()) < 0.75, ann.held_out_accuracy


GOLDEN_CONFIDENCE_SUM, GOLDEN_MARGIN_SUM = 396.092505, 196.17699  # _nuisance_seeded() annotated at 1159f91


def test_probe_weight_zero_is_the_spreading_alone(monkeypatch):
    import tasks.annotation as annotation

    v, y, images, human, clusters, conf = _nuisance_seeded()
    # golden values of the code before the probe existed (commit 1159f91)
    before = annotate(images, v, clusters, conf, human, 0.9, 0.1)
    assert round(float(before.confidence.sum()), 6) == GOLDEN_CONFIDENCE_SUM
    assert round(float(before.margin.sum()), 6) == GOLDEN_MARGIN_SUM

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe was fitted with probe_weight 0")

    monkeypatch.setattr(annotation, "probe_scores", no_probe)
    zero = annotate(images, v, clusters, conf, human, 0.9, 0.1, probe_weight=0.0)
    assert zero.labels == before.labels and zero.held_out_accuracy == before.held_out_accuracy
    assert np.array_equal(zero.confidence, before.confidence) and np.array_equal(zero.margin, before.margin)
    params = load_params(ROOT / "params.yaml", ["annotate.probe_weight=0"])
    by_params = annotate_with_params(params, images, v, clusters, conf, human)
    assert np.array_equal(by_params.confidence, before.confidence)


def test_the_project_default_mixes_in_the_probe():
    # bench/RESULTS.md "A logistic probe on the seeds beside label spreading": adopted at 0.5 by a pre-written rule
    v, y, images, human, clusters, conf = _nuisance_seeded()
    params = load_params(ROOT / "params.yaml")
    assert params.annotate.probe_weight == Params().annotate.probe_weight == 0.5
    ann = annotate_with_params(params, images, v, clusters, conf, human)
    half = annotate(images, v, clusters, conf, human, 0.9, 0.1, probe_weight=0.5)
    assert ann.labels == half.labels and np.array_equal(ann.margin, half.margin)
    assert not np.array_equal(ann.margin, annotate(images, v, clusters, conf, human, 0.9, 0.1).margin)


def test_the_probe_leaves_images_no_seed_reached_to_review():
    # a part of the graph without seeds: the probe has an opinion there, but the spreading has no evidence, so
    # these images keep the nearest-seed fallback with confidence 0 and margin 0, as without the probe
    rng = np.random.default_rng(5)
    parts = [np.eye(8)[j] * 4 + rng.normal(0, 0.3, (n, 8)) for j, n in ((0, 30), (1, 30), (5, 12))]
    v = np.concatenate(parts)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    images = [f"i{i}" for i in range(len(v))]
    seeds = {images[i]: "a" for i in range(8)} | {images[30 + i]: "b" for i in range(8)}
    human = HumanInputs({}, seeds, None, "x")
    far = np.arange(60, 72)
    for w in (0.0, 0.5, 1.0):
        ann = annotate(images, v, np.zeros(len(v), int), np.ones(len(v)), human, 0.9, 0.1, k=5, folds=3,
                       probe_weight=w)
        assert np.all(ann.confidence[far] == 0) and np.all(ann.margin[far] == 0) and ann.needs_review[far].all()
        assert ann.margin[16:30].min() > 0 and ann.margin[38:60].min() > 0
