"""Where fine-tuning starts: a trained student's image encoder, the same architecture at random, or a local
timm checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastmsd.config import ConfigError, ModelConfig
from fastmsd.model import build_image_encoder, load_image_weights


@dataclass
class Start:
    """The image encoder's architecture and, unless ``scratch``, its weights."""

    cfg: ModelConfig
    name: str  # "pretrained", "scratch" or "imagenet:FILE"
    source: str
    weights: dict[str, torch.Tensor] | None

    def encoder(self, seed: int) -> nn.Module:
        # Seeded, so a scratch baseline differs across seeds the way its sampled labels do, and reruns agree.
        torch.manual_seed(seed)
        encoder = build_image_encoder(self.cfg)
        if self.weights is not None:
            encoder.load_state_dict(self.weights)
        return encoder


def load_start(path: str | Path, init: str = "pretrained") -> Start:
    """The student image encoder of a run, checkpoint or hf export (``pretrained``), the same architecture at
    random (``scratch``), or with a local timm checkpoint (``imagenet:FILE``)."""
    from fastmsd.api import load

    encoder = load(path, device="cpu")
    cfg = dataclasses.replace(encoder.cfg, pretrained=False, image_weights=None)
    if init == "pretrained":
        weights = {k: v.clone() for k, v in encoder.student.image_encoder.state_dict().items()}
        return Start(cfg, init, encoder.source, weights)
    if init == "scratch":
        return Start(cfg, init, encoder.source, None)
    kind, _, file = init.partition(":")
    if kind != "imagenet" or not file:
        raise ConfigError(f"--from takes imagenet:FILE (a local timm checkpoint), got {init!r}")
    start = Start(cfg, init, encoder.source, None).encoder(0)
    load_image_weights(start, file, cfg.in_chans)
    return Start(cfg, init, encoder.source, start.state_dict())
