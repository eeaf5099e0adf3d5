"""A training run: its folder, data, tokenizer and model, and the logged, checkpointed loop."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from fastmsd.checkpoint import (
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from fastmsd.config import Config, ConfigError, load_yaml, save_yaml
from fastmsd.data.loader import BatchStream, PairSet, augment, to_model_input
from fastmsd.data.mimic import read_mimic_cxr, report_text
from fastmsd.data.text import load_tokenizer, train_wordpiece
from fastmsd.engine import Batch, Engine, resolve_precision
from fastmsd.memory import cap_cuda_memory, format_size, parse_size
from fastmsd.model import build_model, check_encoder_names

CONFIG_FILE = "config.yaml"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available")
    return device


def ensure_data(root: str | Path, generate: bool) -> Path:
    """The dataset folder; synthcxr is generated there on first use when ``generate``."""
    root = Path(root)
    if generate and not (root / "synthcxr.json").is_file():
        from fastmsd.data.synthetic import generate as generate_synthcxr

        print(f"generating synthcxr in {root} (first use)")
        generate_synthcxr(root)
    if not root.is_dir():
        raise ConfigError(f"data folder {root} not found")
    return root


def locate_checkpoint(runs_dir: str | Path, name: str | None, resume: str) -> Path:
    """The checkpoint that ``--resume`` names: "latest" of the named run (or of the most
    recently saved run), or a checkpoint folder."""
    if resume != "latest":
        checkpoint = Path(resume)
        if not is_complete(checkpoint):
            raise ConfigError(f"checkpoint {checkpoint} not found")
        return checkpoint
    runs_dir = Path(runs_dir)
    if name is not None:
        checkpoint = latest_checkpoint(runs_dir / name)
        if checkpoint is None:
            raise ConfigError(f"--resume latest: no checkpoint in {runs_dir / name}")
        return checkpoint
    found = [c for c in map(latest_checkpoint, runs_dir.glob("*")) if c is not None] \
        if runs_dir.is_dir() else []
    if not found:
        raise ConfigError(f"--resume latest: no run with a checkpoint in {runs_dir}")
    return max(found, key=lambda c: c.stat().st_mtime)


def run_config(checkpoint: Path) -> Config:
    """The saved configuration of the run a checkpoint belongs to."""
    return load_yaml(checkpoint.parent.parent / CONFIG_FILE)


def new_run_dir(cfg: Config) -> Path:
    name = cfg.train.name or f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.train.runs_dir) / name
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run folder {run_dir} already exists: pass --resume latest or another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.name = name
    save_yaml(cfg, run_dir / CONFIG_FILE)
    return run_dir


def run_tokenizer(cfg: Config, run_dir: Path, reports: list[str]):
    """The text encoder's own tokenizer when it is a local model folder, else a WordPiece
    vocabulary trained on the training reports once and kept with the run."""
    source = Path(cfg.model.text_encoder)
    if source.is_dir():
        return load_tokenizer(source)
    saved = run_dir / "tokenizer"
    if (saved / "vocab.txt").is_file():
        return load_tokenizer(saved)
    return train_wordpiece(reports, cfg.model.vocab_size, saved)


def _memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Logger:
    """metrics.jsonl and TensorBoard events in the run folder."""

    run_dir: Path

    def __post_init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (self.run_dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(self.run_dir / "tb"))

    def log(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def make_batch(pairs: PairSet, idx: torch.Tensor, cfg: Config, step: int,
               device: torch.device) -> Batch:
    # uint8 pixels travel (4x fewer bytes than float) and are augmented on the device, from a
    # generator keyed by (seed, step): resume-exact, and apart from the RNG dropout consumes.
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    pin = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if pin else t

    images = to_model_input(augment(move(pairs.images[idx]), g), cfg.model.in_chans)
    return Batch(images, move(pairs.input_ids[idx].long()), move(pairs.attention_mask[idx]))


def train(cfg: Config, *, resume: str | None = None, stop_after: int | None = None,
          generate_data: bool = False, progress: bool = True) -> Path:
    """Train (or resume) a run and return its folder.

    ``resume`` is "latest" or a checkpoint folder; ``cfg`` is then the run's saved config (see
    ``run_config``) with any deliberate changes, such as more steps. ``stop_after`` ends this
    invocation after that many steps, with a checkpoint, as a job with a time slot would."""
    checkpoint = None if resume is None else locate_checkpoint(cfg.train.runs_dir, cfg.train.name, resume)
    run_dir = None if checkpoint is None else checkpoint.parent.parent
    cfg.validate()
    check_encoder_names(cfg.model)
    device = resolve_device(cfg.train.device)
    resolve_precision(cfg.train.precision, device)
    if cfg.train.gpu_mem is not None:
        budget = parse_size(cfg.train.gpu_mem)
        if device.type == "cuda":
            cap_cuda_memory(budget, device)
        else:
            print(f"note: --gpu-mem {cfg.train.gpu_mem} has no effect on {device}")
    data_root = ensure_data(cfg.train.data, generate_data)
    records = [r for r in read_mimic_cxr(data_root) if r.split == "train"]
    reports = [report_text(r.report_path.read_text(encoding="utf-8", errors="replace")) for r in records]
    if run_dir is None:
        run_dir = new_run_dir(cfg)
    else:
        save_yaml(cfg, run_dir / CONFIG_FILE)
    tokenizer = run_tokenizer(cfg, run_dir, reports)

    torch.manual_seed(cfg.train.seed)
    engine = Engine(cfg, build_model(cfg.model, len(tokenizer)), device)
    pairs = PairSet.build([r.image_path for r in records], reports, tokenizer,
                          cfg.model.image_size, cfg.model.max_len)
    stream = BatchStream(len(pairs), cfg.train.batch_size, cfg.train.seed)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine.model, engine.rings, device)
        stream.load_state_dict(state.pop("data"))
        engine.load_state_dict(state)
        engine.refresh_shadow()
        print(f"resumed {checkpoint} at step {engine.step}")

    t = cfg.train
    last = t.steps if stop_after is None else min(t.steps, engine.step + stop_after)
    logger = Logger(run_dir)
    bar = tqdm(total=t.steps, initial=engine.step, desc=f"train {run_dir.name}", unit="step",
               disable=not progress, dynamic_ncols=True)
    window_loss = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    try:
        while engine.step < last:
            batch = make_batch(pairs, stream.next(), cfg, engine.step, device)
            loss, grad_norm = engine.train_step(batch)
            window_loss += loss.detach()
            window_steps += 1
            bar.update(1)
            if engine.step % t.log_every == 0 or engine.step == last:
                # The only host syncs of the loop: once per log interval.
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": window_loss.item() / window_steps,
                    "grad_norm": float(grad_norm),
                    "lr": engine.scheduler.get_last_lr()[0],
                    "tau": engine.model.tau.item(),
                    "alpha": engine.alpha,
                    "img_per_s": window_steps * t.batch_size / elapsed,
                    "memory_bytes": _memory_in_use(device),
                    "ring_n_valid": engine.rings.n_valid,
                }
                logger.log(engine.step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", img_s=f"{metrics['img_per_s']:.0f}",
                                mem=format_size(metrics["memory_bytes"]))
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if engine.step % t.save_every == 0 or engine.step == last:
                save_checkpoint(run_dir, engine.step, engine.model, engine.rings,
                                {**engine.state_dict(), "data": stream.state_dict()}, t.keep_last)
    finally:
        bar.close()
        logger.close()
    if t.eval_at_end and engine.step == t.steps:
        from fastmsd.eval.zeroshot import evaluate_synthcxr, format_results

        results = evaluate_synthcxr(engine.model, tokenizer, data_root, cfg.model, device)
        (run_dir / "zeroshot.json").write_text(json.dumps(results, indent=2))
        print(format_results(results))
    return run_dir


def load_trained(path: str | Path, device: torch.device):
    """(config, model, tokenizer, checkpoint) of a run folder (its latest checkpoint) or of a
    checkpoint folder."""
    path = Path(path)
    checkpoint = path if is_complete(path) else latest_checkpoint(path)
    if checkpoint is None:
        raise ConfigError(f"{path} is neither a run with a checkpoint nor a checkpoint")
    cfg = run_config(checkpoint)
    source = Path(cfg.model.text_encoder)
    tokenizer = load_tokenizer(source if source.is_dir() else checkpoint.parent.parent / "tokenizer")
    model = build_model(cfg.model, len(tokenizer)).to(device)
    load_weights(checkpoint, model, device)
    return cfg, model, tokenizer, checkpoint
