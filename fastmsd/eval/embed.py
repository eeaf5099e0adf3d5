"""Frozen embeddings of cached images and report texts, the input of every evaluation task."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from fastmsd.config import ModelConfig
from fastmsd.data.loader import load_images, to_model_input
from fastmsd.data.text import tokenize
from fastmsd.model import Tower


def image_embeddings(tower: Tower, paths: Sequence[Path], cfg: ModelConfig, device: torch.device,
                     batch_size: int = 256) -> torch.Tensor:
    """[n, D] unit rows (fp32, on the CPU) of the images, resized and centre-cropped as in eval."""
    # Decoded batch by batch: a large test split never sits decoded in memory all at once.
    batches = (load_images(paths[start : start + batch_size], cfg.image_size, "eval images")
               for start in range(0, len(paths), batch_size))
    return image_batch_embeddings(tower, batches, cfg.in_chans, device)


@torch.no_grad()
def image_batch_embeddings(tower: Tower, batches: Iterable[torch.Tensor], in_chans: int,
                           device: torch.device) -> torch.Tensor:
    """[n, D] unit rows (fp32, on the CPU) of image batches at the model's size: uint8 or [0, 1]
    float [b, 1 or in_chans, size, size], normalised here as every loader does."""
    out = []
    with _eval_mode(tower):
        for images in batches:
            out.append(tower.encode_image(to_model_input(images, in_chans).to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, tower.image_proj.out_features)


@torch.no_grad()
def text_embeddings(tower: Tower, tokenizer, texts: Sequence[str], cfg: ModelConfig, device: torch.device,
                    batch_size: int = 256) -> torch.Tensor:
    """[n, D] unit rows (fp32, on the CPU) of the texts."""
    out = []
    with _eval_mode(tower):
        for start in range(0, len(texts), batch_size):
            ids, mask = tokenize(tokenizer, texts[start : start + batch_size], cfg.max_len)
            out.append(tower.encode_text(ids.long().to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


class _eval_mode:
    """Evaluation without dropout, restoring the tower's mode afterwards (training may go on)."""

    def __init__(self, tower: Tower):
        self.tower, self.was_training = tower, tower.training

    def __enter__(self) -> None:
        self.tower.eval()

    def __exit__(self, *exc: object) -> None:
        self.tower.train(self.was_training)
