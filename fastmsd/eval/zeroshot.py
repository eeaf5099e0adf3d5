"""Zero-shot 5-class classification on the synthcxr 5x200 test set (image-prompt similarity)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from fastmsd.config import ConfigError, ModelConfig
from fastmsd.data.cache import ZEROSHOT_LIST, Cache
from fastmsd.data.loader import load_images, to_model_input
from fastmsd.data.text import tokenize
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


def load_zeroshot_set(cache: Cache) -> tuple[list[Path], np.ndarray]:
    """Image paths and class indices of the 5x200 list that a prepared synthcxr cache carries."""
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
    paths = cache.image_paths([index[r["dicom_id"]] for r in rows])
    return paths, np.array([CLASSES.index(r["label"]) for r in rows])


@torch.no_grad()
def class_embeddings(tower: Tower, tokenizer, max_len: int, device: torch.device) -> torch.Tensor:
    """[C, D]: the normalised mean of each class's normalised prompt embeddings."""
    out = []
    for name in CLASSES:
        ids, mask = tokenize(tokenizer, PROMPTS[name], max_len)
        emb = tower.encode_text(ids.long().to(device), mask.to(device))
        out.append(torch.nn.functional.normalize(emb.float().mean(0), dim=0))
    return torch.stack(out)


@torch.no_grad()
def zeroshot(tower: Tower, tokenizer, images: torch.Tensor, labels: np.ndarray, cfg: ModelConfig,
             tau: float, device: torch.device, batch_size: int = 256) -> dict:
    """Accuracy and one-vs-rest macro AUC of prompt-similarity classification."""
    was_training = tower.training
    tower.eval()
    try:
        classes = class_embeddings(tower, tokenizer, cfg.max_len, device)
        scores = []
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start : start + batch_size], cfg.in_chans).to(device)
            scores.append((tower.encode_image(x).float() @ classes.T).cpu())
    finally:
        tower.train(was_training)
    # One-vs-rest AUC needs scores comparable across images: class probabilities (a softmax
    # over the prompts at the model's temperature, as scikit-learn's multi-class AUC requires),
    # not raw similarities, whose per-image offset would rank images rather than classes.
    probs = (torch.cat(scores) / tau).softmax(dim=1).numpy()
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
    paths, labels = load_zeroshot_set(cache)
    return zeroshot(model.student, tokenizer, load_images(paths, cfg.image_size, "eval images"), labels,
                    cfg, model.tau.item(), device)


def format_results(results: dict) -> str:
    lines = ["| class | AUC |", "|---|---|"]
    lines += [f"| {name} | {auc:.3f} |" for name, auc in results["auc"].items()]
    lines.append(f"| **macro** | **{results['macro_auc']:.3f}** |")
    lines.append(f"\nzero-shot 5-class accuracy {results['accuracy']:.3f} on {results['n']} images")
    return "\n".join(lines)
