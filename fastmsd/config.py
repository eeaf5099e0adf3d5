"""Dataclass configs, the `tiny` and `base` presets, and YAML load/save.

Each field is declared once, with `setting`: its default, its help text and, where it has them,
its choices and CLI hints. The CLI generates an option for every field from that declaration
(`fastmsd train --help` lists them), and `Config.validate` checks the choices it names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class Setting:
    """How a config field appears on the command line."""

    help: str
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # the option's name without "--" when it is not the field's name
    metavar: str | None = None
    positive: bool = False  # the CLI refuses values below 1
    # Not an option of `fastmsd plan`: the planner picks it, or it belongs to the run (data,
    # schedule, logging), not to the step a plan measures.
    train_only: bool = False
    group: str | None = None  # a help section of its own, by title


FAST_PATH = "fast path (each on by default but --compile; off to measure)"


def setting(default: Any, **cli: Any) -> Any:
    """A dataclass field whose metadata holds its `Setting` (``cli``: help, choices, ...)."""
    metadata = {"setting": Setting(**cli)}
    if isinstance(default, dict):  # one shared dict would leak edits between configs
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def setting_of(f: dataclasses.Field) -> Setting:
    return f.metadata["setting"]


def option_name(f: dataclasses.Field) -> str:
    """The field's command-line option, e.g. --accum-mode."""
    return "--" + (setting_of(f).flag or f.name.replace("_", "-"))


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


@dataclass
class ModelConfig:
    image_encoder: str = setting("convnext_atto", help="timm model name")
    image_encoder_args: dict[str, Any] = setting(
        {}, metavar="JSON",
        help="extra timm constructor arguments as a JSON object, e.g. '{\"depths\": [1, 1, 2, 1]}' "
             "(dims, img_size, ...); replaces the preset's")
    image_weights: str | None = setting(
        None, metavar="FILE",
        help="a local weights file for the image encoder (timm reads it instead of the hub)")
    image_size: int = setting(64, positive=True, help="image side in pixels")
    in_chans: int = setting(1, positive=True, help="input channels of the image encoder (grayscale repeated)")
    text_encoder: str = setting("bert-tiny", help="transformers model name or local model folder")
    text_encoder_args: dict[str, Any] = setting(
        {}, metavar="JSON",
        help="BertConfig overrides as a JSON object, e.g. '{\"num_hidden_layers\": 2}', for config-only "
             "construction (no weights available offline); replaces the preset's")
    pretrained: bool = setting(
        False, help="load the encoders' pretrained weights from the hub (a local text encoder folder "
                    "always loads its own)")
    max_len: int = setting(64, positive=True, help="report tokens the text encoder reads")
    vocab_size: int = setting(
        2048, positive=True, help="WordPiece size when the tokenizer is trained on the reports")
    embed_dim: int = setting(256, positive=True, help="width of the shared image-text embedding")
    tau_init: float = setting(0.07, help="initial softmax temperature (learned)")
    tau_min: float = setting(0.001, help="lower clamp of the learned temperature")
    tau_max: float = setting(0.5, help="upper clamp of the learned temperature")
    # m in theta' <- m theta' + (1 - m) theta: how slowly the momentum teacher follows the student.
    ema_decay: float = setting(0.995, help="EMA decay m of the momentum teacher")


@dataclass
class TrainConfig:
    data: str = setting(
        "data/synthcxr-cache", train_only=True, metavar="CACHE|MIX",
        help="a cache made by `fastmsd prepare` (default data/synthcxr-cache: synthcxr, generated and "
             "prepared on first use), or a mix of caches with sampling weights, PATH=WEIGHT,..., e.g. "
             "caches/mimic=0.7,caches/chestxray14=0.3 (evaluation uses the first)")
    label_text: bool = setting(
        True, train_only=True,
        help="a cache without reports, or with reports not in English (PadChest), trains on texts "
             "written from its positive labels by the --label-prompts grammar (default); off, reports "
             "in any language, and a cache without reports is refused")
    label_prompts: str | None = setting(
        None, train_only=True, metavar="FILE",
        help="YAML grammar of the label texts (default: fastmsd/data/label_prompts.yaml)")
    runs_dir: str = setting("runs", help="where run folders live (default runs)")
    name: str | None = setting(
        None, help="run name (default PRESET-DATE-TIME); the plan is cached in its folder")
    init: str | None = setting(
        None, train_only=True, metavar="RUN",
        help="start a new run from a run's latest checkpoint, a checkpoint folder or an hf export: its "
             "student (the momentum teacher a copy of it) and temperature, with a fresh optimizer, rings "
             "and schedule; not --resume")
    device: str = setting("auto", help="auto, cpu, cuda, cuda:1, ...")
    precision: str = setting(
        "auto", choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: bf16 autocast on CUDA, fp32 on the CPU; fp16 uses a gradient scaler")
    batch_size: int = setting(128, positive=True, help="effective batch N")
    micro_batch_size: int = setting(
        64, positive=True, train_only=True, help="micro-batch b (A = ceil(N / b)); the last may be shorter")
    # No activations are kept in the keys phase, so the chunk may exceed b.
    key_chunk: int = setting(256, positive=True, train_only=True, help="keys-phase chunk size")
    queue_size: int = setting(2048, positive=True, help="ring capacity Q (>= N)")
    accum_mode: str = setting(
        "exact", choices=("exact", "naive"),
        help="keys of the whole effective batch first (exact), or per-micro-batch keys, enqueue and EMA "
             "(naive, ALBEF-style, for ablations)")
    loader: str = setting(
        "auto", choices=("auto", "memory", "torch", "dali"), train_only=True,
        help="auto: decode a small split once into memory, else stream it (DALI if installed)")
    loader_workers: int = setting(2, positive=True, train_only=True, help="decoding threads (default 2)")
    loss_impl: str = setting(
        "auto", choices=("auto", "triton", "eager"),
        help="fused Triton loss or the eager reference (auto: Triton on CUDA)")
    ema_impl: str = setting(
        "auto", choices=("auto", "triton", "foreach"),
        help="flat Triton EMA or torch's lerp (auto: Triton on CUDA)")
    dot_precision: str = setting(
        "tf32", choices=("ieee", "tf32", "bf16"), help="the fused loss's fp32 dot products (default tf32)")
    alpha: float = setting(0.4, train_only=True, help="distillation weight after the ramp")
    alpha_warmup_steps: int = setting(
        200, train_only=True, help="steps of the distillation weight's linear ramp from 0")
    steps: int = setting(1000, positive=True, train_only=True, help="optimizer steps of the whole schedule")
    lr: float = setting(
        1e-3, train_only=True, help="peak learning rate (linear warmup, then cosine decay to 0)")
    tau_lr: float = setting(1e-4, train_only=True, help="learning rate of the temperature")
    weight_decay: float = setting(
        0.02, train_only=True, help="AdamW weight decay of the weight matrices (not of biases, norms, tau)")
    warmup_steps: int = setting(50, train_only=True, help="steps of the learning rate's linear warmup")
    grad_clip: float = setting(1.0, train_only=True, help="the gradient norm is clipped to this")
    checkpointing: str = setting(
        "none", train_only=True, metavar="POLICY",
        help="activation checkpointing of the student's blocks: none, all, or image=K,text=K (every K-th "
             "block; 0 for none)")
    seed: int = setting(0, train_only=True, help="seed of the initial weights and the data order")
    log_every: int = setting(20, positive=True, train_only=True, help="log the metrics every K steps")
    save_every: int = setting(400, positive=True, train_only=True, help="save a checkpoint every K steps")
    keep_last: int = setting(2, train_only=True, help="checkpoints kept, the newest (0: all)")
    gpu_mem: str | None = setting(
        None, metavar="SIZE",
        help="GPU memory budget, e.g. 12G, 12GiB, 12000MiB: the allocator is capped there and the planner "
             "picks micro-batch, checkpointing and key chunk")
    # Longer than an --eval-every evaluation, which rank 0 runs while the others wait.
    dist_timeout: float = setting(
        1800.0, train_only=True,
        help="torchrun: seconds a rank waits for the others before failing (default 1800)")
    plan: bool = setting(  # train_only: `fastmsd plan` always plans
        True, train_only=True,
        help="with --gpu-mem, let the planner choose (default) or only cap the allocator")
    # Each piece of the fast path can be switched off to measure it (bench/step.py turns all off).
    fused_adamw: bool = setting(True, group=FAST_PATH, help="torch's fused AdamW (CUDA)")
    sdpa: bool = setting(True, group=FAST_PATH, help="fused scaled-dot-product attention in both encoders")
    bf16_teacher: bool = setting(
        True, group=FAST_PATH, help="keys phase on a bf16 shadow of the teacher (under bf16)")
    pin_memory: bool = setting(True, group=FAST_PATH, help="pinned, non-blocking host-to-device copies")
    compile: bool = setting(False, group=FAST_PATH, help="torch.compile the encoders")
    # Static shapes are what compile wants; trimming saves attention work in eager mode.
    report_padding: str = setting(
        "auto", choices=("auto", "fixed", "trim"), group=FAST_PATH,
        help="pad reports to max_len (static shapes) or cut each batch to its longest (auto: fixed with "
             "--compile, else trim)")
    eval_at_end: bool = setting(
        True, flag="eval", train_only=True,
        help="run the zero-shot evaluation at the end (default)")
    eval_every: int = setting(
        0, train_only=True,
        help="zero-shot and retrieval every K steps, logged with the training metrics (0: only at the end)")


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
        for section in (m, t):
            for f in dataclasses.fields(section):
                choices, value = setting_of(f).choices, getattr(section, f.name)
                if choices is not None and value not in choices:
                    raise ConfigError(f"unknown {option_name(f)} {value!r} ({_one_of(choices)})")
        parse_checkpointing(t.checkpointing)
        parse_data(t.data)
        if t.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be positive, got {t.dist_timeout}")
        if not 0.0 <= t.alpha <= 1.0:
            raise ConfigError(f"alpha must lie in [0, 1], got {t.alpha}")
        if t.steps < 1:
            raise ConfigError("--steps must be positive")
        if not 0.0 <= m.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {m.ema_decay}")
        if not m.tau_min <= m.tau_init <= m.tau_max:
            raise ConfigError(f"tau_init {m.tau_init} is outside [{m.tau_min}, {m.tau_max}]")


# GPU memory is sold in binary units (a "12 GB" card has 12,288 MiB), so G, GB and GiB all
# mean 2**30: reading GB as 10**9 would silently cap a 12 GB card at 11.2 GiB.
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'12G', '12GiB', '12GB', '12000MiB', '11.5G' -> bytes (--gpu-mem). Anything else is a ConfigError."""
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(
            f"malformed memory size {text!r}: expected a number and a unit, e.g. 12G, 12GiB or 12000MiB"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 2**20:
        raise ConfigError(f"memory size {text!r} is below 1 MiB")
    return int(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


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


def parse_data(text: str) -> list[tuple[str, float]] | None:
    """``--data`` as a mix, "PATH=WEIGHT,PATH=WEIGHT,...": [(cache folder, weight)] in the given
    order, the weights normalised to sum 1; None for one cache folder (a text without "=", or an
    existing folder whose name has one). A folder is a path, relative to the working directory."""
    if "=" not in text or Path(text).is_dir():
        return None
    mix: dict[Path, tuple[str, float]] = {}
    for part in text.split(","):
        folder, _, weight = part.rpartition("=")
        folder, weight = folder.strip(), weight.strip()
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not folder or not math.isfinite(value):
            raise ConfigError(f"malformed --data {text!r}: one cache folder, or a mix "
                              "PATH=WEIGHT,PATH=WEIGHT,... (e.g. caches/mimic=0.7,caches/chestxray14=0.3)")
        if value <= 0:
            raise ConfigError(f"--data gives {folder} the weight {weight}: weights must be positive "
                              "(leave a cache out rather than weigh it 0)")
        if Path(folder) in mix:
            raise ConfigError(f"--data names {folder} twice")
        mix[Path(folder)] = (folder, value)
    total = sum(value for _, value in mix.values())
    return [(folder, value / total) for folder, value in mix.values()]


@dataclass(frozen=True)
class StepSizes:
    """How one step is cut up: rows per micro-batch, rows per keys-phase chunk, and which
    student blocks recompute their activations. From the config, or chosen by the --gpu-mem
    planner and handed to the engine as they are (the config stays what the user asked for)."""

    micro_batch_size: int
    key_chunk: int
    checkpointing: str = "none"

    @classmethod
    def of(cls, train: TrainConfig) -> StepSizes:
        return cls(train.micro_batch_size, train.key_chunk, train.checkpointing)


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


FINETUNE_TASKS = ("classify", "segment")


def check_finetune_task(task: str) -> None:
    """Here rather than in fastmsd.finetune, so the CLI can refuse a task before importing torch."""
    if task not in FINETUNE_TASKS:
        raise ConfigError(f"unknown fine-tuning task {task!r} (known: {', '.join(FINETUNE_TASKS)})")
