"""The protocol: every (label fraction, seed) fine-tuned, the model kept by validation score, the test score
reported as mean and spread over seeds, with results.json, results.md and one figure per fraction."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastmsd.config import ConfigError, check_finetune_task, format_size
from fastmsd.data.cache import Cache
from fastmsd.eval import plots
from fastmsd.eval.probe import FRACTIONS, fraction_name, sample_indices, sample_size, seed_summary
from fastmsd.eval.runner import probe_columns
from fastmsd.finetune import classify, segment
from fastmsd.finetune.fit import Settings
from fastmsd.finetune.plan import FinetuneProbe, plan_finetune
from fastmsd.finetune.start import Start
from fastmsd.memory import available_budget, cap_cuda_memory

METRICS = {"classify": "auc", "segment": "dice"}
METRIC_NAMES = {"auc": "AUC", "dice": "Dice"}
FIGURES = {"classify": "roc", "segment": "masks"}


def check_fractions(fractions: Sequence[float], train: np.ndarray, columns: tuple[str, ...]) -> None:
    """Every label needs positives and negatives in each sample: the full split must have both, and a
    sample of fewer than two items cannot (``sample_indices`` adds the missing kinds to larger ones)."""
    n = len(train)
    for c, name in enumerate(columns):
        if train[:, c].all() or not train[:, c].any():
            raise ConfigError(f"label {name!r} has a single class in the training split: "
                              "fine-tuning needs items with and without it")
    for fraction in fractions:
        k = sample_size(n, fraction)
        if k < 2:
            raise ConfigError(f"label fraction {fraction:g} selects {k} of {n} training items, too few "
                              f"for both classes of every label: use at least {2 / n:.2g}")


def task_columns(cache: Cache, task: str) -> tuple[str, ...]:
    """The labels a task predicts on ``cache``: the probe's labels, or the findings it has masks of."""
    if task == "classify":
        return probe_columns(cache)
    if not cache.has_masks:
        raise ConfigError(f"cache {cache.root} has no segmentation masks: --task segment needs a cache "
                          "prepared from SIIM-ACR Pneumothorax, RSNA Pneumonia or synthcxr")
    return cache.mask_findings


def _load(cache: Cache, task: str, split: str, columns: tuple[str, ...],
          size: int) -> classify.Split | segment.MaskSplit:
    if task == "classify":
        return classify.load_split(cache, split, columns, size)
    return segment.load_mask_split(cache, split, columns, size)


def _labels(split: classify.Split | segment.MaskSplit) -> np.ndarray:
    return split.targets if isinstance(split, classify.Split) else split.present


def _figure(task: str, model: torch.nn.Module, test: classify.Split | segment.MaskSplit,
            columns: tuple[str, ...], path: Path, title: str, start: Start, device: torch.device) -> None:
    in_chans = start.cfg.in_chans
    if task == "classify":
        scores = classify.predict(model, test.images, in_chans, device)
        plots.roc_curves_multilabel(scores, test.targets, list(columns), path, title=f"ROC, {title}")
        return
    # Test items that show a finding, and one that shows none, so that false positives are seen too.
    shows = test.present.any(axis=1)
    shown = np.flatnonzero(shows)[:5].tolist() + np.flatnonzero(~shows)[:1].tolist()
    images = test.images[shown]
    pred = segment.predict_masks(model, images, in_chans, device)
    plots.mask_overlays(images[:, 0].numpy(), test.masks[shown].numpy(), pred.numpy(), list(columns), path,
                        title=f"Masks, {title}")


def planned(settings: Settings, start: Start, task: str, n_labels: int, gpu_mem: int | None,
            device: torch.device, progress: bool = True) -> Settings:
    """``settings`` with the micro-batch and checkpointing that fit ``gpu_mem`` on a CUDA ``device``
    (measured by the planner on this task's model), after which the allocator is capped at the budget.
    The probes run before the cap, so that they measure peaks above the budget instead of failing."""
    if gpu_mem is None:
        return settings
    if device.type != "cuda":
        print(f"note: --gpu-mem {format_size(gpu_mem)} has no effect on {device}")
        return settings
    budget = available_budget(gpu_mem, device)
    size, rows = start.cfg.image_size, settings.batch_size
    if task == "classify":
        model, loss = classify.Classifier(start.encoder(0), n_labels), F.binary_cross_entropy_with_logits
        targets = torch.zeros(rows, n_labels)
    else:
        model, loss = segment.build_segmenter(start, n_labels, 0), segment.mask_loss
        targets = torch.zeros(rows, n_labels, size, size)
    images = torch.randn(rows, start.cfg.in_chans, size, size)
    probe = FinetuneProbe(model, model.encoder, loss, images.to(device), targets.to(device), device)
    try:
        micro, every, line = plan_finetune(probe, budget, torch.cuda.get_device_name(device),
                                           settings.checkpointing, progress)
    finally:
        del probe, model
        gc.collect()
        torch.cuda.empty_cache()
    cap_cuda_memory(budget, device)
    print(line, flush=True)
    return dataclasses.replace(settings, micro_batch_size=micro, checkpointing=every)


def finetune(start: Start, cache: Cache, out: Path, task: str = "classify",
             fractions: Sequence[float] = FRACTIONS, seeds: Sequence[int] = (0, 1, 2),
             settings: Settings | None = None, device: torch.device | None = None,
             progress: bool = True, gpu_mem: int | None = None) -> dict:
    """Fine-tune for every (fraction, seed); write results.json, results.md and a figure per fraction (ROC
    curves or mask overlays, of the first seed's model on the test split) to ``out``, and print one line per
    (fraction, seed). ``gpu_mem`` (bytes) plans the steps to fit that much CUDA memory (:func:`planned`)."""
    check_finetune_task(task)
    settings = settings or Settings()
    device = device or torch.device("cpu")
    metric = METRICS[task]
    label = METRIC_NAMES[metric]
    columns = task_columns(cache, task)
    size = start.cfg.image_size
    train = _load(cache, task, "train", columns, size)
    labels = _labels(train)
    check_fractions(fractions, labels, columns)
    val, test = (_load(cache, task, split, columns, size) for split in ("validate", "test"))
    for name, split in (("validation", val), ("test", test)):
        present = _labels(split)
        # A finding absent from a split still has a Dice (a prediction there is a false positive); an AUC
        # needs both classes.
        single = [c for c, v in zip(columns, present.T, strict=True)
                  if not v.any() or (task == "classify" and v.all())]
        if len(single) == len(columns):
            raise ConfigError(f"every label has a single class in the {name} split of {cache.root}: "
                              f"its {label} is undefined")
        if single:
            warnings.warn(f"labels {single} have a single class in the {name} split; left out of its "
                          f"mean {label} where undefined", stacklevel=2)
    settings = planned(settings, start, task, len(columns), gpu_mem, device, progress)
    trainer = classify.train_classifier if task == "classify" else segment.train_segmenter
    scorer = classify.score if task == "classify" else segment.score
    in_chans = start.cfg.in_chans
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": start.source, "cache": str(cache.root), "task": task, "metric": metric,
                     "init": start.name, "labels": list(columns), "settings": dataclasses.asdict(settings),
                     "fractions": {}}
    for fraction in fractions:
        name = fraction_name(fraction)
        runs: list[dict] = []
        for seed in seeds:
            idx = sample_indices(len(labels), fraction, seed, labels)
            trained = trainer(start, train, idx, val, seed, settings, device, progress,
                              desc=f"{name} seed {seed}")
            value, per_label = scorer(trained.model, test, in_chans, device)
            if not runs:
                pct = name.rstrip("%").replace(".", "_")
                _figure(task, trained.model, test, columns, out / f"{FIGURES[task]}_{pct}pct.png",
                        f"{start.name}, {name} of the labels, seed {seed}", start, device)
            runs.append({metric: value, "per_label": per_label, "n_train": len(idx),
                         "best_epoch": trained.best_epoch, "val": trained.val_score})
            print(f"{name} seed {seed}: {len(idx)} training items, best epoch {trained.best_epoch} "
                  f"(validation {label} {trained.val_score:.3f}), test {label} {value:.3f}", flush=True)
        results["fractions"][name] = {
            **seed_summary([r[metric] for r in runs], metric),
            "n_train": [r["n_train"] for r in runs],
            "best_epoch": [r["best_epoch"] for r in runs],
            f"val_{metric}": [r["val"] for r in runs],
            # null, not NaN, for a label with one class in the test split: results.json stays strict JSON.
            f"label_{metric}": {c: _mean_defined([r["per_label"][i] for r in runs])
                                for i, c in enumerate(columns)},
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(format_markdown(results) + "\n")
    return results


def _mean_defined(values: list[float]) -> float | None:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def format_markdown(results: dict) -> str:
    metric = results.get("metric", "auc")
    label = METRIC_NAMES[metric]
    columns = results["labels"]
    fractions = results["fractions"]
    s = results["settings"]
    head = "linear head" if results["task"] == "classify" else "decoder"
    what = f"{head} on the frozen encoder" if s["freeze_encoder"] else f"encoder and {head}"
    lines = [f"### Fine-tuning, {results['task']} from {results['init']} "
             f"(test {label}, mean ± std over seeds)",
             "", f"{what}, {s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']:g} "
             f"(head {s['head_lr']:g}), best epoch by validation {label}", "",
             f"| labels | {label} | training items |", "|---|---|---|"]
    lines += [f"| {frac} | {v[f'{metric}_mean']:.3f} ± {v[f'{metric}_std']:.3f} | "
              f"{', '.join(map(str, v['n_train']))} |" for frac, v in fractions.items()]
    lines += ["", "| labels | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for frac, v in fractions.items():
        per_label = v[f"label_{metric}"]
        cells = ["–" if per_label[c] is None else f"{per_label[c]:.3f}" for c in columns]
        lines.append(f"| {frac} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
