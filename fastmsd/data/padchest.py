"""Reader for PadChest: the label CSV and the 16-bit PNGs.

Layout, as BIMCV ships PadChest (the 160K release of 01.02.19, one zip file per
ImageDir folder)::

    ROOT/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv   (or the same name + .gz)
    ROOT/<ImageDir>/<ImageID>                                   ImageDir 0 .. 54, one folder per zip

The CSV's columns used: ImageID, ImageDir, StudyID, PatientID, Projection, Report, Labels. The
images are 16-bit grayscale PNGs, windowed by :func:`fastmsd.data.images.read_image` like a DICOM
without a stored window.

Views: Projection PA, AP and AP_horizontal (supine) are frontal; L (stored as view "LATERAL")
and the rest (COSTAL, UNK, ...) are not and are dropped when ``frontal_only``. Other views keep
their Projection as the view.

Reports: the Report column (Spanish, preprocessed by BIMCV: stemmed, lower-case sentences split
by " . ", no section headers) is the item's report, with ``language="es"``. A row with an empty
Report is rejected: a cache holds a report for every item or for none.

Labels: Labels is a Python list literal of PadChest terms (~190, from the radiologists' or the
labelling network's reading of the report, MethodLabel Physician or RNN_model; both kept). Only
the terms below are kept, as binary CheXpert columns: 1.0 when the image lists one of the
column's terms, else 0.0. CheXpert columns whose PadChest terms do not map one-to-one (Enlarged
Cardiomediastinum, Lung Opacity, Lung Lesion, Pleural Other) and the other terms are left out:
a left-out column is unlabelled rather than wrongly negative.

    ================  ============================================================================
    column            PadChest terms (case-insensitive)
    ================  ============================================================================
    No Finding        normal
    Atelectasis       atelectasis, atelectasis basal, laminar / lobar / round / segmental / total
                      atelectasis
    Cardiomegaly      cardiomegaly
    Consolidation     consolidation
    Edema             pulmonary edema
    Pleural Effusion  pleural effusion, loculated pleural effusion, loculated fissural effusion,
                      hydropneumothorax
    Pneumonia         pneumonia, atypical pneumonia
    Pneumothorax      pneumothorax, hydropneumothorax
    Fracture          fracture, rib / callus rib / clavicle / humeral / vertebral fracture
    Support Devices   pacemaker, single / dual chamber device, electrical device, dai, catheter,
                      central venous catheter (also via subclavian / jugular / umbilical vein,
                      reservoir), endotracheal / tracheostomy / NSG / chest drain /
                      ventriculoperitoneal drain / gastrostomy / nephrostomy tube, artificial
                      (mitral / aortic) heart valve, double J stent, aortic endoprosthesis
    ================  ============================================================================

Rejects: a malformed row, Labels that are not a list of strings or list no term, the term
"exclude" (PadChest's mark for a report that does not describe the image), an empty Report, an
image not on disk.

Splits: PadChest ships none; :func:`hash_split` of (PatientID, seed) assigns 80 / 10 / 10 by
patient.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .items import RAGGED, Found, Item, Reject, hash_split, keep_if_present, open_csv, ragged, safe_id

_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
_REQUIRED = ("ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Report", "Labels")
FRONTAL = frozenset({"PA", "AP", "AP_horizontal"})
_EXCLUDE = "exclude"
# Stored column -> the PadChest terms (lower-case) that set it.
LABELS: dict[str, frozenset[str]] = {
    "No Finding": frozenset({"normal"}),
    "Atelectasis": frozenset({"atelectasis", "atelectasis basal", "laminar atelectasis", "lobar atelectasis",
                              "round atelectasis", "segmental atelectasis", "total atelectasis"}),
    "Cardiomegaly": frozenset({"cardiomegaly"}),
    "Consolidation": frozenset({"consolidation"}),
    "Edema": frozenset({"pulmonary edema"}),
    "Pleural Effusion": frozenset({"pleural effusion", "loculated pleural effusion",
                                   "loculated fissural effusion", "hydropneumothorax"}),
    "Pneumonia": frozenset({"pneumonia", "atypical pneumonia"}),
    "Pneumothorax": frozenset({"pneumothorax", "hydropneumothorax"}),
    "Fracture": frozenset({"fracture", "rib fracture", "callus rib fracture", "clavicle fracture",
                           "humeral fracture", "vertebral fracture"}),
    "Support Devices": frozenset({
        "pacemaker", "single chamber device", "dual chamber device", "electrical device", "dai", "catheter",
        "central venous catheter", "central venous catheter via subclavian vein",
        "central venous catheter via jugular vein", "central venous catheter via umbilical vein",
        "reservoir central venous catheter", "endotracheal tube", "tracheostomy tube", "nsg tube",
        "chest drain tube", "ventriculoperitoneal drain tube", "gastrostomy tube", "nephrostomy tube",
        "artificial heart valve", "artificial mitral heart valve", "artificial aortic heart valve",
        "double j stent", "aortic endoprosthesis"}),
}


def _csv_path(root: Path) -> Path:
    for path in (root / _CSV, root / f"{_CSV}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"padchest: missing {root / _CSV} (or {_CSV}.gz)")


def _terms(text: str) -> set[str] | str:
    """The lower-cased terms of a Labels value, or why it is malformed."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        return f"Labels is not a list of terms: {text.strip()[:80]!r}"
    terms = {t.strip().lower() for t in value} - {""}
    if not terms:
        return f"Labels lists no term: {text.strip()[:80]!r}"
    if _EXCLUDE in terms:
        return "Labels has 'exclude': the report does not describe the image"
    return terms


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    path = _csv_path(root)
    found: Found = []
    rejects: list[Reject] = []
    with open_csv(path, _REQUIRED) as reader:
        for row in reader:
            source = f"{path.name}:{reader.line_num}"
            if ragged(row):
                rejects.append(Reject(source, RAGGED))
                continue
            image_id, folder, patient = (row[c].strip() for c in ("ImageID", "ImageDir", "PatientID"))
            # A file name and a folder number, so that no row can point outside the root.
            if not (image_id and Path(image_id).name == image_id and folder.isdigit() and patient):
                rejects.append(Reject(source, f"malformed row: ImageID {image_id!r}, ImageDir {folder!r}, "
                                              f"PatientID {patient!r}"))
                continue
            projection = row["Projection"].strip()
            if frontal_only and projection not in FRONTAL:
                continue
            terms = _terms(row["Labels"])
            if isinstance(terms, str):
                rejects.append(Reject(source, terms))
                continue
            report = row["Report"].strip()
            if not report:
                rejects.append(Reject(source, "empty Report"))
                continue
            keep_if_present(source, Item(
                id=safe_id(Path(image_id).stem), dataset="padchest", image=root / folder / image_id,
                split=hash_split(patient, seed), view="LATERAL" if projection == "L" else projection or None,
                patient=patient, study=row["StudyID"].strip() or None,
                labels={column: 1.0 if terms & names else 0.0 for column, names in LABELS.items()},
                report=report, language="es"), found, rejects)
    return found, rejects
