"""A simple in-memory loader of image-report pairs with deterministic, resumable order.

Images are decoded once at training resolution and kept as uint8; augmentation runs batched
in torch from a generator seeded by (seed, step), so a resumed run sees the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fastmsd.data.text import tokenize

# Grayscale radiographs: one mean/std for every channel.
MEAN, STD = 0.5, 0.25


def _load_one(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("L")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                       Image.Resampling.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def load_images(paths: Sequence[Path], size: int, desc: str = "decode") -> torch.Tensor:
    """uint8 [n, 1, size, size]: shorter side resized to ``size``, centre crop."""
    with ThreadPoolExecutor() as pool:
        arrays = list(tqdm(pool.map(lambda p: _load_one(p, size), paths), total=len(paths),
                           desc=desc, leave=False, disable=None))
    return torch.from_numpy(np.stack(arrays))[:, None]


@dataclass
class PairSet:
    """Image-report pairs of one split: uint8 images and pre-tokenized reports."""

    images: torch.Tensor  # uint8 [n, 1, S, S]
    input_ids: torch.Tensor  # int32 [n, L]
    attention_mask: torch.Tensor  # bool [n, L]

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def build(cls, image_paths: Sequence[Path], reports: Sequence[str], tokenizer, size: int,
              max_len: int) -> PairSet:
        ids, mask = tokenize(tokenizer, reports, max_len)
        return cls(load_images(image_paths, size), ids, mask)


def to_model_input(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """uint8 or [0, 1] float images -> normalised float with ``in_chans`` channels."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    x = (x - MEAN) / STD
    return x.expand(-1, in_chans, -1, -1) if in_chans != x.shape[1] else x


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random scale crop (0.8-1 of the side), rotation (+-5 degrees), shift, brightness and
    contrast, batched; returns float [0, 1]. No flips: laterality is written in the reports."""
    n = images.shape[0]
    x = images.float() / 255.0

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-5.0, 5.0) * math.pi / 180.0
    scale = uniform(0.8, 1.0)
    shift_x, shift_y = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = uniform(0.85, 1.15).to(x.device)[:, None, None, None]
    brightness = uniform(-0.08, 0.08).to(x.device)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0.0, 1.0)


class BatchStream:
    """Index batches over epochs of a seeded shuffle; ``state_dict`` holds the data position."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"{n} training pairs are fewer than one effective batch ({batch_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> torch.Tensor:
        # Drop the ragged tail of an epoch so every optimizer step sees a full effective batch.
        if self.index + self.batch_size > self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation()
