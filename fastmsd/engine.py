"""One training step: keys phase, query phase, optimizer step (docs/design.md, "Exact accumulation").

One optimizer step over an effective batch of N pairs:
1. keys: the momentum towers embed all N pairs (no grad, in chunks) straight into the rings at
   rows ptr .. ptr+N-1 (mod Q);
2. queries: each micro-batch of the student is scored against the whole ring, which already
   holds every key of the effective batch, and backpropagates loss/N;
3. step: clip, AdamW, clamp tau, EMA, advance the ring pointer.
``accum_mode="naive"`` instead embeds, enqueues and EMA-updates per micro-batch (ALBEF-style
accumulation), kept for ablations.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from fastmsd.config import Config, ConfigError, StepSizes, parse_checkpointing
from fastmsd.distributed import Dist, fingerprint
from fastmsd.model import MSDModel
from fastmsd.momentum import Rings, flatten_parameters
from fastmsd.objective import MSDLoss

# What a step reports: the loss and its two parts (see fastmsd.objective).
LOSS_TERMS = ("loss", "contrastive", "distillation")


@dataclass
class Batch:
    """Model-ready inputs of one effective batch (or a slice of it), on the device."""

    images: torch.Tensor  # float [n, C, H, W]
    input_ids: torch.Tensor  # int [n, L]
    attention_mask: torch.Tensor  # [n, L]

    def __len__(self) -> int:
        return self.images.shape[0]

    def slice(self, start: int, end: int) -> Batch:
        return Batch(self.images[start:end], self.input_ids[start:end], self.attention_mask[start:end])


def alpha_at(step: int, alpha: float, warmup_steps: int) -> float:
    """Distillation weight: a linear ramp from 0 at step 0 to ``alpha`` at ``warmup_steps``."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay to zero at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def resolve_precision(precision: str, device: torch.device) -> str:
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            # This CPU path exists for tests and the tiny demo, which the design runs in fp32.
            raise ConfigError(f"--precision {precision} needs a CUDA device; the CPU trains in fp32")
        return "fp32"
    return "bf16" if precision == "auto" else precision


class Engine:
    """The model, its momentum side, the rings and the optimizer of one training run."""

    def __init__(self, cfg: Config, model: MSDModel, device: torch.device | str, dist: Dist | None = None,
                 sizes: StepSizes | None = None):
        self.cfg = cfg
        self.sizes = sizes or StepSizes.of(cfg.train)
        self.device = torch.device(device)
        self.dist = dist or Dist()
        if self.dist.active and cfg.train.accum_mode != "exact":
            raise ConfigError("--accum-mode naive runs in one process only: its keys and EMA are per "
                              "micro-batch, which ranks cannot share")
        self.model = model.to(self.device)
        self.model.train()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.model.set_checkpointing(*parse_checkpointing(self.sizes.checkpointing))
        self.model.set_attention(cfg.train.sdpa)
        # After .to(): flattening replaces each parameter's storage with a view of one buffer.
        self.student_flat = flatten_parameters(self.model.student)
        self.teacher = self.model.momentum
        self.teacher.prepare(cfg.train.ema_impl,
                             bf16_shadow=self.precision == "bf16" and cfg.train.bf16_teacher)
        # Every rank starts from rank 0's weights (equal seeds give equal ones; this makes sure).
        for flat in (self.student_flat, self.teacher.flat, self.model.tau.data):
            self.dist.broadcast_(flat, "the initial weight broadcast")
        self.teacher.refresh_shadow()
        if cfg.train.compile:
            # In place (nn.Module.compile), so parameter names and the flat views stay.
            for tower in (self.model.student, self.teacher.encoder):
                tower.image_encoder.compile()
                tower.text_encoder.compile()
        self.rings = Rings(cfg.train.queue_size, cfg.model.embed_dim, self.device)
        self.loss = MSDLoss(cfg.train.loss_impl, self.device, cfg.train.dot_precision, cfg.model.embed_dim)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.train.warmup_steps, cfg.train.steps),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        decay, no_decay = [], []
        for p in self.model.student.parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        # Adam moves a parameter by about its lr per step whatever its scale, so tau (0.001 to
        # 0.5, learned raw as in ALBEF) gets its own small lr; at the encoders' lr it would
        # collapse towards the clamp within a few dozen steps.
        groups = [{"params": decay, "weight_decay": t.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0},
                  {"params": [self.model.tau], "weight_decay": 0.0, "lr": t.tau_lr}]
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.98), eps=1e-6,
                                 fused=self.device.type == "cuda" and t.fused_adamw)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def alpha(self) -> float:
        return alpha_at(self.step, self.cfg.train.alpha, self.cfg.train.alpha_warmup_steps)

    @torch.no_grad()
    def encode_keys(self, batch: Batch, offset: int = 0) -> None:
        """Keys phase: momentum embeddings written in place at rows ptr + offset + i. With
        several ranks, each embeds its own rows and every rank writes all of them."""
        chunk = self.sizes.key_chunk
        parts = []
        for start in range(0, len(batch), chunk):
            part = batch.slice(start, start + chunk)
            with self.autocast():
                k_img = self.teacher.encoder.encode_image(part.images).float()
                k_txt = self.teacher.encoder.encode_text(part.input_ids, part.attention_mask).float()
            parts.append(torch.cat([k_img, k_txt], 1))
        keys = self.dist.all_gather(torch.cat(parts), "the keys all-gather")
        self.rings.write(offset, *keys.split(k_img.shape[1], dim=1))

    def micro_batch_loss(self, micro: Batch, offset: int, divisor: int,
                         alpha: float) -> dict[str, torch.Tensor]:
        """Student rows ``offset ..`` of the effective batch against the whole ring: the loss to
        backpropagate and its contrastive and distillation parts (detached)."""
        student = self.model.student
        with self.autocast():
            img = student.encode_image(micro.images)
            txt = student.encode_text(micro.input_ids, micro.attention_mask)
        rings = self.rings
        pos = rings.rows(offset, len(micro))
        # The teacher's own rows are its keys, already in the rings at the positive columns.
        return self.loss(img=img, txt=txt, img_m=rings.img[pos], txt_m=rings.txt[pos], ring_img=rings.img,
                         ring_txt=rings.txt, pos=pos, n_valid=rings.n_valid, tau=self.model.tau, alpha=alpha,
                         divisor=divisor)

    def accumulate_gradients(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Keys and query phases of one effective batch (this rank's share of it); returns the
        loss of these rows and its two parts, each summed over the micro-batches (no sync)."""
        b = self.sizes.micro_batch_size
        # This rank's rows are rows first .. first + len(batch) - 1 of the effective batch n.
        n, first = len(batch) * self.dist.world, len(batch) * self.dist.rank
        alpha = self.alpha
        exact = self.cfg.train.accum_mode == "exact"
        if exact:
            self.encode_keys(batch)
        totals = {name: torch.zeros((), device=self.device) for name in LOSS_TERMS}
        for start in range(0, len(batch), b):
            micro = batch.slice(start, start + b)
            if not exact:
                # ALBEF's order: EMA in every forward, then this micro-batch's keys alone.
                self.teacher.update(self.student_flat, self.step)
                self.encode_keys(micro, offset=start)
            terms = self.micro_batch_loss(micro, first + start, n, alpha)
            self.scaler.scale(terms["loss"]).backward()
            for name in LOSS_TERMS:
                totals[name] += terms[name].detach()
        return totals

    def optimizer_step(self, n: int) -> torch.Tensor:
        """Sum the ranks' gradients, clip, step, clamp tau, EMA, advance the rings by ``n``;
        returns the grad norm."""
        t, m = self.cfg.train, self.cfg.model
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.dist.all_reduce_sum_([p.grad for p in params if p.grad is not None], "the gradient all-reduce")
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.model.tau.clamp_(m.tau_min, m.tau_max)
        if t.accum_mode == "exact":
            self.teacher.update(self.student_flat, self.step)
        self.rings.advance(n)
        self.step += 1
        return grad_norm

    def train_step(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step; ``batch`` is this rank's share of the effective batch. Returns
        the loss terms of ``accumulate_gradients`` and the grad norm."""
        terms = self.accumulate_gradients(batch)
        return terms, self.optimizer_step(len(batch) * self.dist.world)

    def check_in_sync(self) -> None:
        """Every rank must hold the same weights, momentum and rings; a divergence (a bug, a
        non-deterministic collective) is an error, not a silently different model per rank."""
        if not self.dist.active:
            return
        mine = (fingerprint(self.student_flat, self.teacher.flat, self.rings.img, self.rings.txt),
                self.rings.ptr, self.rings.n_valid)
        ranks = self.dist.all_gather_object(mine, "the consistency check")
        if any(r != ranks[0] for r in ranks):
            differ = [i for i, r in enumerate(ranks) if r != ranks[0]]
            raise RuntimeError(f"ranks {differ} diverged from rank 0 (weights, momentum or rings) at step "
                               f"{self.step}")

    def state_dict(self) -> dict:
        """Trainer state beside the weights and rings (see fastmsd.checkpoint)."""
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist.active:  # each rank's own streams (each draws its own dropout)
            state["rng_by_rank"] = self.dist.all_gather_object(
                {k: state[k] for k in ("rng_cpu", "rng_cuda") if k in state}, "the RNG-state gather")
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        by_rank = state.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == self.dist.world:
            state = {**state, **by_rank[self.dist.rank]}
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
