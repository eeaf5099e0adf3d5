"""The study plan: patients and their studies, splits, identifiers, and which findings (with
which attributes) each study shows.

The plan comes from one generator seeded by ``seed``; images and reports are drawn later
from their own generators, so the plan never depends on how they are rendered.
"""

from __future__ import annotations

import numpy as np

from .labels import FINDINGS, ZEROSHOT_CLASSES
from .sampling import pick

# Sampling priors for train / validate / extra test studies (relative weights).
_PRIOR = {
    "atelectasis": 0.20, "cardiomegaly": 0.20, "consolidation": 0.14, "edema": 0.15,
    "pleural_effusion": 0.21, "pneumothorax": 0.10,
}
_P_NORMAL = 0.30
_P_UNCERTAIN = 0.04
_P_DEVICES = 0.18
_P_AIR_BRONCHOGRAMS = 0.3
# How many findings an abnormal study shows (1, 2 or 3).
_N_FINDINGS_WEIGHTS = (0.55, 0.3, 0.15)
_SEVERITY3 = ("mild", "moderate", "severe")
_SIZE3 = ("small", "moderate", "large")
# Each finding's attributes: (values, probabilities), drawn in this order.
_ATTRIBUTES: dict[str, dict[str, tuple[tuple[str, ...], tuple[float, ...]]]] = {
    "atelectasis": {"side": (("left", "right", "bilateral"), (0.35, 0.3, 0.35)),
                    "severity": (("mild", "moderate"), (0.5, 0.5))},
    "cardiomegaly": {"severity": (_SEVERITY3, (0.45, 0.35, 0.2))},
    "consolidation": {"side": (("left", "right"), (0.45, 0.55)),
                      "zone": (("upper", "mid", "lower"), (0.25, 0.3, 0.45)),
                      "severity": (_SEVERITY3, (0.3, 0.4, 0.3))},
    "edema": {"severity": (_SEVERITY3, (0.4, 0.4, 0.2))},
    "pleural_effusion": {"side": (("left", "right", "bilateral"), (0.33, 0.37, 0.3)),
                         "severity": (_SIZE3, (0.4, 0.4, 0.2))},
    "pneumothorax": {"side": (("left", "right"), (0.5, 0.5)),
                     "severity": (_SIZE3, (0.45, 0.35, 0.2))},
}


def sample_attributes(name: str, rng: np.random.Generator, *, allow_uncertain: bool) -> dict:
    """Side, severity (and zone, air bronchograms for consolidation) of one finding."""
    attrs: dict = {key: pick(rng, values, weights)
                   for key, (values, weights) in _ATTRIBUTES[name].items()}
    if name == "consolidation":
        attrs["air_bronchograms"] = bool(rng.random() < _P_AIR_BRONCHOGRAMS)
    if allow_uncertain and rng.random() < _P_UNCERTAIN:
        attrs["uncertain"] = True
    return attrs


def sample_findings(rng: np.random.Generator, only: str | None = None) -> dict[str, dict]:
    """The findings of one study: ``only`` that one (never hedged), or drawn from the priors;
    sometimes with support devices."""
    if only is not None:
        names = [only]
    elif rng.random() < _P_NORMAL:
        names = []
    else:
        k = pick(rng, (1, 2, 3), _N_FINDINGS_WEIGHTS)
        w = np.array([_PRIOR[f] for f in FINDINGS])
        names = [FINDINGS[i] for i in rng.choice(len(FINDINGS), k, replace=False, p=w / w.sum())]
    findings = {n: sample_attributes(n, rng, allow_uncertain=only is None) for n in names}
    if rng.random() < _P_DEVICES:
        kinds = [k for k in ("line", "tube", "ecg") if rng.random() < 0.5] or ["line"]
        findings["support_devices"] = {"kinds": kinds}
    return findings


def _dicom_id(rng: np.random.Generator) -> str:
    """Five dash-separated groups of eight hex digits, like MIMIC's."""
    # Each group is a different slice of its own 20-byte draw. One draw would do, but these
    # five are part of every seeded set's identifiers and of the draws that follow them.
    return "-".join(rng.bytes(20).hex()[start:start + 8] for start in range(0, 40, 8))


def _study_time(rng: np.random.Generator) -> str:
    """HHMMSS.fff"""
    return (f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}"
            f"{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 1000)):03d}")


def plan_studies(seed: int, n_train: int, n_per_class: int, n_dicom: int) -> list[dict]:
    """Every study of the set, in writing order.

    Each is a dict: ``index``, ``split``, ``label`` (the zero-shot class, or ""),
    ``subject_id``, ``study_id``, ``dicom_id``, ``view``, ``date``, ``time``, ``findings``
    and ``dicom`` (the photometric interpretation when in the DICOM subset, else "").
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    n_extra = max(1, round(0.05 * n_train))
    # (split, single-finding class or "", number of studies) for each patient.
    patients: list[tuple[str, str, int]] = []
    for split, n_studies in (("train", n_train), ("validate", n_extra)):
        left = n_studies
        while left > 0:
            k = min(left, int(rng.integers(1, 4)))
            patients.append((split, "", k))
            left -= k
    patients += [("test", cls, 1) for cls in ZEROSHOT_CLASSES for _ in range(n_per_class)]
    patients += [("test", "", 1) for _ in range(n_extra)]

    n_studies = sum(p[2] for p in patients)
    subjects = 10_000_000 + rng.choice(9_999_999, len(patients), replace=False)
    studies = 50_000_000 + rng.choice(9_999_999, n_studies, replace=False)
    items: list[dict] = []
    for (split, cls, k), subject in zip(patients, subjects, strict=True):
        day = int(rng.integers(0, 365 * 80))
        for _ in range(k):
            day += int(rng.integers(1, 400))
            date = np.datetime64("2110-01-01") + np.timedelta64(day, "D")
            view = "PA" if rng.random() < 0.6 else "AP"
            items.append({
                "index": len(items), "split": split, "label": cls,
                "subject_id": str(subject), "study_id": str(studies[len(items)]),
                "dicom_id": _dicom_id(rng),
                "view": view, "date": str(date).replace("-", ""),
                "time": _study_time(rng),
                "findings": sample_findings(rng, cls or None),
                "dicom": "",
            })
    test = [it for it in items if it["split"] == "test"]
    # Alternate the photometric kinds so that even a tiny subset has both.
    for k, i in enumerate(rng.choice(len(test), min(n_dicom, len(test)), replace=False)):
        test[int(i)]["dicom"] = "MONOCHROME1" if k % 2 else "MONOCHROME2"
    return items
