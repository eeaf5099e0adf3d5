"""Reader for the MIMIC-CXR-JPG 2.0.0 layout (the real dataset or a synthcxr set)."""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Record", "extract_sections", "read_mimic_cxr", "report_text"]

_FRONTAL = {"PA", "AP"}
_HEADERS = (
    "FINDINGS AND IMPRESSION", "FINDINGS", "IMPRESSIONS", "IMPRESSION", "CONCLUSIONS",
    "CONCLUSION", "INDICATION", "HISTORY", "CLINICAL HISTORY", "COMPARISONS", "COMPARISON",
    "TECHNIQUE", "EXAMINATION", "EXAM", "REASON FOR EXAMINATION", "REASON FOR EXAM",
    "NOTIFICATION", "RECOMMENDATIONS", "RECOMMENDATION(S)", "RECOMMENDATION", "WET READ",
    "FINAL REPORT",
)
_ALT = "|".join(re.escape(h) for h in _HEADERS)
# Headers open a line in any case; mid-line they count only when written in capitals, so
# "no acute findings:" inside a sentence is not taken for a section start.
_AT_LINE_START = re.compile(rf"^[ \t]*({_ALT})[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MID_LINE = re.compile(rf"(?<=\s)({_ALT}):")
_FINAL_REPORT = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)
_KIND = {"FINDINGS AND IMPRESSION": "findings", "FINDINGS": "findings",
         "IMPRESSIONS": "impression", "IMPRESSION": "impression",
         "CONCLUSIONS": "impression", "CONCLUSION": "impression"}


@dataclass(frozen=True)
class Record:
    """One image with its study's report and CheXpert labels."""

    dicom_id: str
    subject_id: str
    study_id: str
    split: str                  # "train" | "validate" | "test"
    view: str
    image_path: Path
    report_path: Path
    labels: dict[str, float | None] = field(hash=False)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def extract_sections(text: str) -> dict[str, str]:
    """The report's FINDINGS and IMPRESSION text, whitespace-normalised ('' when missing).

    "FINDINGS AND IMPRESSION" counts as findings, "CONCLUSION" as impression; when a section
    appears twice its parts are joined.
    """
    text = _FINAL_REPORT.sub("", text)
    starts = {m.start(): m for m in _AT_LINE_START.finditer(text)}
    for m in _MID_LINE.finditer(text):
        if not any(s <= m.start() < o.end() for s, o in starts.items()):
            starts.setdefault(m.start(), m)
    ordered = [starts[k] for k in sorted(starts)]
    out = {"findings": [], "impression": []}
    for i, m in enumerate(ordered):
        kind = _KIND.get(m.group(1).upper())
        if kind is None:
            continue
        end = ordered[i + 1].start() if i + 1 < len(ordered) else len(text)
        out[kind].append(text[m.end():end])
    return {k: _normalise(" ".join(v)) for k, v in out.items()}


def report_text(text: str) -> str:
    """Findings and impression joined; the whole normalised report when both are missing."""
    sec = extract_sections(text)
    joined = f"{sec['findings']} {sec['impression']}".strip()
    return joined or _normalise(text)


def _find_csv(root: Path, stem: str) -> Path:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"MIMIC-CXR: missing {root / (stem + '.csv')} (or .csv.gz)")


def _rows(path: Path) -> Iterator[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        yield from csv.DictReader(f)


def _label(value: str) -> float | None:
    return float(value) if value.strip() else None


def read_mimic_cxr(root: str | Path, *, frontal_only: bool = True) -> list[Record]:
    """All images under ``root`` with split, view, report path and CheXpert labels.

    Joins the split, metadata and CheXpert CSVs (``.csv`` or ``.csv.gz``); studies absent
    from the CheXpert file get all-None labels. Sorted by subject, study and dicom id.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MIMIC-CXR: root folder {root} does not exist")
    if not (root / "files").is_dir():
        raise FileNotFoundError(f"MIMIC-CXR: missing image folder {root / 'files'}")
    split_csv = _find_csv(root, "mimic-cxr-2.0.0-split")
    meta_csv = _find_csv(root, "mimic-cxr-2.0.0-metadata")
    chexpert_csv = _find_csv(root, "mimic-cxr-2.0.0-chexpert")

    views = {r["dicom_id"]: r.get("ViewPosition", "") for r in _rows(meta_csv)}
    chexpert: dict[str, dict[str, float | None]] = {}
    columns: list[str] = []
    for r in _rows(chexpert_csv):
        columns = [c for c in r if c not in ("subject_id", "study_id")]
        chexpert[r["study_id"]] = {c: _label(r[c]) for c in columns}

    records = []
    for r in _rows(split_csv):
        view = views.get(r["dicom_id"], "")
        if frontal_only and view not in _FRONTAL:
            continue
        subject, study = r["subject_id"], r["study_id"]
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        labels = chexpert.get(study) or {c: None for c in columns}
        records.append(Record(
            dicom_id=r["dicom_id"], subject_id=subject, study_id=study, split=r["split"],
            view=view, image_path=folder / f"s{study}" / f"{r['dicom_id']}.jpg",
            report_path=folder / f"s{study}.txt", labels=dict(labels)))
    records.sort(key=lambda rec: (rec.subject_id, rec.study_id, rec.dicom_id))
    return records
