"""`fastmsd eval`: zero-shot classification, retrieval and the few-shot linear probe of one
checkpoint on a prepared cache, written as results.json, a Markdown table and PNG plots.

- zeroshot: the 5x200 list (5 classes, 200 single-finding test images each) by image-prompt
  similarity: accuracy, macro F1, per-class recall, one-vs-rest AUC on prompt probabilities;
- retrieval: on the 5x200 items, image->report and report->image Precision@1/5/10 with class
  relevance (as GLoRIA and MGCA report); on the paired test split, Recall@1/5/10 of the exact
  report and image;
- linear-probe: frozen image embeddings, logistic regression on 1 %, 10 % and 100 % of the
  training labels (the five competition findings, multi-label), three seeds, AUC mean and spread.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastmsd.config import ConfigError, ModelConfig
from fastmsd.data.cache import Cache
from fastmsd.eval import metrics, plots
from fastmsd.eval.embed import image_embeddings, text_embeddings
from fastmsd.eval.probe import cached_features, linear_probe
from fastmsd.eval.zeroshot import (
    CLASSES,
    DEFAULT_PROMPTS,
    Prompts,
    binary_scores,
    binary_task,
    class_probabilities_of,
    load_zeroshot_set,
)
from fastmsd.model import MSDModel

TASKS = ("zeroshot", "retrieval", "linear-probe")
PROBE_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _binary_zeroshot(model: MSDModel, tokenizer, cache: Cache, cfg: ModelConfig, device, out: Path,
                     task: str, prompts: Prompts) -> dict:
    """AUC on the test split; the threshold is the best-F1 one on the validation split only."""
    val_scores, val_positive = binary_scores(model, tokenizer, cache, cfg, device, task, "validate", prompts)
    threshold = metrics.best_f1_threshold(val_scores, val_positive)
    scores, positive = binary_scores(model, tokenizer, cache, cfg, device, task, "test", prompts)
    plots.roc_curves(np.stack([1 - scores, scores], 1), positive.astype(int), [f"no {task}", task],
                     out / "zeroshot_roc.png")
    return {"task": task, "n": len(scores), "threshold": threshold,
            **metrics.binary_metrics(scores, positive, threshold)}


@dataclass(frozen=True)
class _Set5x200:
    """The 5x200 items and their image embeddings, shared by zero-shot and retrieval."""

    indices: list[int]
    labels: np.ndarray
    image_emb: torch.Tensor


def _set_5x200(model: MSDModel, cache: Cache, cfg: ModelConfig, device) -> _Set5x200:
    indices, labels = load_zeroshot_set(cache)
    image_emb = image_embeddings(model.student, cache.image_paths(indices), cfg, device)
    return _Set5x200(indices, labels, image_emb)


def _zeroshot(model: MSDModel, tokenizer, cfg: ModelConfig, device, out: Path, five: _Set5x200,
              prompts: Prompts) -> dict:
    probs = class_probabilities_of(model, tokenizer, cfg, device, five.image_emb, prompts)
    labels = five.labels
    pred = probs.argmax(1)
    macro_auc, per_class_auc = metrics.macro_auc_ovr(probs, labels)
    cm = metrics.confusion_matrix(pred, labels, len(CLASSES))
    plots.roc_curves(probs, labels, list(CLASSES), out / "zeroshot_roc.png")
    plots.confusion_matrix_plot(cm, list(CLASSES), out / "zeroshot_confusion.png", title="zero-shot 5x200")
    return {
        "n": len(labels),
        "accuracy": metrics.accuracy(pred, labels),
        "macro_f1": metrics.macro_f1(pred, labels, len(CLASSES)),
        "macro_auc": macro_auc,
        "auc": dict(zip(CLASSES, per_class_auc, strict=True)),
        "recall": dict(zip(CLASSES, metrics.per_class_recall(pred, labels, len(CLASSES)), strict=True)),
        "confusion_matrix": cm.tolist(),
    }


def _retrieval(model: MSDModel, tokenizer, cache: Cache, cfg: ModelConfig, device, five: _Set5x200) -> dict:
    labels = five.labels
    txt = text_embeddings(model.student, tokenizer, cache.texts(five.indices), cfg, device)
    sim = (five.image_emb @ txt.T).numpy()
    results = {"5x200": {"image_to_text_precision": metrics.precision_at_k(sim, labels, labels),
                         "text_to_image_precision": metrics.precision_at_k(sim.T, labels, labels)}}
    test = cache.indices("test")
    img = image_embeddings(model.student, cache.image_paths(test), cfg, device)
    txt = text_embeddings(model.student, tokenizer, cache.texts(test), cfg, device)
    sim = (img @ txt.T).numpy()
    results["paired_test"] = {"n": len(test), "image_to_text_recall": metrics.recall_at_k(sim),
                              "text_to_image_recall": metrics.recall_at_k(sim.T)}
    return results


def probe_columns(cache: Cache) -> tuple[str, ...]:
    """The labels a probe (or a fine-tuned classifier) predicts: a binary cache's one label, else the
    five competition findings."""
    task = binary_task(cache)
    return (task,) if task is not None else PROBE_LABELS


def probe_targets(cache: Cache, indices: list[int],
                  columns: tuple[str, ...]) -> tuple[list[int], np.ndarray]:
    """Rows with every probe label known, and their {0, 1} targets [n, columns]."""
    kept, targets = [], []
    for i in indices:
        labels = cache.rows[i]["labels"]
        values = [labels.get(name) for name in columns]
        if all(v is not None for v in values):
            kept.append(i)
            targets.append(values)
    if not kept:
        raise ConfigError(f"cache {cache.root} has no items labelled with {', '.join(columns)}: "
                          "the linear probe needs them")
    return kept, np.asarray(targets, dtype=np.float32)


def _linear_probe(model: MSDModel, cache: Cache, cfg: ModelConfig, device, out: Path, seeds: tuple[int, ...],
                  checkpoint: str) -> dict:
    columns = probe_columns(cache)
    splits = {}
    for split in ("train", "test"):
        indices, targets = probe_targets(cache, cache.indices(split), columns)
        key = {"checkpoint": checkpoint, "cache": str(cache.root.resolve()), "split": split,
               "image_size": cfg.image_size, "n": len(indices)}
        def compute(indices: list[int] = indices) -> np.ndarray:
            return image_embeddings(model.student, cache.image_paths(indices), cfg, device).numpy()

        feats = cached_features(out / f"features-{split}.npz", compute, key)
        splits[split] = (torch.from_numpy(feats), torch.from_numpy(targets))
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    return linear_probe(train_x, train_y, test_x, test_y, multilabel=True, seeds=seeds)


def evaluate(model: MSDModel, tokenizer, cache: Cache, cfg: ModelConfig, device: torch.device,
             out: Path, tasks: tuple[str, ...] = TASKS, seeds: tuple[int, ...] = (0, 1, 2),
             checkpoint: str = "", prompts: Prompts = DEFAULT_PROMPTS) -> dict:
    """Run ``tasks`` and write results.json, results.md, the plots and the 5x200 list to ``out``."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ConfigError(f"unknown eval task {unknown[0]!r} (known: {', '.join(TASKS)}, all)")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": checkpoint, "cache": str(cache.root)}
    task = binary_task(cache, prompts)
    retrieval = "retrieval" in tasks and cache.has_reports
    if "retrieval" in tasks and not cache.has_reports and tasks != TASKS:
        # Asked for by name: say why not; under "all", it is left out.
        raise ConfigError(f"cache {cache.root} holds no reports: retrieval needs them")
    five = None
    if (task is None and "zeroshot" in tasks) or retrieval:
        five = _set_5x200(model, cache, cfg, device)
        _write_5x200(cache, five, out / "5x200.csv")
    if "zeroshot" in tasks:
        results["zeroshot"] = (
            _binary_zeroshot(model, tokenizer, cache, cfg, device, out, task, prompts) if task is not None
            else _zeroshot(model, tokenizer, cfg, device, out, five, prompts))
    if retrieval:
        results["retrieval"] = _retrieval(model, tokenizer, cache, cfg, device, five)
    if "linear-probe" in tasks:
        results["linear_probe"] = _linear_probe(model, cache, cfg, device, out, seeds, checkpoint)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(format_markdown(results) + "\n")
    return results


def _write_5x200(cache: Cache, five: _Set5x200, path: Path) -> None:
    """The evaluated items, so that others can reproduce the set."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        pairs = zip(five.indices, five.labels, strict=True)
        writer.writerows((cache.rows[i]["id"], CLASSES[c]) for i, c in pairs)


def format_markdown(results: dict) -> str:
    lines = []
    if "zeroshot" in results and "task" in results["zeroshot"]:
        z = results["zeroshot"]
        lines += [f"### Zero-shot, {z['task']} (threshold {z['threshold']:.3f}, best F1 on validation)", "",
                  "| AUC | accuracy | F1 | precision | recall |", "|---|---|---|---|---|",
                  f"| {z['auc']:.3f} | {z['accuracy']:.3f} | {z['f1']:.3f} | {z['precision']:.3f} "
                  f"| {z['recall']:.3f} |", ""]
    elif "zeroshot" in results:
        z = results["zeroshot"]
        lines += ["### Zero-shot, 5x200", "", "| class | AUC | recall |", "|---|---|---|"]
        lines += [f"| {c} | {z['auc'][c]:.3f} | {z['recall'][c]:.3f} |" for c in CLASSES]
        lines += [f"| **macro** | **{z['macro_auc']:.3f}** | |", "",
                  f"accuracy {z['accuracy']:.3f}, macro F1 {z['macro_f1']:.3f} on {z['n']} images", ""]
    if "retrieval" in results:
        r = results["retrieval"]
        lines += ["### Retrieval", "", "| set | direction | @1 | @5 | @10 |", "|---|---|---|---|---|"]
        for name, rows in (("5x200 (Precision)", r["5x200"]), ("paired test (Recall)", r["paired_test"])):
            for direction, values in rows.items():
                if isinstance(values, dict):
                    cells = " | ".join(f"{values[k]:.3f}" for k in sorted(values, key=int))
                    lines.append(f"| {name} | {direction.replace('_', ' ')} | {cells} |")
        lines.append("")
    if "linear_probe" in results:
        lines += ["### Linear probe (AUC, mean ± std over seeds)", "", "| labels | AUC |", "|---|---|"]
        lines += [f"| {frac} | {v['auc_mean']:.3f} ± {v['auc_std']:.3f} |"
                  for frac, v in results["linear_probe"].items()]
    return "\n".join(lines)
