import numpy as np
import pytest

from tasks.clustering import margin_confidence
from tasks.evaluation import evaluate, hungarian_accuracy


def test_perfect_clustering_under_permutation():
    y = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2)
    clusters = np.array([2] * 5 + [0] * 3 + [1] * 2)
    m = evaluate(y, clusters)
    assert m["acc"] == m["nmi"] == m["ari"] == m["macro_recall"] == m["purity"] == pytest.approx(1.0)
    assert m["per_class_recall"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert m["rare_classes"] == ["c"]


def test_hungarian_is_one_to_one_but_recall_is_many_to_one():
    # class a split over two clusters: Hungarian can match only one of them, majority mapping keeps both
    y = np.array(["a"] * 6 + ["b"] * 4)
    clusters = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    assert hungarian_accuracy(y, clusters) == pytest.approx(0.7)
    m = evaluate(y, clusters)
    assert m["macro_recall"] == pytest.approx(1.0)
    assert m["cluster_to_class"] == {"0": "a", "1": "a", "2": "b"}


def test_rare_class_lost_in_a_big_cluster_shows_in_recall():
    y = np.array(["common"] * 18 + ["rare"] * 2)
    clusters = np.zeros(20, dtype=int)
    clusters[:9] = 1
    m = evaluate(y, clusters)
    assert m["per_class_recall"]["rare"] == 0.0
    assert m["rare_class_recall"] == 0.0
    assert m["macro_recall"] == pytest.approx(0.5)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        evaluate(["a", "b"], np.array([0]))


def test_margin_confidence():
    d = np.array([[1.0, 3.0, 4.0], [2.0, 2.0, 5.0], [0.0, 1.0, 1.0]])
    nearest, d1, conf = margin_confidence(d)
    assert nearest.tolist()[0] == 0 and nearest.tolist()[2] == 0
    assert conf == pytest.approx([1 - 1 / 3, 0.0, 1.0])
    assert d1.tolist() == [1.0, 2.0, 0.0]
