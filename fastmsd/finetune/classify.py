"""``--task classify``: the encoder and a linear head trained with BCE on the cache's labels, scored by
macro AUC."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmsd.data.cache import Cache
from fastmsd.data.loader import DiskImages, augment, normalize_, split_images, to_device
from fastmsd.eval import metrics
from fastmsd.eval.runner import probe_targets
from fastmsd.finetune.fit import Settings, Trained, fit, infer
from fastmsd.finetune.start import Start


@dataclass
class Split:
    images: torch.Tensor | DiskImages  # uint8 [n, 1, size, size]
    targets: np.ndarray  # {0, 1} [n, labels]


def load_split(cache: Cache, split: str, columns: tuple[str, ...], size: int) -> Split:
    indices, targets = probe_targets(cache, cache.indices(split), columns)
    return Split(split_images(cache.image_paths(indices), size, f"decode {split}"), targets)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def predict(model: nn.Module, images: torch.Tensor, in_chans: int, device: torch.device) -> np.ndarray:
    """Per-label probabilities [n, labels] of uint8 images."""
    return infer(model, images, in_chans, device).numpy()


def score(model: nn.Module, split: Split, in_chans: int, device: torch.device) -> tuple[float, list[float]]:
    """Macro AUC over the labels, and each label's (NaN where the split has one class)."""
    with warnings.catch_warnings():
        # A split whose label has one class is reported once, by the caller, not every epoch.
        warnings.simplefilter("ignore", UserWarning)
        return metrics.macro_auc_multilabel(predict(model, split.images, in_chans, device), split.targets)


def train_classifier(start: Start, train: Split, idx: np.ndarray, val: Split, seed: int, settings: Settings,
                     device: torch.device, progress: bool = True, desc: str = "finetune") -> Trained:
    """Encoder + linear head trained with BCE on ``train``'s rows ``idx``; the weights of the epoch with the
    best validation macro AUC are returned."""
    model = Classifier(start.encoder(seed), train.targets.shape[1])
    targets = torch.from_numpy(train.targets)
    in_chans = start.cfg.in_chans

    def batch(rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_(augment(to_device(train.images[rows], device), generator), in_chans)
        return x, targets[rows].to(device)

    return fit(model, model.encoder, idx, batch, F.binary_cross_entropy_with_logits,
               lambda m: score(m, val, in_chans, device)[0], seed, settings, device, progress, desc)
