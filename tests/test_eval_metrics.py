"""Evaluation metrics against scikit-learn and brute force, with ties, imbalance and edge cases."""

import warnings

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from fastmsd.eval.metrics import (
    accuracy,
    best_f1_threshold,
    binary_metrics,
    confusion_matrix,
    macro_auc_multilabel,
    macro_f1,
    per_class_recall,
    precision_at_k,
    recall_at_k,
)
from fastmsd.eval.plots import _roc_points, confusion_matrix_plot, roc_curves

SEEDS = range(6)
N_CLASSES = 5


def imbalanced_predictions(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Skewed class frequencies, predictions right about half the time."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(N_CLASSES, size=n, p=[0.5, 0.25, 0.15, 0.07, 0.03])
    pred = np.where(rng.random(n) < 0.5, labels, rng.choice(N_CLASSES, size=n, p=[0.1, 0.3, 0.3, 0.2, 0.1]))
    return pred, labels


def tied_binary(seed: int, n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Integer-valued scores (many ties), about one positive in five, loosely informative."""
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.2
    scores = rng.integers(0, 8, size=n) + 2 * positive
    return scores.astype(float), positive


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_metrics_match_sklearn(seed):
    pred, labels = imbalanced_predictions(seed)
    assert accuracy(pred, labels) == pytest.approx(skm.accuracy_score(labels, pred))
    np.testing.assert_array_equal(confusion_matrix(pred, labels, N_CLASSES),
                                  skm.confusion_matrix(labels, pred, labels=range(N_CLASSES)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rare class may be missing; both sides give NaN then
        ours = per_class_recall(pred, labels, N_CLASSES)
    theirs = skm.recall_score(labels, pred, average=None, labels=range(N_CLASSES), zero_division=np.nan)
    np.testing.assert_allclose(ours, theirs, equal_nan=True)
    assert macro_f1(pred, labels, N_CLASSES) == pytest.approx(
        skm.f1_score(labels, pred, average="macro", zero_division=0))


def test_macro_f1_averaging_over_present_classes():
    labels = np.array([0, 0, 1, 1, 2, 2])
    # Class 2 is never predicted: it counts, with F1 = 0.
    pred = np.array([0, 0, 1, 1, 1, 1])
    assert macro_f1(pred, labels, 3) == pytest.approx(
        skm.f1_score(labels, pred, average="macro", labels=range(3), zero_division=0))
    assert macro_f1(pred, labels, 3) == pytest.approx((1 + 2 / 3 + 0) / 3)
    # Class 3 occurs nowhere: it is left out, where labels=range(4) would average in a 0.
    assert macro_f1(pred, labels, 4) == macro_f1(pred, labels, 3)
    assert macro_f1(labels, labels, 4) == 1.0


def test_recall_of_a_class_without_samples_is_nan_with_a_warning():
    with pytest.warns(UserWarning, match=r"classes \[2\]"):
        recall = per_class_recall(np.array([0, 1, 2]), np.array([0, 1, 1]), 3)
    assert recall[:2] == [1.0, 0.5] and np.isnan(recall[2])


def test_classification_input_errors():
    with pytest.raises(ValueError, match="empty"):
        accuracy(np.array([], dtype=int), np.array([], dtype=int))
    with pytest.raises(ValueError, match="empty"):
        macro_f1(np.array([], dtype=int), np.array([], dtype=int), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        accuracy(np.array([0, 1]), np.array([0]))


def brute_best_threshold(scores, positive):
    precision, recall, thresholds = skm.precision_recall_curve(positive, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = f1.max()
    return max(t for t, f in zip(thresholds, f1, strict=True) if np.isclose(f, best))


@pytest.mark.parametrize("seed", SEEDS)
def test_best_f1_threshold_and_binary_metrics_match_sklearn(seed):
    scores, positive = tied_binary(seed)
    threshold = best_f1_threshold(scores, positive)
    assert threshold == brute_best_threshold(scores, positive)
    # Applied to other (test) scores, as the threshold is meant to be.
    test_scores, test_positive = tied_binary(seed + 100)
    predicted = test_scores >= threshold
    got = binary_metrics(test_scores, test_positive, threshold)
    assert got == pytest.approx({
        "auc": skm.roc_auc_score(test_positive, test_scores),
        "accuracy": skm.accuracy_score(test_positive, predicted),
        "f1": skm.f1_score(test_positive, predicted, zero_division=0),
        "precision": skm.precision_score(test_positive, predicted, zero_division=0),
        "recall": skm.recall_score(test_positive, predicted, zero_division=0),
    })


def test_best_f1_threshold_ties_go_to_the_higher_threshold():
    # Cutting at 0.9 (1 TP, 0 FP) and at 0.5 (2 TP, 2 FP) both give F1 = 2/3 with 2 positives.
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    positive = np.array([1, 1, 0, 0, 0], dtype=bool)
    assert best_f1_threshold(scores, positive) == 0.9


def test_binary_edge_cases():
    with pytest.raises(ValueError, match="positive"):
        best_f1_threshold(np.array([0.1, 0.2]), np.array([False, False]))
    with pytest.raises(ValueError, match="empty"):
        best_f1_threshold(np.array([]), np.array([], dtype=bool))
    with pytest.warns(UserWarning, match="single class"):
        got = binary_metrics(np.array([0.1, 0.7]), np.array([False, False]), 0.5)
    assert np.isnan(got["auc"])
    assert got["precision"] == got["recall"] == got["f1"] == 0.0 and got["accuracy"] == 0.5
    # No sample reaches the threshold: precision 0/0 is 0, not NaN.
    assert binary_metrics(np.array([0.1, 0.7]), np.array([False, True]), 0.9)["precision"] == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_auc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((60, 4)) < [0.5, 0.2, 0.1, 0.05]).astype(int)
    targets[:2, 3] = 1  # every column keeps both classes
    scores = rng.integers(0, 5, size=targets.shape) + targets  # integer scores: ties
    macro, per_label = macro_auc_multilabel(scores, targets)
    expected = [skm.roc_auc_score(targets[:, c], scores[:, c]) for c in range(4)]
    assert per_label == pytest.approx(expected)
    assert macro == pytest.approx(skm.roc_auc_score(targets, scores, average="macro"))


def test_multilabel_single_class_columns_are_skipped_never_wrong():
    scores = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.4], [0.7, 0.5, 0.6]])
    targets = np.array([[0, 1, 0], [1, 1, 0], [1, 1, 0]])
    with pytest.warns(UserWarning, match=r"columns \[1, 2\] with a single class"):
        macro, per_label = macro_auc_multilabel(scores, targets)
    assert per_label[0] == 1.0 and np.isnan(per_label[1]) and np.isnan(per_label[2])
    assert macro == 1.0
    with pytest.warns(UserWarning, match="single class"):
        macro, _ = macro_auc_multilabel(scores[:, 1:], targets[:, 1:])
    assert np.isnan(macro)
    with pytest.raises(ValueError, match="0 or 1"):
        macro_auc_multilabel(scores, targets - 1)
    with pytest.raises(ValueError, match="non-empty"):
        macro_auc_multilabel(np.zeros((0, 3)), np.zeros((0, 3)))


def brute_precision_at_k(sim, query_labels, item_labels, k):
    total = 0.0
    for q, row in enumerate(sim.tolist()):
        ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        total += sum(item_labels[j] == query_labels[q] for j in ranked) / k
    return total / len(sim)


def brute_recall_at_k(sim, k):
    # Pessimistic: every item at least as similar as the true one ranks ahead of or with it.
    return np.mean([sum(s >= row[i] for s in row) <= k for i, row in enumerate(sim.tolist())])


@pytest.mark.parametrize("seed", SEEDS)
def test_retrieval_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, 4, size=(25, 40)).astype(float)  # coarse values: ties everywhere
    query_labels = rng.choice(3, size=25, p=[0.6, 0.3, 0.1])
    item_labels = rng.choice(3, size=40, p=[0.6, 0.3, 0.1])
    ks = (1, 5, 10, 40)
    got = precision_at_k(sim, query_labels, item_labels, ks)
    assert got == pytest.approx({k: brute_precision_at_k(sim, query_labels, item_labels, k) for k in ks})
    sim[np.arange(25), np.arange(25)] += rng.integers(0, 2, size=25)
    got = recall_at_k(sim, ks)
    assert got == pytest.approx({k: brute_recall_at_k(sim, k) for k in ks})


def test_recall_at_k_ties_are_pessimistic():
    assert recall_at_k(np.ones((4, 4)), ks=(1, 3, 4)) == {1: 0.0, 3: 0.0, 4: 1.0}
    assert recall_at_k(np.eye(4), ks=(1,)) == {1: 1.0}


def test_retrieval_input_errors():
    sim = np.zeros((3, 4))
    with pytest.raises(ValueError, match="k=5"):
        precision_at_k(sim, np.zeros(3), np.zeros(4), ks=(1, 5))
    with pytest.raises(ValueError, match="k=5"):
        recall_at_k(sim, ks=(5,))
    with pytest.raises(ValueError, match="non-empty"):
        precision_at_k(np.zeros((0, 4)), np.zeros(0), np.zeros(4), ks=(1,))
    with pytest.raises(ValueError, match="non-empty"):
        recall_at_k(np.zeros((0, 0)), ks=(1,))
    with pytest.raises(ValueError, match="item per query"):
        recall_at_k(np.zeros((4, 3)), ks=(1,))
    with pytest.raises(ValueError, match="do not match"):
        precision_at_k(sim, np.zeros(4), np.zeros(4), ks=(1,))


@pytest.mark.parametrize("seed", range(3))
def test_roc_points_match_sklearn(seed):
    scores, positive = tied_binary(seed)
    fpr, tpr = _roc_points(scores, positive)
    sk_fpr, sk_tpr, _ = skm.roc_curve(positive, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def assert_png(path, min_side=200):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) <= 4000


def test_roc_curves_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=90)
    scores = rng.random((90, 3)) + np.eye(3)[labels]
    out = roc_curves(scores, labels, ["a", "b", "c"], tmp_path / "figs" / "roc.png")
    assert out == tmp_path / "figs" / "roc.png"
    assert_png(out)


def test_roc_curves_skip_a_class_without_samples(tmp_path):
    labels = np.array([0, 1, 0, 1])
    with pytest.warns(UserWarning, match="'absent'"):
        out = roc_curves(np.random.default_rng(0).random((4, 3)), labels, ["a", "b", "absent"],
                         str(tmp_path / "roc.png"))
    assert_png(out)


def test_confusion_matrix_png(tmp_path):
    pred, labels = imbalanced_predictions(0)
    cm = confusion_matrix(pred, labels, N_CLASSES)
    out = confusion_matrix_plot(cm, [f"class {c}" for c in range(N_CLASSES)], tmp_path / "cm.png",
                                title="5x200")
    assert_png(out)
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix_plot(cm, ["a", "b"], tmp_path / "bad.png")
