"""Zero-shot classification by image-prompt similarity: the 5x200 set, binary tasks, prompts."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from fastmsd.config import ConfigError, ModelConfig
from fastmsd.data.cache import ZEROSHOT_LIST, Cache
from fastmsd.eval.embed import image_embeddings, text_embeddings
from fastmsd.eval.metrics import macro_auc_ovr
from fastmsd.model import MSDModel, Tower

CLASSES = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion")
DEFAULT_PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")


@dataclass(frozen=True)
class Prompts:
    """Prompt sets: per class of the 5x200 task, and positive / negative per binary task."""

    classes: dict[str, list[str]]
    binary: dict[str, dict[str, list[str]]]


# The five classes' CheXpert-style label columns (MIMIC-CXR, CheXpert and synthcxr caches).
LABEL_COLUMNS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
                 "consolidation": "Consolidation", "edema": "Edema", "pleural_effusion": "Pleural Effusion"}
PER_CLASS = 200


def build_5x200(cache: Cache, seed: int = 0, per_class: int = PER_CLASS) -> tuple[list[int], np.ndarray]:
    """The 5x200 rule for caches that ship no list: in the first of the test, validate and train
    splits that holds ``per_class`` images of every class, the images positive for exactly one
    of the five classes (labels after the cache's policy) and negative for the other four,
    ordered by sha256(f"{seed}:{id}"), the first ``per_class`` of each class. (GLoRIA drew
    CheXpert 5x200 from the training split, which has the only large labelled set.)"""
    for split in ("test", "validate", "train"):
        chosen: dict[int, list[tuple[str, int]]] = {c: [] for c in range(len(CLASSES))}
        for i, row in enumerate(cache.rows):
            if row["split"] != split:
                continue
            values = [row["labels"].get(LABEL_COLUMNS[c]) for c in CLASSES]
            if sorted(values) == [0.0, 0.0, 0.0, 0.0, 1.0]:
                key = hashlib.sha256(f"{seed}:{row['id']}".encode()).hexdigest()
                chosen[values.index(1.0)].append((key, i))
        if all(len(v) >= per_class for v in chosen.values()):
            pairs = [(i, c) for c in range(len(CLASSES)) for _, i in sorted(chosen[c])[:per_class]]
            return [i for i, _ in pairs], np.array([c for _, c in pairs])
    raise ConfigError(f"cache {cache.root} has no split with {per_class} single-finding images of each of "
                      f"{', '.join(LABEL_COLUMNS.values())}: it cannot make a 5x{per_class} set")


def load_zeroshot_set(cache: Cache, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """Cache row indices and class indices of the 5x200 set: the list a synthcxr cache carries,
    else one built by ``build_5x200``."""
    listing = cache.root / ZEROSHOT_LIST
    if not listing.is_file():
        return build_5x200(cache, seed)
    index = {row["id"]: i for i, row in enumerate(cache.rows)}
    with listing.open(newline="") as f:
        rows = list(csv.DictReader(f))
    unknown = sorted({r["label"] for r in rows} - set(CLASSES))
    if unknown:
        raise ConfigError(f"{listing} names unknown classes: {', '.join(unknown)}")
    missing = [r["dicom_id"] for r in rows if r["dicom_id"] not in index]
    if missing:
        raise ConfigError(f"{len(missing)} zero-shot images are not in the cache (e.g. {missing[0]}); "
                          "see its rejects.csv")
    return [index[r["dicom_id"]] for r in rows], np.array([CLASSES.index(r["label"]) for r in rows])


def _prompt_list(path: Path, where: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
        raise ConfigError(f"prompt file {path}: {where} needs a non-empty list of non-empty strings")
    return list(value)


def load_prompts(path: str | Path = DEFAULT_PROMPTS_FILE) -> Prompts:
    """A prompt file (see prompts.yaml): ``classes`` maps exactly the five 5x200 classes to
    prompts; ``binary`` maps a binary task's label to its positive and negative prompts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    classes, binary = data.get("classes") or {}, data.get("binary") or {}
    if not isinstance(classes, dict) or not isinstance(binary, dict) or set(data) - {"classes", "binary"}:
        raise ConfigError(f"prompt file {path} must hold a `classes` and a `binary` mapping only")
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        raise ConfigError(f"prompt file {path} names unknown class {unknown[0]!r} "
                          f"(known: {', '.join(CLASSES)})")
    missing = [c for c in CLASSES if c not in classes]
    if missing:
        raise ConfigError(f"prompt file {path} has no prompts for {', '.join(missing)}")
    for task, sides in binary.items():
        if not isinstance(sides, dict) or set(sides) != {"positive", "negative"}:
            raise ConfigError(f"prompt file {path}: binary task {task!r} needs `positive` and `negative`")
    return Prompts({c: _prompt_list(path, c, classes[c]) for c in CLASSES},
                   {task: {side: _prompt_list(path, f"{task}/{side}", sides[side]) for side in sides}
                    for task, sides in binary.items()})


DEFAULT_PROMPTS = load_prompts()


def prompt_embeddings(tower: Tower, tokenizer, cfg: ModelConfig, device: torch.device,
                      prompt_sets: list[list[str]]) -> torch.Tensor:
    """[C, D]: the normalised mean of each set's normalised prompt embeddings."""
    means = [text_embeddings(tower, tokenizer, prompts, cfg, device).mean(0) for prompts in prompt_sets]
    return F.normalize(torch.stack(means), dim=1)


def class_probabilities(image_emb: torch.Tensor, class_emb: torch.Tensor, tau: float) -> np.ndarray:
    """[n, C] class probabilities: a softmax over the prompts at the model's temperature.

    One-vs-rest AUC needs scores comparable across images, as scikit-learn's multi-class AUC
    requires probabilities; raw similarities carry a per-image offset that ranks images rather
    than classes."""
    return (image_emb @ class_emb.T / tau).softmax(dim=1).numpy()


def zeroshot_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    macro, per_class = macro_auc_ovr(probs, labels)
    return {
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "macro_auc": macro,
        "auc": dict(zip(CLASSES, per_class, strict=True)),
        "n": len(labels),
    }


def class_probabilities_of(model: MSDModel, tokenizer, cfg: ModelConfig, device: torch.device,
                           image_emb: torch.Tensor, prompts: Prompts = DEFAULT_PROMPTS) -> np.ndarray:
    """[n, 5] class probabilities of the student for image embeddings, from the class prompts."""
    class_emb = prompt_embeddings(model.student, tokenizer, cfg, device,
                                  [prompts.classes[c] for c in CLASSES])
    return class_probabilities(image_emb, class_emb, model.tau.item())


def evaluate_synthcxr(model: MSDModel, tokenizer, cache: Cache, cfg: ModelConfig,
                      device: torch.device) -> dict:
    """Zero-shot results of the student tower on the 5x200 list of a synthcxr cache."""
    indices, labels = load_zeroshot_set(cache)
    image_emb = image_embeddings(model.student, cache.image_paths(indices), cfg, device)
    return zeroshot_metrics(class_probabilities_of(model, tokenizer, cfg, device, image_emb), labels)


def format_results(results: dict) -> str:
    lines = ["| class | AUC |", "|---|---|"]
    lines += [f"| {name} | {auc:.3f} |" for name, auc in results["auc"].items()]
    lines.append(f"| **macro** | **{results['macro_auc']:.3f}** |")
    lines.append(f"\nzero-shot 5-class accuracy {results['accuracy']:.3f} on {results['n']} images")
    return "\n".join(lines)


def binary_task(cache: Cache, prompts: Prompts = DEFAULT_PROMPTS) -> str | None:
    """The binary task of a cache whose items carry one label that has binary prompts
    (RSNA Pneumonia, SIIM-ACR Pneumothorax, COVIDx), else None."""
    keys = {key for row in cache.rows for key in row["labels"]}
    return next(iter(keys)) if len(keys) == 1 and keys <= prompts.binary.keys() else None


def binary_scores(model: MSDModel, tokenizer, cache: Cache, cfg: ModelConfig, device: torch.device,
                  task: str, split: str, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
    """P(positive prompts) per image of ``split`` with a known label, and the labels."""
    indices = [i for i in cache.indices(split) if cache.rows[i]["labels"].get(task) is not None]
    if not indices:
        raise ConfigError(f"cache {cache.root} has no {task} labels in split {split!r}")
    sides = prompts.binary[task]
    text = prompt_embeddings(model.student, tokenizer, cfg, device, [sides["positive"], sides["negative"]])
    image = image_embeddings(model.student, cache.image_paths(indices), cfg, device)
    probs = class_probabilities(image, text, model.tau.item())
    return probs[:, 0], np.array([cache.rows[i]["labels"][task] == 1.0 for i in indices])
