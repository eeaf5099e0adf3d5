"""`fastmsd finetune`: a trained student's image encoder fine-tuned for classification at label fractions.

The protocol the medical VLP papers report next to the linear probe: the whole encoder plus a linear head is
trained on 1 %, 10 % and 100 % of the training labels, the epoch with the best validation macro AUC is kept,
and the test AUC is reported as mean and spread over seeds. Baselines start from the same architecture at
random (``scratch``) or from ImageNet weights. Labels and the items each (fraction, seed) sees are the linear
probe's (``probe_targets``, ``sample_indices``), so fine-tuning and probe figures are comparable item by item.

Only ``classify`` is built; a task is a targets builder plus a head and a metric, so ``segment`` (masks, a
decoder head, Dice) slots in beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastmsd.config import ConfigError, ModelConfig, check_finetune_task
from fastmsd.data.cache import Cache
from fastmsd.data.loader import augment, load_images, normalize_, step_generator, to_device, to_model_input
from fastmsd.eval import metrics, plots
from fastmsd.eval.probe import FRACTIONS, fraction_name, sample_indices, sample_size, seed_summary
from fastmsd.eval.runner import probe_columns, probe_targets
from fastmsd.model import build_image_encoder, load_image_weights, set_block_checkpointing


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


@dataclass
class Start:
    """Where fine-tuning starts: the image encoder's architecture and, unless ``scratch``, its weights."""

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


@dataclass
class Split:
    images: torch.Tensor  # uint8 [n, 1, size, size]
    targets: np.ndarray  # {0, 1} [n, labels]


def load_split(cache: Cache, split: str, columns: tuple[str, ...], size: int) -> Split:
    indices, targets = probe_targets(cache, cache.indices(split), columns)
    return Split(load_images(cache.image_paths(indices), size, f"decode {split}"), targets)


def check_fractions(fractions: Sequence[float], train: np.ndarray, columns: tuple[str, ...]) -> None:
    """Every label needs positives and negatives in each sample: the full split must have both, and a
    sample of fewer than two items cannot (``sample_indices`` adds the missing kinds to larger ones)."""
    n = len(train)
    for c, name in enumerate(columns):
        if train[:, c].all() or not train[:, c].any():
            raise ConfigError(f"label {name!r} has a single class in the training split: "
                              "its AUC is undefined")
    for fraction in fractions:
        k = sample_size(n, fraction)
        if k < 2:
            raise ConfigError(f"label fraction {fraction:g} selects {k} of {n} training items, too few "
                              f"for both classes of every label: use at least {2 / n:.2g}")


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, n_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.num_features, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor, in_chans: int, device: torch.device,
            batch_size: int = 256) -> np.ndarray:
    """Per-label probabilities [n, labels] of uint8 images, with the evaluation preprocessing."""
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = to_model_input(to_device(images[s : s + batch_size], device), in_chans)
        with _autocast(device):
            out.append(torch.sigmoid(model(x).float()).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def _macro_auc(scores: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
    with warnings.catch_warnings():
        # A split whose label has one class is reported once, by the caller, not every epoch.
        warnings.simplefilter("ignore", UserWarning)
        return metrics.macro_auc_multilabel(scores, targets)


@dataclass
class Trained:
    model: Classifier
    best_epoch: int
    val_auc: float


def train_classifier(start: Start, train: Split, idx: np.ndarray, val: Split, seed: int, settings: Settings,
                     device: torch.device, progress: bool = True, desc: str = "finetune") -> Trained:
    """Encoder + linear head trained with BCE on ``train``'s rows ``idx``; the weights of the epoch with the
    best validation macro AUC are returned."""
    model = Classifier(start.encoder(seed), train.targets.shape[1])
    if settings.checkpointing:
        set_block_checkpointing(model.encoder, settings.checkpointing)
    model.to(device)
    if settings.freeze_encoder:
        model.encoder.requires_grad_(False)
    groups = [{"params": model.head.parameters(), "lr": settings.head_lr}]
    if not settings.freeze_encoder:
        groups.append({"params": model.encoder.parameters(), "lr": settings.lr})
    opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay, fused=device.type == "cuda")
    batch = min(settings.batch_size, len(idx))
    per_epoch = math.ceil(len(idx) / batch)
    total = settings.epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    targets = torch.from_numpy(train.targets)
    in_chans = start.cfg.in_chans
    best: tuple[float, int, dict] = (-math.inf, 0, {})
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress or None)
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        if settings.freeze_encoder:
            model.encoder.eval()  # frozen normalisation statistics, too
        order = torch.from_numpy(idx)[torch.randperm(len(idx), generator=step_generator(seed, -1 - epoch))]
        for s in range(0, len(order), batch):
            rows = order[s : s + batch]
            images = to_device(train.images[rows], device)
            x = normalize_(augment(images, step_generator(seed, step)), in_chans)
            with _autocast(device):
                logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        auc = _macro_auc(predict(model, val.images, in_chans, device), val.targets)[0]
        if auc > best[0]:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best = (auc, epoch + 1, weights)
    bar.close()
    model.load_state_dict(best[2])
    return Trained(model, best[1], best[0])


def finetune(start: Start, cache: Cache, out: Path, task: str = "classify",
             fractions: Sequence[float] = FRACTIONS, seeds: Sequence[int] = (0, 1, 2),
             settings: Settings | None = None, device: torch.device | None = None,
             progress: bool = True) -> dict:
    """Fine-tune for every (fraction, seed); write results.json, results.md and a ROC plot per fraction
    (the first seed's test scores) to ``out``, and print one line per (fraction, seed)."""
    check_finetune_task(task)
    settings = settings or Settings()
    device = device or torch.device("cpu")
    columns = probe_columns(cache)
    size = start.cfg.image_size
    train = load_split(cache, "train", columns, size)
    check_fractions(fractions, train.targets, columns)
    val, test = (load_split(cache, split, columns, size) for split in ("validate", "test"))
    for name, split in (("validation", val), ("test", test)):
        single = [c for c, v in zip(columns, split.targets.T, strict=True) if v.all() or not v.any()]
        if len(single) == len(columns):
            raise ConfigError(f"every label has a single class in the {name} split of {cache.root}: "
                              "its AUC is undefined")
        if single:
            warnings.warn(f"labels {single} have a single class in the {name} split; left out of its "
                          "mean AUC", stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": start.source, "cache": str(cache.root), "task": task, "init": start.name,
                     "labels": list(columns), "settings": dataclasses.asdict(settings), "fractions": {}}
    for fraction in fractions:
        name = fraction_name(fraction)
        runs: list[dict] = []
        for seed in seeds:
            idx = sample_indices(len(train.targets), fraction, seed, train.targets)
            trained = train_classifier(start, train, idx, val, seed, settings, device, progress,
                                       desc=f"{name} seed {seed}")
            scores = predict(trained.model, test.images, start.cfg.in_chans, device)
            auc, per_label = _macro_auc(scores, test.targets)
            if not runs:
                pct = name.rstrip("%").replace(".", "_")
                plots.roc_curves_multilabel(scores, test.targets, list(columns), out / f"roc_{pct}pct.png",
                                            title=f"ROC, {start.name}, {name} of the labels, seed {seed}")
            runs.append({"auc": auc, "per_label": per_label, "n_train": len(idx),
                         "best_epoch": trained.best_epoch, "val_auc": trained.val_auc})
            print(f"{name} seed {seed}: {len(idx)} training items, best epoch {trained.best_epoch} "
                  f"(validation AUC {trained.val_auc:.3f}), test AUC {auc:.3f}", flush=True)
        aucs = [r["auc"] for r in runs]
        results["fractions"][name] = {
            **seed_summary(aucs),
            "n_train": [r["n_train"] for r in runs],
            "best_epoch": [r["best_epoch"] for r in runs],
            "val_auc": [r["val_auc"] for r in runs],
            # null, not NaN, for a label with one class in the test split: results.json stays strict JSON.
            "label_auc": {c: _mean_defined([r["per_label"][i] for r in runs]) for i, c in enumerate(columns)},
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(format_markdown(results) + "\n")
    return results


def _mean_defined(values: list[float]) -> float | None:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def format_markdown(results: dict) -> str:
    columns = results["labels"]
    fractions = results["fractions"]
    s = results["settings"]
    what = "linear head on the frozen encoder" if s["freeze_encoder"] else "encoder and linear head"
    lines = [f"### Fine-tuning, {results['task']} from {results['init']} (test AUC, mean ± std over seeds)",
             "", f"{what}, {s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']:g} "
             f"(head {s['head_lr']:g}), best epoch by validation macro AUC", "",
             "| labels | AUC | training items |", "|---|---|---|"]
    lines += [f"| {frac} | {v['auc_mean']:.3f} ± {v['auc_std']:.3f} | {', '.join(map(str, v['n_train']))} |"
              for frac, v in fractions.items()]
    lines += ["", "| labels | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for frac, v in fractions.items():
        cells = ["–" if v["label_auc"][c] is None else f"{v['label_auc'][c]:.3f}" for c in columns]
        lines.append(f"| {frac} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
