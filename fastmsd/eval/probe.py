"""Linear-probe evaluation: logistic regression on frozen image embeddings with 1 %, 10 % and 100 % of labels.

The protocol of the medical VLP papers (GLoRIA, MGCA, MedKLIP): embeddings are computed once with the frozen
encoder, a logistic regression is fitted on a fraction of the training labels for several seeds, and the mean
and spread of the test AUC-ROC are reported (macro over classes / label columns).

Which training items a probe sees depends only on (n, fraction, seed, labels), never on the features, so every
checkpoint is probed on the same items and differences between checkpoints are not sampling noise.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastmsd.eval.metrics import macro_auc_ovr, roc_auc

FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)


def _label_columns(labels: np.ndarray, n: int) -> np.ndarray:
    """Boolean [n, k] positives: one-hot of the present classes (1-D ids), or the label columns (2-D)."""
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ValueError(f"labels have {len(labels)} rows for n={n}")
    if labels.ndim == 1:
        return labels[:, None] == np.unique(labels)[None, :]
    if labels.ndim == 2:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("multi-label labels must be 0/1")
        return labels.astype(bool)
    raise ValueError(f"labels must be 1-D class ids or a 2-D 0/1 matrix, got shape {labels.shape}")


def sample_size(n: int, fraction: float) -> int:
    """How many of ``n`` items a label fraction takes before missing classes are added: ceil, at least 1."""
    # Rounding first keeps float noise (0.07 * 100 = 7.000000000000001) from adding an item.
    return max(1, math.ceil(round(fraction * n, 6)))


def seed_summary(values: Sequence[float], metric: str = "auc") -> dict:
    """One fraction's scores over seeds: their mean, sample std (ddof=1; 0 for one seed) and the list, keyed
    ``{metric}_mean``, ``{metric}_std`` and ``{metric}``."""
    return {f"{metric}_mean": float(np.mean(values)),
            f"{metric}_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            metric: list(values)}


def sample_indices(n: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the training items a probe with this label fraction and seed is fitted on.

    A seeded permutation of ``range(n)`` is drawn and its first ``ceil(fraction * n)`` items (at least 1) are
    taken. With ``labels`` (1-D class ids, or a 2-D 0/1 matrix), every class / label column that has
    positives and negatives in the full set gets at least one of each: for each that the prefix misses, the
    earliest item of the permutation that has it is added. Otherwise the probe's AUC would be undefined.

    The result depends only on the arguments, never on features or checkpoints, and for one seed the sets are
    nested across fractions (the same permutation is used, and added items are the first of their kind).
    """
    if n < 1:
        raise ValueError(f"cannot sample from n={n} items")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    k = sample_size(n, fraction)
    chosen = set(perm[:k].tolist())
    if labels is not None:
        positive = _label_columns(labels, n)[perm]  # rows in permutation order
        for column in (positive, ~positive):
            has = column.any(axis=0)
            missing = has & ~column[:k].any(axis=0)
            # argmax finds the first True, i.e. the earliest permuted item with that value.
            chosen.update(perm[column[:, missing].argmax(axis=0)].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def fit_logistic(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, multilabel: bool,
                 l2: float = 1e-3, max_iter: int = 2000,
                 n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression; returns ``(weight [d, c], bias [c])`` in float64 for raw features.

    Features are standardised with the mean and (population) std of ``x``; the standardisation is folded into
    the returned weights. The objective on standardised features is ``mean_loss + l2 / 2 * ||W||^2`` (bias not
    penalised), i.e. scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` on ``StandardScaler`` output:

    - multi-class (``y`` int class ids [n]): softmax cross-entropy over ``n_classes`` (default ``max(y) + 1``)
      columns, sklearn's multinomial model (for two classes sklearn fits one logit; this two-column softmax
      equals that fit with ``C = 2 / (l2 * n)``);
    - multi-label (``y`` 0/1 [n, c]): per column a binary logistic regression, each column's BCE averaged over
      items and the columns summed, so the columns are independent fits.

    Classes absent from ``y`` and constant label columns have no finite optimum (the bias is unpenalised):
    they get weight 0 and bias -inf (absent class, all-negative column) or +inf (all-positive column), the
    limit of the fit. Full-batch L-BFGS with strong-Wolfe line search from zero, so the fit is deterministic.
    """
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty [n, d] matrix, got shape {tuple(x.shape)}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    n, d = x.shape
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant features stay 0 after centring
    z = (x - mean) / std

    y = torch.as_tensor(y, device=x.device)
    if multilabel:
        if y.ndim != 2 or len(y) != n:
            raise ValueError(f"multi-label y must be [{n}, c], got shape {tuple(y.shape)}")
        y = y.to(torch.float64)
        if not ((y == 0) | (y == 1)).all():
            raise ValueError("multi-label y must be 0/1")
        n_out = y.shape[1]
        n_pos = y.sum(0)
        fitted = torch.nonzero((n_pos > 0) & (n_pos < n)).flatten()
        fixed_bias = torch.where(n_pos == n, math.inf, -math.inf).to(torch.float64)
        target = y[:, fitted]
    else:
        if y.ndim != 1 or len(y) != n or y.is_floating_point() or y.is_complex():
            raise ValueError(f"multi-class y must be [{n}] integer class ids, got {y.dtype} {tuple(y.shape)}")
        if (y < 0).any():
            raise ValueError("class ids must be >= 0")
        n_out = int(y.max()) + 1 if n_classes is None else n_classes
        if int(y.max()) >= n_out:
            raise ValueError(f"class id {int(y.max())} is out of range for n_classes={n_out}")
        fitted = torch.unique(y)
        fixed_bias = torch.full((n_out,), -math.inf, dtype=torch.float64, device=x.device)
        target = torch.searchsorted(fitted, y)

    w = torch.zeros(d, len(fitted), dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(len(fitted), dtype=torch.float64, device=x.device, requires_grad=True)
    if len(fitted):
        max_eval = 2 * max_iter
        # A gradient of 1e-8 on standardised features moves probabilities far below the 1e-3
        # the scikit-learn comparison allows; tighter only spends iterations on round-off.
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, max_eval=max_eval, tolerance_grad=1e-8,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = z @ w + b
            if multilabel:
                data = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n
            else:
                data = F.cross_entropy(logits, target)
            loss = data + 0.5 * l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        # L-BFGS keeps its counters in the state of the first parameter; running out of either budget
        # (rather than meeting a tolerance) means the fit is not at the optimum.
        state = opt.state[w]
        if state["n_iter"] >= max_iter or state["func_evals"] >= max_eval:
            warnings.warn(f"L-BFGS ran out of its budget (max_iter={max_iter}) before converging",
                          RuntimeWarning, stacklevel=2)

    with torch.no_grad():
        weight = torch.zeros(d, n_out, dtype=torch.float64, device=x.device)
        bias = fixed_bias.clone()
        # logits = ((x - mean) / std) @ w + b = x @ (w / std) + (b - (mean / std) @ w)
        weight[:, fitted] = w / std[:, None]
        bias[fitted] = b - (mean / std) @ w
    return weight, bias


def predict_scores(x: torch.Tensor | np.ndarray, weight: torch.Tensor, bias: torch.Tensor, *,
                   multilabel: bool) -> np.ndarray:
    """Probabilities [n, c]: per-column sigmoids (multi-label) or the softmax over classes (multi-class)."""
    logits = torch.as_tensor(x, device=weight.device).to(torch.float64) @ weight + bias
    probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return probs.cpu().numpy()


def fraction_name(fraction: float) -> str:
    return f"{round(fraction * 100, 6):g}%"


def _check_split(name: str, x: torch.Tensor, y: np.ndarray, multilabel: bool) -> None:
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} features must be a non-empty [n, d] matrix, got shape {tuple(x.shape)}")
    if len(y) != len(x):
        raise ValueError(f"{name} has {len(x)} feature rows but {len(y)} label rows")
    if multilabel:
        if y.ndim != 2:
            raise ValueError(f"{name} multi-label labels must be [n, c], got shape {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name} multi-label labels must be 0/1")
    elif y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise ValueError(f"{name} multi-class labels must be [n] non-negative integers, "
                         f"got {y.dtype} {y.shape}")


def linear_probe(train_x: np.ndarray | torch.Tensor, train_y: np.ndarray | torch.Tensor,
                 test_x: np.ndarray | torch.Tensor, test_y: np.ndarray | torch.Tensor, *, multilabel: bool,
                 fractions: Sequence[float] = FRACTIONS, seeds: Sequence[int] = (0, 1, 2),
                 l2: float = 1e-3) -> dict[str, dict]:
    """Test AUC-ROC of logistic-regression probes fitted on each label fraction, for each seed.

    Returns ``{"1%": {"auc_mean", "auc_std", "auc": [per seed], "n_train": [per seed]}, ...}`` keyed by the
    fractions. The AUC is the one-vs-rest macro over the classes present in the test split (multi-class), or
    the mean over the label columns with both classes in the test split (multi-label; others are skipped with
    a warning). ``auc_std`` is the sample std (ddof=1) over seeds, 0 for one seed. The 100 % fraction is
    still run once per seed so every entry has the same shape; its items and the deterministic L-BFGS fit do
    not depend on the seed, so its spread is 0.
    """
    train_x, test_x = (torch.as_tensor(a).to(torch.float64) for a in (train_x, test_x))
    train_y, test_y = (torch.as_tensor(a).cpu().numpy() for a in (train_y, test_y))
    _check_split("train", train_x, train_y, multilabel)
    _check_split("test", test_x, test_y, multilabel)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dims, test features {test_x.shape[1]}")
    if not fractions or not seeds:
        raise ValueError("need at least one fraction and one seed")

    if multilabel:
        if train_y.shape[1] != test_y.shape[1]:
            raise ValueError(f"train has {train_y.shape[1]} label columns, test {test_y.shape[1]}")
        scored = np.flatnonzero(test_y.any(axis=0) & ~test_y.all(axis=0))
        if len(scored) == 0:
            raise ValueError("no test label column has both positives and negatives; AUC is undefined")
        skipped = sorted(set(range(test_y.shape[1])) - set(scored.tolist()))
        if skipped:
            warnings.warn(f"test label columns {skipped} have a single class; left out of the mean AUC",
                          stacklevel=2)
        n_classes = None
    else:
        present = np.unique(test_y)
        if len(present) < 2:
            raise ValueError(f"the test split has only class {present.tolist()}; AUC is undefined")
        # Test-only classes still need a (zero-probability) column so their AUC is defined.
        n_classes = int(max(train_y.max(), test_y.max())) + 1

    def auc(probs: np.ndarray) -> float:
        if multilabel:
            return float(np.mean([roc_auc(probs[:, c], test_y[:, c]) for c in scored]))
        return macro_auc_ovr(probs[:, present], np.searchsorted(present, test_y))[0]

    results: dict[str, dict] = {}
    for fraction in fractions:
        aucs, sizes = [], []
        for seed in seeds:
            idx = sample_indices(len(train_x), fraction, seed, train_y)
            weight, bias = fit_logistic(train_x[idx], train_y[idx], multilabel=multilabel, l2=l2,
                                        n_classes=n_classes)
            aucs.append(auc(predict_scores(test_x, weight, bias, multilabel=multilabel)))
            sizes.append(len(idx))
        results[fraction_name(fraction)] = {**seed_summary(aucs), "n_train": sizes}
    return results


def cached_features(path: Path, compute: Callable[[], np.ndarray], key: dict) -> np.ndarray:
    """``compute()``'s features, cached at ``path`` (an ``.npz``) together with ``key`` as JSON.

    ``key`` names everything the features depend on (checkpoint path and step, cache root, split, image size,
    ...). The cache is reused only when its stored key equals ``key``; otherwise, or when the file is missing
    or unreadable, the features are recomputed and the file replaced atomically (temporary file, then
    ``os.replace``), so an interrupted write never leaves a half-written cache behind. Key values that are not
    JSON types (e.g. paths) are compared through ``str``.
    """
    path = Path(path)
    key_json = json.dumps(key, sort_keys=True, default=str)
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) == key_json:
                return stored["features"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # missing or unreadable cache: recompute below
    features = np.asarray(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        # A file object, not a name: np.savez would append ".npz" to a name.
        with tmp.open("wb") as f:
            np.savez(f, features=features, key=np.array(key_json))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return features
