"""Dataclass configs, the `tiny` and `base` presets, and YAML load/save."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line and exits 2."""


@dataclass
class ModelConfig:
    image_encoder: str = "convnext_atto"
    # Extra timm constructor arguments (depths, dims, img_size, ...).
    image_encoder_args: dict[str, Any] = field(default_factory=dict)
    # A local weights file for the image encoder (timm reads it instead of the hub).
    image_weights: str | None = None
    image_size: int = 64
    in_chans: int = 1
    # A transformers model name or a local directory holding config (+ weights, tokenizer).
    text_encoder: str = "bert-tiny"
    # BertConfig overrides for config-only construction (no weights available offline).
    text_encoder_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    max_len: int = 64
    vocab_size: int = 2048  # WordPiece size when the tokenizer is trained on the reports
    embed_dim: int = 256
    tau_init: float = 0.07
    tau_min: float = 0.001
    tau_max: float = 0.5
    momentum: float = 0.995


@dataclass
class TrainConfig:
    data: str = "data/synthcxr-cache"  # a cache written by `fastmsd prepare`
    runs_dir: str = "runs"
    name: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int = 128  # effective batch N
    micro_batch_size: int = 64  # b; the last micro-batch may be shorter
    key_chunk: int = 256  # keys-phase chunk (no activations are kept, so it may exceed b)
    queue_size: int = 2048  # ring capacity Q, must be >= N
    accum_mode: str = "exact"  # exact | naive
    loader: str = "auto"  # auto | memory | torch | dali (see fastmsd.data.loader)
    loader_workers: int = 2
    loss_impl: str = "auto"  # auto (triton on CUDA, eager elsewhere) | triton | eager
    ema_impl: str = "auto"  # auto (triton on CUDA, foreach elsewhere) | triton | foreach
    dot_precision: str = "tf32"  # the fused loss's fp32 dots: ieee | tf32 | bf16
    alpha: float = 0.4
    alpha_warmup_steps: int = 200
    steps: int = 1000
    lr: float = 1e-3
    tau_lr: float = 1e-4
    weight_decay: float = 0.02
    warmup_steps: int = 50
    grad_clip: float = 1.0
    # Activation checkpointing of the student's blocks: none, all, or image=K,text=K (every
    # K-th block of each encoder, 0 for none). With --gpu-mem on a GPU the planner chooses it.
    checkpointing: str = "none"
    seed: int = 0
    log_every: int = 20
    save_every: int = 400
    keep_last: int = 2
    gpu_mem: str | None = None
    # torchrun: how long a collective waits for the other ranks before failing (longer than an
    # --eval-every evaluation, which rank 0 runs while the others wait).
    dist_timeout: float = 1800.0
    plan: bool = True  # with --gpu-mem on a GPU: micro-batch, checkpointing, key chunk by the planner
    # The fast path, each piece switchable for measurement (bench/step.py turns all off).
    fused_adamw: bool = True  # torch's fused AdamW kernel (CUDA)
    sdpa: bool = True  # fused scaled-dot-product attention in both encoders
    bf16_teacher: bool = True  # keys phase on a bf16 shadow of the teacher (under bf16)
    pin_memory: bool = True  # pinned host buffers, non-blocking copies (CUDA)
    compile: bool = False  # torch.compile the encoders
    # Reports padded to max_len (static shapes, what compile wants) or cut to the longest
    # report of each effective batch (less attention work in eager mode); auto: fixed iff compile.
    report_padding: str = "auto"  # auto | fixed | trim
    eval_at_end: bool = True
    eval_every: int = 0  # zero-shot + retrieval every K steps (0: only at the end)


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        t, m = self.train, self.model
        if t.batch_size < 1 or t.micro_batch_size < 1 or t.key_chunk < 1:
            raise ConfigError("batch sizes and the key chunk must be positive")
        if t.queue_size < t.batch_size:
            raise ConfigError(
                f"queue size {t.queue_size} is smaller than the effective batch {t.batch_size}: "
                "the ring must hold every key of one effective batch (--queue-size >= --batch-size)"
            )
        if t.accum_mode not in ("exact", "naive"):
            raise ConfigError(f"unknown --accum-mode {t.accum_mode!r} (exact or naive)")
        if t.loader not in ("auto", "memory", "torch", "dali"):
            raise ConfigError(f"unknown --loader {t.loader!r} (auto, memory, torch or dali)")
        if t.loss_impl not in ("auto", "triton", "eager"):
            raise ConfigError(f"unknown --loss-impl {t.loss_impl!r} (auto, triton or eager)")
        if t.ema_impl not in ("auto", "triton", "foreach"):
            raise ConfigError(f"unknown --ema-impl {t.ema_impl!r} (auto, triton or foreach)")
        if t.dot_precision not in ("ieee", "tf32", "bf16"):
            raise ConfigError(f"unknown --dot-precision {t.dot_precision!r} (ieee, tf32 or bf16)")
        if t.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown --precision {t.precision!r} (auto, fp32, bf16 or fp16)")
        parse_checkpointing(t.checkpointing)
        if t.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be positive, got {t.dist_timeout}")
        if t.report_padding not in ("auto", "fixed", "trim"):
            raise ConfigError(f"unknown --report-padding {t.report_padding!r} (auto, fixed or trim)")
        if not 0.0 <= t.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {t.alpha}")
        if t.steps < 1:
            raise ConfigError("--steps must be positive")
        if not 0.0 <= m.momentum < 1.0:
            raise ConfigError(f"momentum must lie in [0, 1), got {m.momentum}")
        if not m.tau_min <= m.tau_init <= m.tau_max:
            raise ConfigError(f"tau_init {m.tau_init} is outside [{m.tau_min}, {m.tau_max}]")


def parse_checkpointing(text: str) -> tuple[int, int]:
    """'none' -> (0, 0), 'all' -> (1, 1), 'image=1,text=2' -> (1, 2): checkpoint every K-th
    block of the image and the text encoder (0: none)."""
    named = {"none": (0, 0), "all": (1, 1)}
    if text in named:
        return named[text]
    every = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("image", "text") or not value.strip().isdigit():
            raise ConfigError(f"malformed --checkpointing {text!r}: none, all or image=K,text=K "
                              "(every K-th block, 0 for none)")
        every[key.strip()] = int(value)
    return every.get("image", 0), every.get("text", 0)


def format_checkpointing(image_every: int, text_every: int) -> str:
    named = {(0, 0): "none", (1, 1): "all"}
    return named.get((image_every, text_every), f"image={image_every},text={text_every}")


def _tiny() -> Config:
    return Config(
        preset="tiny",
        model=ModelConfig(
            image_encoder="convnext_atto",
            image_encoder_args={"dims": [24, 48, 96, 192], "depths": [1, 1, 2, 1]},
            image_size=64,
            in_chans=1,
            text_encoder="bert-tiny",
            max_len=64,
            vocab_size=2048,
        ),
        train=TrainConfig(),
    )


def _base() -> Config:
    return Config(
        preset="base",
        model=ModelConfig(
            image_encoder="vit_base_patch16_224",
            image_size=224,
            in_chans=3,
            text_encoder="bert-base-uncased",
            max_len=128,
            vocab_size=30522,
        ),
        train=TrainConfig(
            batch_size=4096,
            micro_batch_size=64,
            key_chunk=512,
            queue_size=65536,
            steps=20000,
            lr=1e-4,
            warmup_steps=1000,
            alpha_warmup_steps=2000,
            weight_decay=0.05,
            checkpointing="all",
            log_every=50,
            save_every=1000,
        ),
    )


PRESETS = {"tiny": _tiny, "base": _base}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    def build(cls: type, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
        return cls(**values)

    return Config(
        preset=d.get("preset", "tiny"),
        model=build(ModelConfig, d.get("model", {})),
        train=build(TrainConfig, d.get("train", {})),
    )


def save_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    return from_dict(yaml.safe_load(path.read_text()) or {})
