"""The training loop every fine-tuning task shares: AdamW with a larger step for the new head than for the
pretrained encoder, a cosine schedule, bf16 autocast on CUDA, and the weights of the epoch with the best
validation score kept."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fastmsd.data.loader import step_generator, to_device, to_model_input
from fastmsd.model import set_block_checkpointing


@dataclass(frozen=True)
class Settings:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    # A fresh head needs a larger step than pretrained weights, which a large step would wreck.
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    freeze_encoder: bool = False
    checkpointing: int = 0
    # Rows per forward / backward; a batch of more is accumulated over several (None: the whole batch).
    micro_batch_size: int | None = None


@dataclass
class Trained:
    model: nn.Module
    best_epoch: int
    val_score: float


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def infer(model: nn.Module, images: torch.Tensor, in_chans: int, device: torch.device,
          post: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
          batch_size: int = 128) -> torch.Tensor:
    """``post`` of the model's fp32 outputs for uint8 images, with the evaluation preprocessing, on the
    CPU."""
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = to_model_input(to_device(images[s : s + batch_size], device), in_chans)
        with autocast(device):
            out.append(post(model(x).float()).cpu())
    model.train(was_training)
    return torch.cat(out)


Batch = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def fit(model: nn.Module, encoder: nn.Module, idx: np.ndarray, batch: Batch,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], validate: Callable[[nn.Module], float],
        seed: int, settings: Settings, device: torch.device, progress: bool = True,
        desc: str = "finetune") -> Trained:
    """Train ``model`` (``encoder`` and a new head: every other parameter) on the training rows ``idx``.

    ``batch(rows, generator)`` gives the augmented, normalised inputs and the targets of ``rows`` on the
    device; ``validate(model)`` scores the model after each epoch (higher is better). With
    ``settings.micro_batch_size`` below the batch, gradients are accumulated over micro-batches, each
    loss weighted by its share of the rows: exact for a loss that is a mean over rows (BCE), while a
    batch-level term (soft Dice) and batch normalisation see the micro-batch.
    """
    if settings.checkpointing:
        set_block_checkpointing(encoder, settings.checkpointing)
    model.to(device)
    encoder_params = {id(p) for p in encoder.parameters()}
    head = [p for p in model.parameters() if id(p) not in encoder_params]
    groups = [{"params": head, "lr": settings.head_lr}]
    if settings.freeze_encoder:
        encoder.requires_grad_(False)
    else:
        groups.append({"params": list(encoder.parameters()), "lr": settings.lr})
    opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay, fused=device.type == "cuda")
    size = min(settings.batch_size, len(idx))
    micro = min(settings.micro_batch_size or size, size)
    total = settings.epochs * math.ceil(len(idx) / size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    best: tuple[float, int, dict, float] = (-math.inf, 0, {}, math.nan)
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress or None)
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        if settings.freeze_encoder:
            encoder.eval()  # frozen normalisation statistics, too
        order = torch.from_numpy(idx)[torch.randperm(len(idx), generator=step_generator(seed, -1 - epoch))]
        for s in range(0, len(order), size):
            x, y = batch(order[s : s + size], step_generator(seed, step))
            opt.zero_grad(set_to_none=True)
            value = torch.zeros((), device=device)
            for m in range(0, len(x), micro):
                with autocast(device):
                    out = model(x[m : m + micro])
                part = loss(out.float(), y[m : m + micro]) * (len(out) / len(x))
                part.backward()
                value += part.detach()
            opt.step()
            schedule.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{value.item():.3f}", refresh=False)
        score = validate(model)
        # A NaN score (nothing to score) ranks below any number.
        key = -math.inf if math.isnan(score) else score
        if not best[2] or key > best[0]:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = (key, epoch + 1, weights, score)
    bar.close()
    model.load_state_dict(best[2])
    return Trained(model, best[1], best[3])
