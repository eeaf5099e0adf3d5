"""Frozen embeddings of cached images and report texts, the input of every evaluation task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fastmsd.config import ModelConfig
from fastmsd.data.loader import load_images, to_model_input
from fastmsd.data.text import tokenize
from fastmsd.model import Tower


@torch.no_grad()
def image_embeddings(tower: Tower, paths: Sequence[Path], cfg: ModelConfig, device: torch.device,
                     batch_size: int = 256) -> torch.Tensor:
    """[n, D] unit rows (fp32, on the CPU) of the images, resized and centre-cropped as in eval."""
    images = load_images(paths, cfg.image_size, "eval images")
    out = []
    with _eval_mode(tower):
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start : start + batch_size], cfg.in_chans).to(device)
            out.append(tower.encode_image(x).float().cpu())
    return torch.cat(out)


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
