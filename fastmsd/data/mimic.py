"""Reader for the MIMIC-CXR-JPG 2.0.0 layout (the real dataset or a synthcxr set) and the sectioning
of its reports."""

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
)
_ALT = "|".join(re.escape(h) for h in _HEADERS)
# Headers open a line in any case; mid-line they count only when written in capitals, so
# "no acute findings:" inside a sentence is not taken for a section start.
_AT_LINE_START = re.compile(rf"^[ \t]*({_ALT})[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MID_LINE = re.compile(rf"(?<=\s)({_ALT}):")
# MIMIC-CXR's own parser takes any capitalised name after a newline and one space, then a colon
# and a space, for a header ("CHEST, PA AND LATERAL:", "PROVISIONAL FINDINGS IMPRESSION (PFI):").
_CAPS_AT_LINE_START = re.compile(r"^ ?([A-Z][A-Z ()/,-]*[A-Z)])[ \t]*:(?=\s|$)", re.MULTILINE)
# The line between a wet read and the final report ends the wet read.
_FINAL_REPORT = re.compile(r"^[ \t]*(FINAL REPORT)[ \t]*$", re.MULTILINE)
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")
# Header names -> the sections kept, after MIMIC-CXR's normalize_section_names: its exact names,
# typos included, then a name holding "impression", "findings", "history", "comparison" or
# "addendum", then one that describes the study ("PA AND LATERAL CHEST:") counts as findings.
# Unlike MIMIC-CXR, a combined findings and impression section counts as findings, and a
# provisional read (superseded by the final report, like a wet read) counts as neither.
_EXACT: dict[str, str | None] = {
    **dict.fromkeys(("findings", "finding", "findins", "findindgs", "findgings", "findngs", "findnings",
                     "finidngs", "reference findings", "chest, two views", "findings and impression",
                     "findings/impression", "findings/ impression"), "findings"),
    **dict.fromkeys(("impression", "impressions", "conclusion", "conclusions", "impresson", "imprression",
                     "imoression", "impressoin", "imprssion", "impresion", "imperssion", "mpression",
                     "impession"), "impression"),
    **dict.fromkeys(("comparison", "comparisons", "reference exam", "comparison exam", "comparison film",
                     "comparision", "comparsion", "comparrison", "comparisions"), "comparison"),
    **dict.fromkeys(("wet read", "wetread", "pfi", "provisional findings impression (pfi)"), None),
}
_CONTAINS = (("impression", "impression"), ("findings", "findings"), ("history", None),
             ("comparison", "comparison"), ("addendum", None))
_DESCRIBES_STUDY = re.compile(
    "chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two views|"
    "frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|frontal semi-upright|"
    "ribs|pa and lat")


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


def _kind(name: str) -> str | None:
    """"findings", "impression", "comparison" or None (a section no text is taken from)."""
    name = " ".join(name.lower().split())
    if name in _EXACT:
        return _EXACT[name]
    for part, kind in _CONTAINS:
        if part in name:
            return kind
    return "findings" if _DESCRIBES_STUDY.search(name) else None


def _headers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of every section header, in text order."""
    starts = {m.start(): m for m in _FINAL_REPORT.finditer(text)}
    for pattern in (_AT_LINE_START, _CAPS_AT_LINE_START):
        for m in pattern.finditer(text):
            starts.setdefault(m.start(), m)
    for m in _MID_LINE.finditer(text):
        if not any(s <= m.start() < o.end() for s, o in starts.items()):
            starts.setdefault(m.start(), m)
    return [(s, starts[s].end(), starts[s].group(1)) for s in sorted(starts)]


def extract_sections(text: str) -> dict[str, str]:
    """The report's FINDINGS and IMPRESSION text, whitespace-normalised ('' when missing, never
    both for a report with any text).

    Headers are found and named as MIMIC-CXR's section parser (txt/section_parser.py of the MIT-LCP
    mimic-cxr repository) finds and names them: a capitalised name and a colon opening a line, or
    one of the usual headers in any case (mid-line: in capitals); "CONCLUSION" and typos of
    IMPRESSION count as impression, a header describing the study ("PA AND LATERAL CHEST:") as
    findings. Unlike there, "FINDINGS AND IMPRESSION" counts as findings (MIMIC-CXR: impression) and
    a section that appears twice has its parts joined (MIMIC-CXR: the last kept). Wet reads and
    provisional reads are left out; a "FINAL REPORT" line ends them.

    A report with neither section gets MIMIC-CXR's fallback (its create_section_files.py), kept as
    findings: the last section left once empty FINDINGS and IMPRESSION are dropped (the whole
    report when it has no header) loses its first paragraph, paragraphs being split by blank lines,
    and the rest is kept; when nothing follows a blank line there, the last COMPARISON section,
    where such reports are mostly written. When neither gives text (one paragraph of free text, a
    wet read alone), the whole report is kept, where MIMIC-CXR keeps nothing.
    """
    headers = _headers(text)
    out: dict[str, list[str]] = {"findings": [], "impression": [], "comparison": []}
    last = text[:headers[0][0]] if headers else text
    for i, (_, end, name) in enumerate(headers):
        kind = _kind(name)
        body = text[end:headers[i + 1][0] if i + 1 < len(headers) else len(text)]
        if kind in ("findings", "impression") and not body.strip():
            continue  # MIMIC-CXR drops empty findings and impression, e.g. under a study title
        last = body
        if kind is not None:
            out[kind].append(body)
    sections = {k: _normalise(" ".join(out[k])) for k in ("findings", "impression")}
    if not any(sections.values()):
        rest = _BLANK_LINE.split(last, maxsplit=1)[1:]
        if rest and rest[0].strip():
            sections["findings"] = _normalise(rest[0])
        elif comparisons := [c for c in out["comparison"] if c.strip()]:
            sections["findings"] = _normalise(comparisons[-1])
        else:
            sections["findings"] = _normalise(text)
    return sections


def report_text(text: str) -> str:
    """Findings and impression joined (the fallback of :func:`extract_sections` when both are missing)."""
    sec = extract_sections(text)
    return f"{sec['findings']} {sec['impression']}".strip()


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
