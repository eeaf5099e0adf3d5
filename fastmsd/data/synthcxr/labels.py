"""The findings synthcxr draws and the CheXpert label columns its reports assert."""

from __future__ import annotations

FINDINGS: tuple[str, ...] = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion", "pneumothorax",
)
ZEROSHOT_CLASSES: tuple[str, ...] = (
    "atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion",
)
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
FINDING_COLUMN: dict[str, str] = {
    "atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation", "edema": "Edema",
    "pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
}

# The findings whose ground-truth masks synthcxr writes: those with a region a segmentation
# model can be scored on (cardiomegaly is a size, edema diffuse, atelectasis thin bands).
MASKED_FINDINGS: tuple[str, ...] = ("pleural_effusion", "pneumothorax")


def own_label(name: str, attrs: dict) -> dict[str, float]:
    """The label a mention of finding ``name`` asserts: positive, or uncertain when hedged."""
    return {FINDING_COLUMN[name]: -1.0 if attrs.get("uncertain") else 1.0}
