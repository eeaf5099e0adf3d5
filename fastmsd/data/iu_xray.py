"""Reader for IU X-ray / OpenI (NLMCXR): report XML files plus PNG images.

Layout: the Open-i release of the Indiana University chest X-ray collection, as its two
archives unpack under ROOT::

    ROOT/ecgen-radiology/<n>.xml     NLMCXR_reports.tgz: one XML report per study (3,955 files)
    ROOT/NLMCXR_png/<image id>.png   NLMCXR_png.tgz, e.g. CXR1_1_IM-0001-3001.png

NLMCXR_png.tgz holds its PNGs without a folder, so they are looked for in ``NLMCXR_png/``, else
``images/``, else ROOT itself. A report's ``<AbstractText Label="FINDINGS">`` and ``Label="IMPRESSION"``
give its text, its ``<MeSH><major>`` terms its labels, and each ``<parentImage id="ID">`` one image,
``ID.png``. The ``<automatic>`` MeSH terms (machine-extracted) are not read.

Items: one per image of a report, its report "FINDINGS: ...\\nIMPRESSION: ..." (the sections
present, whitespace-normalised; the "XXXX" of de-identification written "___" as MIMIC-CXR
writes it). A report with no FINDINGS and no IMPRESSION text rejects each of its images; a
report with no ``parentImage`` is rejected as a whole. IU gives no patient ids: patient and study
are the report's number (the file name's stem). Sources are "ecgen-radiology/<n>.xml:<line>" of
the ``parentImage`` element (or of an XML syntax error); a report with no image is named by its
file alone.

Views: the XML names no view per image (a report's caption says "PA and Lateral" for all of its
images), so ``frontal_only`` cannot be applied: every image is kept, lateral ones included (about
half), with ``view`` None.

Splits: none ship; :func:`hash_split` of the report number and the seed, so all images of a report
share a split.

Labels: binary, from the major MeSH terms. A term is a heading followed by "/"-separated
qualifiers ("Pleural Effusion/right/small"); headings and qualifiers compare case-insensitively.
Each CheXpert column is 1.0 when some term maps to it, else 0.0; a report whose only term is
"No Indexing" (or that has none) is unlabelled (every column None). Other terms (degenerative
spine, granuloma, emphysema, hyperinflation ...) map to no column.

=========================  ===========================  ==============================================
MeSH heading               qualifier required (any of)  CheXpert column
=========================  ===========================  ==============================================
normal                                                  No Finding
Cardiomegaly                                            Cardiomegaly
Cardiac Shadow             enlarged                     Cardiomegaly
Mediastinum                enlarged, prominent          Enlarged Cardiomediastinum
Opacity, Density           lung, retrocardiac,          Lung Opacity
                           pulmonary alveoli
Airspace Disease,                                       Lung Opacity
Infiltrate
Nodule, Mass, Cavitation   lung                         Lung Lesion
Pulmonary Edema,                                        Edema
Pulmonary Congestion,
Heart Failure
Consolidation                                           Consolidation
Pneumonia                                               Pneumonia
Pulmonary Atelectasis                                   Atelectasis
Pneumothorax                                            Pneumothorax
Hydropneumothorax,                                      Pneumothorax, Pleural Effusion
Hemopneumothorax
Pleural Effusion,                                       Pleural Effusion
Hemothorax
Thickening, Cicatrix       pleura                       Pleural Other
Fractures, Bone                                         Fracture
Catheters, Indwelling;                                  Support Devices
Tube, Inserted; Medical
Device; Implanted Medical
Device; Stents
=========================  ===========================  ==============================================

Edema follows the CheXpert labeler, which reads "pulmonary congestion" and "heart failure" as
edema. "Surgical Instruments" (IU's term for surgical clips), "Sutures" and "Foreign Bodies" are
not support devices; "Costophrenic Angle/blunted" is left unmapped, as the labeler leaves
blunting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from .items import Found, Item, Reject, hash_split, keep_if_present, require, safe_id, sectioned_report
from .synthcxr import CHEXPERT_COLUMNS

DATASET = "iu-xray"
REPORTS = "ecgen-radiology"
IMAGE_FOLDERS = ("NLMCXR_png", "images")
_LUNG = frozenset({"lung", "retrocardiac", "pulmonary alveoli"})
_ANY: frozenset[str] = frozenset()
_DEVICES = ("Support Devices",)

# MeSH heading (lower case) -> (the CheXpert columns it sets, qualifiers one of which it needs; empty = any)
MESH_TO_CHEXPERT: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "normal": (("No Finding",), _ANY),
    "cardiomegaly": (("Cardiomegaly",), _ANY),
    "cardiac shadow": (("Cardiomegaly",), frozenset({"enlarged"})),
    "mediastinum": (("Enlarged Cardiomediastinum",), frozenset({"enlarged", "prominent"})),
    "opacity": (("Lung Opacity",), _LUNG),
    "density": (("Lung Opacity",), _LUNG),
    "airspace disease": (("Lung Opacity",), _ANY),
    "infiltrate": (("Lung Opacity",), _ANY),
    "nodule": (("Lung Lesion",), frozenset({"lung"})),
    "mass": (("Lung Lesion",), frozenset({"lung"})),
    "cavitation": (("Lung Lesion",), frozenset({"lung"})),
    "pulmonary edema": (("Edema",), _ANY),
    "pulmonary congestion": (("Edema",), _ANY),
    "heart failure": (("Edema",), _ANY),
    "consolidation": (("Consolidation",), _ANY),
    "pneumonia": (("Pneumonia",), _ANY),
    "pulmonary atelectasis": (("Atelectasis",), _ANY),
    "pneumothorax": (("Pneumothorax",), _ANY),
    "hydropneumothorax": (("Pneumothorax", "Pleural Effusion"), _ANY),
    "hemopneumothorax": (("Pneumothorax", "Pleural Effusion"), _ANY),
    "pleural effusion": (("Pleural Effusion",), _ANY),
    "hemothorax": (("Pleural Effusion",), _ANY),
    "thickening": (("Pleural Other",), frozenset({"pleura"})),
    "cicatrix": (("Pleural Other",), frozenset({"pleura"})),
    "fractures, bone": (("Fracture",), _ANY),
    "catheters, indwelling": (_DEVICES, _ANY),
    "tube, inserted": (_DEVICES, _ANY),
    "medical device": (_DEVICES, _ANY),
    "implanted medical device": (_DEVICES, _ANY),
    "stents": (_DEVICES, _ANY),
}
_UNINDEXED = "no indexing"
_DEIDENTIFIED = re.compile(r"X{4,}")


@dataclass
class Report:
    """What the reader takes from one report XML file."""

    sections: dict[str, str] = field(default_factory=dict)    # AbstractText Label -> its text
    mesh: list[str] = field(default_factory=list)              # the major MeSH terms
    images: list[tuple[str, int]] = field(default_factory=list)  # (parentImage id, its line)


def parse_report(data: bytes) -> Report:
    """The sections, major MeSH terms and images of one report; raises expat.ExpatError."""
    report = Report()
    path: list[str] = []
    text: list[str] = []
    label: str | None = None
    parser = expat.ParserCreate()

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal label
        path.append(name)
        if name == "AbstractText":
            label = attrs.get("Label")
            text.clear()
        elif path[-2:] == ["MeSH", "major"]:
            text.clear()
        elif name == "parentImage" and len(path) == 2:
            report.images.append((attrs.get("id", ""), parser.CurrentLineNumber))

    def end(name: str) -> None:
        if name == "AbstractText" and label:
            report.sections[label.upper()] = " ".join("".join(text).split())
        elif path[-2:] == ["MeSH", "major"]:
            report.mesh.append("".join(text))
        path.pop()

    def chars(data: str) -> None:
        if path[-1] == "AbstractText" or path[-2:] == ["MeSH", "major"]:
            text.append(data)

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = chars
    parser.Parse(data, True)
    return report


def mesh_labels(terms: list[str]) -> dict[str, float | None]:
    """CheXpert columns from major MeSH terms by :data:`MESH_TO_CHEXPERT`: 1.0 where a term maps,
    else 0.0; all None for a report not indexed."""
    parts = [[" ".join(p.split()).lower() for p in term.split("/")] for term in terms]
    parts = [p for p in parts if p[0]]
    if all(p[0] == _UNINDEXED for p in parts):
        return {c: None for c in CHEXPERT_COLUMNS}
    positive: set[str] = set()
    for heading, *qualifiers in parts:
        columns, needed = MESH_TO_CHEXPERT.get(heading, ((), _ANY))
        if not needed or needed.intersection(qualifiers):
            positive.update(columns)
    return {c: 1.0 if c in positive else 0.0 for c in CHEXPERT_COLUMNS}


def report_text(sections: dict[str, str]) -> str:
    """The report's FINDINGS and IMPRESSION as ``prepare`` reads them ('' when neither has text)."""
    findings, impression = (_DEIDENTIFIED.sub("___", sections.get(name, ""))
                            for name in ("FINDINGS", "IMPRESSION"))
    return sectioned_report(findings, impression)


def _image_folder(root: Path) -> Path:
    for name in IMAGE_FOLDERS:
        if (root / name).is_dir():
            return root / name
    if any(root.glob("*.png")):  # NLMCXR_png.tgz unpacked straight into ROOT
        return root
    raise FileNotFoundError(f"{DATASET}: missing {root / IMAGE_FOLDERS[0]} (the PNGs of NLMCXR_png.tgz; "
                            f"also looked for {root / IMAGE_FOLDERS[1]} and PNGs in {root})")


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    folder = require(root / REPORTS, DATASET)
    images = _image_folder(root)
    found: Found = []
    rejects: list[Reject] = []
    # (length, name): the numbered reports in number order.
    for path in sorted(folder.glob("*.xml"), key=lambda p: (len(p.stem), p.stem)):
        name = f"{REPORTS}/{path.name}"
        try:
            report = parse_report(path.read_bytes())
        except expat.ExpatError as err:
            rejects.append(Reject(f"{name}:{err.lineno}", f"malformed XML: {expat.ErrorString(err.code)}"))
            continue
        if not report.images:
            rejects.append(Reject(name, "report names no image (no parentImage element)"))
            continue
        text = report_text(report.sections)
        labels = mesh_labels(report.mesh)
        for image_id, line in report.images:
            source = f"{name}:{line}"
            if not text:
                rejects.append(Reject(source, "report has no FINDINGS or IMPRESSION text"))
            elif not image_id or safe_id(image_id) != image_id:
                rejects.append(Reject(source, f"unexpected parentImage id {image_id!r}"))
            else:
                keep_if_present(source, Item(
                    id=image_id, dataset=DATASET, image=images / f"{image_id}.png",
                    split=hash_split(path.stem, seed), view=None, patient=path.stem, study=path.stem,
                    labels=dict(labels), report=text), found, rejects)
    return found, rejects
