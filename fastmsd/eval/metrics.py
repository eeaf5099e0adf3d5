"""Classification metrics computed from scores, with ties handled like scikit-learn."""

from __future__ import annotations

import warnings

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(x)]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = 0.5 * (s + e - 1) + 1.0
    return ranks


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U). NaN with a warning when only one class occurs."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn("ROC AUC is undefined with a single class present; returning NaN", stacklevel=2)
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc_ovr(scores: np.ndarray, labels: np.ndarray) -> tuple[float, list[float]]:
    """One-vs-rest AUC per class column of ``scores`` [n, C] and their mean."""
    per_class = [roc_auc(scores[:, c], labels == c) for c in range(scores.shape[1])]
    return float(np.mean(per_class)), per_class


def _check_labels(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.ndim != 1 or pred.shape != labels.shape:
        raise ValueError(f"pred and labels must be 1-D of equal length, got {pred.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("empty predictions")
    for name, arr in (("pred", pred), ("labels", labels)):
        if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= n_classes:
            raise ValueError(f"{name} must hold integer class ids in [0, {n_classes})")
    return pred, labels


def _check_binary(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.ndim != 1 or scores.shape != positive.shape:
        raise ValueError(f"scores and positive must be 1-D of equal length, got {scores.shape} and "
                         f"{positive.shape}")
    if len(scores) == 0:
        raise ValueError("empty scores")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, positive


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to their label."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred and labels differ in shape: {pred.shape} vs {labels.shape}")
    if pred.size == 0:
        raise ValueError("empty predictions")
    return float(np.mean(pred == labels))


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [n_classes, n_classes] indexed [true, predicted], as scikit-learn's."""
    pred, labels = _check_labels(pred, labels, n_classes)
    flat = np.bincount(labels * n_classes + pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def per_class_recall(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> list[float]:
    """Recall of each class; NaN with a warning for a class with no true sample (undefined, not 0)."""
    cm = confusion_matrix(pred, labels, n_classes)
    support = cm.sum(axis=1)
    missing = np.flatnonzero(support == 0)
    if len(missing):
        warnings.warn(f"recall is undefined for classes {missing.tolist()} with no true sample; "
                      "returning NaN for them", stacklevel=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(cm) / support
    return [float(r) for r in recall]


def macro_f1(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Unweighted mean F1 over the classes present in ``labels`` or ``pred``.

    Equals ``sklearn.metrics.f1_score(labels, pred, average="macro", zero_division=0)`` (no
    ``labels=`` argument). A class absent from both is left out rather than counted as F1 = 0, which
    is what ``labels=range(n_classes)`` would do: on an evaluation subset missing a class, that would
    cap a perfect classifier at (C-1)/C. The two agree whenever every class occurs in ``labels``.
    A class that is present but never correctly predicted scores 0 (scikit-learn's zero_division=0).
    """
    cm = confusion_matrix(pred, labels, n_classes)
    tp = np.diag(cm)
    # 2TP / (2TP + FP + FN) is the harmonic mean of precision and recall, and stays defined when
    # the class is never predicted (precision 0/0), where it gives 0 as zero_division=0 does.
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    present = denom > 0
    return float(np.mean(2 * tp[present] / denom[present]))


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """Score threshold maximising F1 of ``scores >= threshold``, chosen among the observed scores.

    Meant for validation scores, the threshold then being applied to test scores with
    :func:`binary_metrics`. Among thresholds of equal F1 the highest is returned.
    """
    scores, positive = _check_binary(scores, positive)
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("best_f1_threshold needs at least one positive sample: F1 is 0 at every threshold")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    # Only the last index of each run of tied scores is a reachable cut: a threshold cannot
    # separate samples with equal scores.
    group_ends = np.append(np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1)
    tp = np.cumsum(positive[order])[group_ends]
    n_predicted = group_ends + 1
    f1 = 2 * tp / (n_predicted + n_pos)
    # Thresholds decrease along group_ends, so argmax's first hit is the highest tied threshold.
    return float(sorted_scores[group_ends[np.argmax(f1)]])


def binary_metrics(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC plus accuracy, F1, precision and recall of ``scores >= threshold``.

    Precision with no predicted positive, recall with no positive, and F1 when both are 0, are 0
    (scikit-learn's zero_division=0); AUC is NaN with a warning when only one class occurs.
    """
    scores, positive = _check_binary(scores, positive)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & positive))
    n_predicted = int(predicted.sum())
    n_pos = int(positive.sum())
    return {
        "auc": roc_auc(scores, positive),
        "accuracy": float(np.mean(predicted == positive)),
        "f1": 2 * tp / (n_predicted + n_pos) if n_predicted + n_pos else 0.0,
        "precision": tp / n_predicted if n_predicted else 0.0,
        "recall": tp / n_pos if n_pos else 0.0,
    }


def _check_ks(ks: tuple[int, ...], n_items: int) -> None:
    for k in ks:
        if not 1 <= k <= n_items:
            raise ValueError(f"k={k} is outside [1, {n_items}] (the number of items)")


def _check_sim(sim: np.ndarray) -> np.ndarray:
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.size == 0:
        raise ValueError(f"sim must be a non-empty [n_queries, n_items] matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("sim must be finite")
    return sim


def precision_at_k(sim: np.ndarray, query_labels: np.ndarray, item_labels: np.ndarray,
                   ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Class-relevance retrieval precision (GLoRIA / MGCA "Precision@K").

    For each query row of ``sim`` [n_queries, n_items], the fraction of its k most similar items
    whose label equals the query's, averaged over queries. Items of equal similarity are ranked
    by index, lower first.
    """
    sim = _check_sim(sim)
    query_labels = np.asarray(query_labels)
    item_labels = np.asarray(item_labels)
    if query_labels.shape != (sim.shape[0],) or item_labels.shape != (sim.shape[1],):
        raise ValueError(f"labels of shapes {query_labels.shape} and {item_labels.shape} do not match "
                         f"sim of shape {sim.shape}")
    _check_ks(ks, sim.shape[1])
    # A stable sort of -sim keeps tied items in index order.
    ranked = np.argsort(-sim, axis=1, kind="stable")[:, :max(ks)]
    relevant = item_labels[ranked] == query_labels[:, None]
    hits = np.cumsum(relevant, axis=1)
    return {k: float(np.mean(hits[:, k - 1] / k)) for k in ks}


def recall_at_k(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[int, float]:
    """Paired retrieval recall: query i's one true item is item i of ``sim`` [n_queries, n_items].

    The fraction of queries whose true item ranks within the top k. Ties are pessimistic: the rank
    is the number of items with similarity >= the true item's, so a collapsed model whose
    similarities are all equal scores 0 for every k < n_items instead of a perfect recall.
    Columns beyond n_queries are extra distractor items.
    """
    sim = _check_sim(sim)
    n_q, n_items = sim.shape
    if n_items < n_q:
        raise ValueError(f"recall_at_k needs an item per query, got sim of shape {sim.shape}")
    _check_ks(ks, n_items)
    true_sim = sim[np.arange(n_q), np.arange(n_q)]
    rank = np.sum(sim >= true_sim[:, None], axis=1)
    return {k: float(np.mean(rank <= k)) for k in ks}


def macro_auc_multilabel(scores: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
    """AUC of each column of ``scores`` [n, L] against multi-label ``targets`` [n, L] in {0, 1}.

    A column with a single class has an undefined AUC: it is NaN in the list and left out of the
    mean, with one warning; the mean is NaN when no column is defined.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape or scores.size == 0:
        raise ValueError(f"scores and targets must be non-empty [n, L] matrices of equal shape, got "
                         f"{scores.shape} and {targets.shape}")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("multi-label targets must be 0 or 1 (map uncertain labels before scoring)")
    positive = targets.astype(bool)
    n_pos = positive.sum(axis=0)
    single = np.flatnonzero((n_pos == 0) | (n_pos == len(targets)))
    if len(single):
        warnings.warn(f"ROC AUC is undefined for columns {single.tolist()} with a single class present; "
                      "they are NaN and left out of the mean", stacklevel=2)
    per_label = [float("nan") if c in single else roc_auc(scores[:, c], positive[:, c])
                 for c in range(scores.shape[1])]
    defined = [a for a in per_label if not np.isnan(a)]
    return (float(np.mean(defined)) if defined else float("nan")), per_label


def dice(pred: np.ndarray, target: np.ndarray) -> tuple[float, list[float]]:
    """Dice 2|P∩T| / (|P| + |T|) of each finding of boolean masks ``pred`` and ``target`` [n, k, H, W], over
    all the split's pixels at once (how the medical VLP papers report segmentation), and their mean.

    A finding absent from both has an undefined Dice: NaN in the list and left out of the mean (NaN when
    none is defined).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.ndim != 4 or pred.shape != target.shape or pred.dtype != bool or target.dtype != bool:
        raise ValueError(f"pred and target must be boolean [n, k, H, W] masks of equal shape, got "
                         f"{pred.dtype} {pred.shape} and {target.dtype} {target.shape}")
    overlap = np.logical_and(pred, target).sum(axis=(0, 2, 3), dtype=np.int64)
    total = pred.sum(axis=(0, 2, 3), dtype=np.int64) + target.sum(axis=(0, 2, 3), dtype=np.int64)
    per_finding = [float(2 * o / t) if t else float("nan") for o, t in zip(overlap, total, strict=True)]
    defined = [d for d in per_finding if not np.isnan(d)]
    return (float(np.mean(defined)) if defined else float("nan")), per_finding
