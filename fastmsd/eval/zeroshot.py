"""Zero-shot 5-class classification on the synthcxr 5x200 test set (image-prompt similarity)."""

from __future__ import annotations

import csv
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

# Several phrasings per class, averaged in embedding space. As in GLoRIA's CheXpert 5x200
# prompts, they are positive statements with severity and location, written the way report
# impressions are: a bare class name reads like the negation lists of normal reports
# ("no pleural effusion or focal consolidation") as much as like a finding.
PROMPTS: dict[str, list[str]] = {
    "atelectasis": ["Bibasilar atelectasis.", "Right basilar atelectasis.", "Left basilar atelectasis.",
                    "Plate-like atelectasis at the bases.", "Bibasilar collapse.",
                    "There is bibasilar subsegmental atelectasis."],
    "cardiomegaly": ["Cardiomegaly.", "Moderate cardiomegaly.", "The heart is moderately enlarged.",
                     "Enlarged cardiac silhouette.", "There is severe cardiomegaly."],
    "consolidation": ["Right lower lobe consolidation.", "Left lower lobe consolidation.",
                      "Consolidation in the right upper lobe.",
                      "There is dense consolidation in the left lower lobe.",
                      "Airspace consolidation in the right lower lobe, concerning for pneumonia."],
    "edema": ["Moderate pulmonary edema.", "Pulmonary vascular congestion.",
              "There is moderate pulmonary edema.", "Findings consistent with moderate fluid overload.",
              "Perihilar haziness consistent with interstitial edema."],
    "pleural_effusion": ["Moderate right pleural effusion.", "Moderate left pleural effusion.",
                         "There are moderate bilateral pleural effusions.",
                         "There is a moderate right pleural effusion.", "Small left pleural effusion."],
}
CLASSES = tuple(PROMPTS)


def load_zeroshot_set(cache: Cache) -> tuple[list[int], np.ndarray]:
    """Cache row indices and class indices of the 5x200 list that a synthcxr cache carries."""
    listing = cache.root / ZEROSHOT_LIST
    if not listing.is_file():
        raise ConfigError(f"{cache.root} has no zero-shot test list {ZEROSHOT_LIST} (a synthcxr cache has)")
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


def load_prompts(path: str | Path) -> dict[str, list[str]]:
    """A prompt file: YAML mapping each of the five classes to a list of prompts."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"prompt file {path} must map class names to lists of prompts")
    unknown = sorted(set(data) - set(CLASSES))
    if unknown:
        raise ConfigError(f"prompt file {path} names unknown class {unknown[0]!r} "
                          f"(known: {', '.join(CLASSES)})")
    missing = [c for c in CLASSES if not data.get(c)]
    if missing:
        raise ConfigError(f"prompt file {path} has no prompts for {', '.join(missing)}")
    bad = [c for c in CLASSES if not all(isinstance(p, str) and p.strip() for p in data[c])]
    if bad:
        raise ConfigError(f"prompt file {path}: the prompts of {bad[0]!r} must be non-empty strings")
    return {c: list(data[c]) for c in CLASSES}


def class_embeddings(tower: Tower, tokenizer, cfg: ModelConfig, device: torch.device,
                     prompts: dict[str, list[str]] = PROMPTS) -> torch.Tensor:
    """[C, D]: the normalised mean of each class's normalised prompt embeddings."""
    means = [text_embeddings(tower, tokenizer, prompts[name], cfg, device).mean(0) for name in CLASSES]
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


def evaluate_synthcxr(model: MSDModel, tokenizer, cache: Cache, cfg: ModelConfig,
                      device: torch.device) -> dict:
    """Zero-shot results of the student tower on the 5x200 list of a synthcxr cache."""
    indices, labels = load_zeroshot_set(cache)
    image_emb = image_embeddings(model.student, cache.image_paths(indices), cfg, device)
    class_emb = class_embeddings(model.student, tokenizer, cfg, device)
    return zeroshot_metrics(class_probabilities(image_emb, class_emb, model.tau.item()), labels)


def format_results(results: dict) -> str:
    lines = ["| class | AUC |", "|---|---|"]
    lines += [f"| {name} | {auc:.3f} |" for name, auc in results["auc"].items()]
    lines.append(f"| **macro** | **{results['macro_auc']:.3f}** |")
    lines.append(f"\nzero-shot 5-class accuracy {results['accuracy']:.3f} on {results['n']} images")
    return "\n".join(lines)
