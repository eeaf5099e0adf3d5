"""Evaluation figures written straight to PNG.

Figures are built as ``matplotlib.figure.Figure`` with an Agg canvas rather than through pyplot,
so nothing here selects a backend or keeps figures alive in pyplot's global registry: callers
(training loops, notebooks) keep whatever backend they use.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fastmsd.eval.metrics import roc_auc


def _roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) from (0, 0) to (1, 1), one point per distinct score so that ties form one step."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    group_ends = np.append(np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1)
    tp = np.cumsum(positive[order])[group_ends]
    fp = group_ends + 1 - tp
    return (np.concatenate(([0.0], fp / fp[-1])), np.concatenate(([0.0], tp / tp[-1])))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def roc_curves(scores: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """One-vs-rest ROC curve of each class column of ``scores`` [n, C] against class ids ``labels``.

    A class with no positive or no negative sample has no curve; it is left out with a warning.
    """
    positive = np.asarray(labels)[:, None] == np.arange(len(class_names))[None, :]
    return roc_curves_multilabel(scores, positive, class_names, path, title="ROC, one class vs rest")


def roc_curves_multilabel(scores: np.ndarray, positive: np.ndarray, names: list[str], path: str | Path,
                          title: str = "ROC per label") -> Path:
    """The ROC curve of each column of ``scores`` [n, C] against the 0/1 column of ``positive`` [n, C].

    A column with no positive or no negative sample has no curve; it is left out with a warning.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.ndim != 2 or scores.shape != (len(positive), len(names)) or positive.shape != scores.shape \
            or len(positive) == 0:
        raise ValueError(f"scores {scores.shape} must be [n, C] for {len(positive)} labels and "
                         f"{len(names)} class names")
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    for c, name in enumerate(names):
        if positive[:, c].all() or not positive[:, c].any():
            warnings.warn(f"no ROC curve for class {name!r}: a single class is present", stacklevel=2)
            continue
        fpr, tpr = _roc_points(scores[:, c], positive[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {roc_auc(scores[:, c], positive[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate",
           title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def confusion_matrix_plot(cm: np.ndarray, class_names: list[str], path: str | Path, title: str = "") -> Path:
    """Heat map of a [true, predicted] count matrix with the counts written in the cells."""
    cm = np.asarray(cm)
    n = len(class_names)
    if n == 0 or cm.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {n} class names")
    size = max(4.0, 0.8 * n + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    # Dark text on pale cells and white on dark ones keeps every count legible.
    dark = cm.max() / 2
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]:g}", ha="center", va="center",
                    color="white" if cm[i, j] > dark else "black", fontsize="small")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    return _save(fig, path)


def mask_overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, names: list[str], path: str | Path,
                  title: str = "Masks") -> Path:
    """One panel per image (uint8 [n, H, W]): the predicted masks filled and the true ones outlined, one
    colour per finding (bool [n, findings, H, W] each)."""
    images, truth, pred = np.asarray(images), np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    if images.ndim != 3 or truth.shape != pred.shape or truth.shape[:1] + truth.shape[2:] != images.shape \
            or truth.shape[1] != len(names) or len(images) == 0:
        raise ValueError(f"images {images.shape}, truth {truth.shape} and pred {pred.shape} must be "
                         f"[n, H, W] and [n, {len(names)}, H, W]")
    colours = [matplotlib.colormaps["tab10"](i) for i in range(len(names))]
    fig = Figure(figsize=(2.4 * len(images), 2.9))
    for i, image in enumerate(images):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        for f, colour in enumerate(colours):
            fill = np.zeros((*image.shape, 4))
            fill[pred[i, f]] = (*colour[:3], 0.4)
            ax.imshow(fill)
            if truth[i, f].any() and not truth[i, f].all():
                ax.contour(truth[i, f], levels=[0.5], colors=[colour], linewidths=1.2)
        ax.set_axis_off()
    handles = [Patch(color=c, label=n) for c, n in zip(colours, names, strict=True)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize="small", frameon=False)
    fig.suptitle(f"{title}\n(filled: predicted, outlined: true)", fontsize="small")
    return _save(fig, path)
