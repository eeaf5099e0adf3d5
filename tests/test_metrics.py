"""Metrics against hand computations, ties and single-class edge cases included."""

import itertools

import numpy as np
import pytest

from fastmsd.eval.metrics import macro_auc_ovr, roc_auc


def pairwise_auc(scores, positive):
    """P(score of a positive > score of a negative), ties counted as one half."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    assert roc_auc(scores, positive) == pytest.approx(pairwise_auc(scores, positive))


def test_roc_auc_extremes():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5


def test_single_class_is_nan_with_a_warning():
    with pytest.warns(UserWarning, match="single class"):
        assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_macro_ovr():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])
    macro, per_class = macro_auc_ovr(scores, labels)
    assert per_class == [pytest.approx(pairwise_auc(scores[:, 0], labels == 0)),
                         pytest.approx(pairwise_auc(scores[:, 1], labels == 1))]
    assert macro == pytest.approx(np.mean(per_class))
