"""Linear probe: sampling rule, logistic fit against scikit-learn, probe report and feature cache."""

import warnings

import numpy as np
import pytest
import torch

from fastmsd.eval.probe import (
    FRACTIONS,
    cached_features,
    fit_logistic,
    linear_probe,
    predict_scores,
    sample_indices,
)


def clusters(n, d=8, c=4, spread=1.0, seed=0, shift=3.0):
    """Gaussian clusters around random centres (offset so that standardisation matters)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1000).normal(size=(c, d)) * 1.5
    y = rng.permutation(np.arange(n) % c)
    return (centres[y] + spread * rng.normal(size=(n, d)) + shift).astype(np.float32), y


def multilabel_data(n, d=8, c=3, seed=0, rate=0.3):
    """Features that are a noisy linear image of independent 0/1 labels."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < rate).astype(np.int64)
    mix = np.random.default_rng(1000).normal(size=(c, d)) * 2
    return y @ mix + rng.normal(size=(n, d)) - 1.0, y


# --- sample_indices ---------------------------------------------------------------------------------------


def test_sample_indices_deterministic_sorted_and_sized():
    a = sample_indices(1000, 0.1, seed=3)
    assert np.array_equal(a, sample_indices(1000, 0.1, seed=3))
    assert np.array_equal(a, np.sort(a)) and len(np.unique(a)) == 100
    assert not np.array_equal(a, sample_indices(1000, 0.1, seed=4))
    assert np.array_equal(sample_indices(1000, 1.0, seed=5), np.arange(1000))
    # Float noise in fraction * n (0.07 * 100 = 7.000000000000001) must not add an item.
    assert len(sample_indices(100, 0.07, seed=0)) == 7


def test_sample_indices_at_least_one_item():
    assert len(sample_indices(10, 0.01, seed=0)) == 1
    assert len(sample_indices(1, 0.5, seed=0)) == 1


def test_sample_indices_ignores_features_but_not_labels():
    """Only (n, fraction, seed, labels) enter: the same call gives the same items for any checkpoint."""
    _, y = clusters(500, seed=0)
    _, other_y = clusters(500, seed=1)
    assert np.array_equal(sample_indices(500, 0.01, 7, y), sample_indices(500, 0.01, 7, y.copy()))
    # Labels may only add items to the permutation prefix.
    assert set(sample_indices(500, 0.01, 7)) <= set(sample_indices(500, 0.01, 7, other_y))


@pytest.mark.parametrize("seed", range(5))
def test_sample_indices_covers_every_class(seed):
    y = np.zeros(1000, dtype=np.int64)
    y[[10, 500, 900]] = [1, 2, 3]  # rare classes a 1 % prefix would almost surely miss
    idx = sample_indices(1000, 0.01, seed, y)
    assert set(y[idx]) == {0, 1, 2, 3}
    assert len(idx) <= 10 + 4


@pytest.mark.parametrize("seed", range(5))
def test_sample_indices_covers_both_values_of_every_label_column(seed):
    y = np.zeros((1000, 4), dtype=np.int64)
    y[3, 0] = 1  # one positive
    y[:, 1] = 1
    y[42, 1] = 0  # one negative
    y[:, 3] = 1  # all positive: no negative to add
    idx = sample_indices(1000, 0.01, seed, y)
    assert y[idx, 0].max() == 1 and y[idx, 1].min() == 0
    assert y[idx, 3].min() == 1  # column 2 is all negative, 3 all positive: nothing to cover


def test_sample_indices_nested_across_fractions():
    _, y = multilabel_data(800, rate=0.02)
    for seed in range(3):
        small, mid, full = (set(sample_indices(800, f, seed, y)) for f in FRACTIONS)
        assert small <= mid <= full


@pytest.mark.parametrize("args", [(0, 0.1, 0), (10, 0.0, 0), (10, 1.5, 0)])
def test_sample_indices_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        sample_indices(*args)
    with pytest.raises(ValueError, match="rows"):
        sample_indices(10, 0.5, 0, np.zeros(9, dtype=np.int64))


# --- fit_logistic / predict_scores ------------------------------------------------------------------------


def sklearn_probabilities(x, y, test_x, l2):
    """scikit-learn's fit of the same model: C = 1 / (l2 * n) on StandardScaler output."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    # In float32 sklearn's L-BFGS stops early on near-separable data, so compare in float64.
    x, test_x = np.asarray(x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)

    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-12, max_iter=100_000)
    return model.fit(scaler.transform(x), y).predict_proba(scaler.transform(test_x))


@pytest.mark.parametrize(("n", "l2"), [(300, 1e-3), (40, 1e-3), (300, 1e-1)])
def test_fit_logistic_multiclass_matches_sklearn(n, l2):
    x, y = clusters(n, spread=1.5)
    test_x, _ = clusters(200, spread=1.5, seed=1)
    weight, bias = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), multilabel=False, l2=l2)
    assert weight.shape == (8, 4) and bias.shape == (4,) and weight.dtype == torch.float64
    probs = predict_scores(test_x, weight, bias, multilabel=False)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    assert np.abs(probs - sklearn_probabilities(x, y, test_x, l2)).max() < 1e-3


def test_fit_logistic_two_classes_match_sklearn_binary_with_double_c():
    """sklearn fits one logit for two classes; the two-column softmax splits the penalty over two columns."""
    x, y = clusters(100, c=2, spread=2.0)
    weight, bias = fit_logistic(x, y, multilabel=False)
    probs = predict_scores(x, weight, bias, multilabel=False)
    assert np.abs(probs - sklearn_probabilities(x, y, x, 1e-3 / 2)).max() < 1e-3


def test_fit_logistic_multilabel_matches_one_sklearn_model_per_column():
    x, y = multilabel_data(300)
    test_x, _ = multilabel_data(100, seed=1)
    weight, bias = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), multilabel=True)
    probs = predict_scores(torch.from_numpy(test_x), weight, bias, multilabel=True)
    for c in range(y.shape[1]):
        expected = sklearn_probabilities(x, y[:, c], test_x, 1e-3)[:, 1]
        assert np.abs(probs[:, c] - expected).max() < 1e-3


def test_fit_logistic_is_deterministic_and_precision_independent():
    x, y = clusters(200)
    w1, b1 = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), multilabel=False)
    w2, b2 = fit_logistic(torch.from_numpy(x).double(), torch.from_numpy(y), multilabel=False)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_fit_logistic_absent_classes_and_constant_columns_get_infinite_bias():
    x, y = clusters(100, c=3)
    weight, bias = fit_logistic(x, y, multilabel=False, n_classes=5)
    assert weight.shape == (8, 5) and torch.all(bias[3:] == -torch.inf) and torch.all(weight[:, 3:] == 0)
    probs = predict_scores(x, weight, bias, multilabel=False)
    assert np.all(probs[:, 3:] == 0) and np.all(np.isfinite(probs))

    x, y = multilabel_data(100)
    y[:, 1], y[:, 2] = 0, 1
    _, bias = fit_logistic(x, y, multilabel=True)
    assert bias[1] == -torch.inf and bias[2] == torch.inf and torch.isfinite(bias[0])


def test_fit_logistic_constant_feature_is_harmless():
    x, y = clusters(100)
    x[:, 0] = 5.0
    weight, bias = fit_logistic(x, y, multilabel=False)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all() and torch.all(weight[0] == 0)


def test_fit_logistic_warns_when_budget_runs_out():
    x, y = clusters(100, spread=2.0)
    with pytest.warns(RuntimeWarning, match="budget"):
        fit_logistic(x, y, multilabel=False, max_iter=2)


def test_fit_logistic_rejects_bad_inputs():
    x, y = clusters(20)
    with pytest.raises(ValueError):
        fit_logistic(x[:0], y[:0], multilabel=False)
    with pytest.raises(ValueError):
        fit_logistic(x, y[:10], multilabel=False)
    with pytest.raises(ValueError):
        fit_logistic(x, y.astype(np.float32), multilabel=False)
    with pytest.raises(ValueError):
        fit_logistic(x, y, multilabel=False, n_classes=2)
    with pytest.raises(ValueError):
        fit_logistic(x, np.full((20, 2), 2), multilabel=True)


# --- linear_probe -----------------------------------------------------------------------------------------


def test_linear_probe_multiclass_reports_every_fraction():
    train_x, train_y = clusters(1000, spread=2.0)
    test_x, test_y = clusters(400, spread=2.0, seed=1)
    report = linear_probe(train_x, train_y, test_x, test_y, multilabel=False)
    assert list(report) == ["1%", "10%", "100%"]
    for entry in report.values():
        assert len(entry["auc"]) == len(entry["n_train"]) == 3
        assert entry["auc_mean"] == pytest.approx(np.mean(entry["auc"]))
        assert entry["auc_std"] >= 0
    assert report["1%"]["n_train"] == [10, 10, 10]
    assert report["100%"]["n_train"] == [1000] * 3 and report["100%"]["auc_std"] == 0.0
    assert report["100%"]["auc_mean"] > 0.9
    # An easy problem: more labels should not hurt (small tolerance for sampling luck).
    assert report["100%"]["auc_mean"] >= report["10%"]["auc_mean"] - 0.005
    assert report["10%"]["auc_mean"] >= report["1%"]["auc_mean"] - 0.005


def test_linear_probe_multilabel_skips_single_class_test_columns():
    train_x, train_y = multilabel_data(600, c=4)
    test_x, test_y = multilabel_data(300, c=4, seed=1)
    test_y[:, 3] = 0
    with pytest.warns(UserWarning, match=r"\[3\]"):
        report = linear_probe(train_x, train_y, test_x, test_y, multilabel=True, fractions=(0.1, 1.0),
                              seeds=(0, 1))
    assert list(report) == ["10%", "100%"]
    assert report["100%"]["auc_mean"] > 0.9
    assert all(np.isfinite(report["10%"]["auc"]))


def test_linear_probe_scores_only_classes_present_in_test():
    train_x, train_y = clusters(400)
    test_x, test_y = clusters(200, seed=1)
    keep = test_y != 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an absent class would give a NaN-AUC warning
        report = linear_probe(train_x, train_y, test_x[keep], test_y[keep], multilabel=False,
                              fractions=(1.0,), seeds=(0,))
    assert report["100%"]["auc_mean"] > 0.9


@pytest.mark.parametrize("case", ["empty_train", "empty_test", "length", "dims", "one_test_class",
                                  "no_test_column", "columns", "float_classes"])
def test_linear_probe_rejects_bad_inputs(case):
    train_x, train_y = clusters(100)
    test_x, test_y = clusters(50, seed=1)
    multilabel = False
    if case == "empty_train":
        train_x, train_y = train_x[:0], train_y[:0]
    elif case == "empty_test":
        test_x, test_y = test_x[:0], test_y[:0]
    elif case == "length":
        train_y = train_y[:-1]
    elif case == "dims":
        test_x = test_x[:, :-1]
    elif case == "one_test_class":
        test_y = np.zeros_like(test_y)
    elif case == "float_classes":
        train_y = train_y.astype(np.float64)
    else:
        multilabel = True
        train_x, train_y = multilabel_data(100)
        test_x, test_y = multilabel_data(50, seed=1)
        if case == "no_test_column":
            test_y = np.ones_like(test_y)
        else:
            test_y = test_y[:, :-1]
    with pytest.raises(ValueError):
        linear_probe(train_x, train_y, test_x, test_y, multilabel=multilabel, fractions=(1.0,), seeds=(0,))


# --- cached_features --------------------------------------------------------------------------------------


def test_cached_features_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(3, 2) * len(calls)

    path = tmp_path / "sub" / "feats.npz"
    key = {"checkpoint": tmp_path / "ckpt.pt", "step": 10, "split": "test"}
    first = cached_features(path, compute, key)
    assert len(calls) == 1 and path.is_file()
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left behind
    again = cached_features(path, compute, dict(reversed(key.items())))  # key order is irrelevant
    assert len(calls) == 1 and np.array_equal(again, first) and again.dtype == np.float32

    other = cached_features(path, compute, {**key, "step": 20})
    assert len(calls) == 2 and np.array_equal(other, 2 * first)
    assert np.array_equal(cached_features(path, compute, {**key, "step": 20}), other) and len(calls) == 2


def test_cached_features_recomputes_an_unreadable_file(tmp_path):
    path = tmp_path / "feats.npz"
    path.write_bytes(b"not an npz")
    out = cached_features(path, lambda: np.ones((2, 2)), {"k": 1})
    assert np.array_equal(out, np.ones((2, 2)))
    assert np.array_equal(cached_features(path, lambda: np.zeros(1), {"k": 1}), out)
