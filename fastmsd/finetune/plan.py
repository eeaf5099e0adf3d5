"""``--gpu-mem`` for fine-tuning: the training planner's search (``fastmsd.memory.make_plan``) over real
fine-tuning steps, which picks the micro-batch and the encoder's checkpointing that fit the budget fastest.

Fine-tuning has no keys phase and one encoder, so the probe measures the keys as free and the planner tries
only the image encoder's policies (none, every second block, every block)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastmsd.config import format_checkpointing, format_size
from fastmsd.finetune.fit import autocast
from fastmsd.memory import CHECKPOINT_EVERY, CudaMeter, Measurement, make_plan, measure
from fastmsd.model import set_block_checkpointing

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FinetuneProbe:
    """Real steps of a fine-tuning model on synthetic inputs ``x`` and targets ``y`` (a whole batch),
    holding what training holds: weights, gradients and AdamW state."""

    def __init__(self, model: nn.Module, encoder: nn.Module, loss: Loss, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device, meter=None, repeats: int = 2):
        self.model, self.encoder, self.loss, self.x, self.y = model.to(device), encoder, loss, x, y
        self.device, self.meter, self.repeats = device, meter or CudaMeter(device), repeats
        self.opt = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda")
        # One step allocates the AdamW state; gradients then stay allocated, as between micro-batches.
        self._backward(1)
        self.opt.step()

    def _backward(self, rows: int) -> None:
        with autocast(self.device):
            out = self.model(self.x[:rows])
        self.loss(out.float(), self.y[:rows]).backward()

    def micro(self, micro_batch: int, image_every: int, text_every: int) -> Measurement:
        set_block_checkpointing(self.encoder, image_every)
        return measure(lambda: self._backward(micro_batch), self.meter, self.device, self.repeats)

    def keys(self, chunk: int) -> Measurement:
        return Measurement(0, 0.0)

    def fixed_seconds(self) -> float:
        return measure(self.opt.step, self.meter, self.device, self.repeats).seconds


def plan_finetune(probe: FinetuneProbe, budget: int, device_name: str, checkpointing: int = 0,
                  progress: bool = True) -> tuple[int, int, str]:
    """The micro-batch and checkpointing interval (of ``checkpointing`` alone when it is set) that fit
    ``budget`` fastest, and a line saying so."""
    choices = (checkpointing,) if checkpointing else CHECKPOINT_EVERY
    plan = make_plan(probe, batch_size=len(probe.x), budget=budget, device=device_name, progress=progress,
                     policies=[(every, 0) for every in choices])
    every = {format_checkpointing(e, 0): e for e in choices}[plan.checkpointing]
    steps = -(-plan.batch_size // plan.micro_batch_size)
    blocks = f"every {every} encoder block{'s' if every > 1 else ''}" if every else "none"
    line = (f"plan for {format_size(budget)} on {device_name}: micro-batch {plan.micro_batch_size} x {steps} "
            f"for batch {plan.batch_size}, checkpointing {blocks}; measured peak "
            f"{format_size(plan.peak_bytes)} of {format_size(plan.usable_bytes)} usable")
    return plan.micro_batch_size, every, line
