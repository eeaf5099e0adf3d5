"""Reader for CheXpert Plus: the CheXpert images with their reports and CheXbert labels.

Layout, as Stanford AIMI ships it (CheXpert Plus, metadata table ``df_chexpert_plus_240401``)::

    ROOT/df_chexpert_plus_240401.csv          one row per image: path_to_image
                                              ("train/patient00001/study1/view1_frontal.jpg"),
                                              path_to_dcm, frontal_lateral, ap_pa, deid_patient_id,
                                              patient_report_date_order, report, section_narrative,
                                              ... section_findings, section_impression, ..., age, sex,
                                              race, ..., split ("train" or "valid")
    ROOT/PNG/train/patient00001/study1/view1_frontal.png   the release's PNGs (PNG_train, PNG_valid),
                                              named as path_to_image but ending in .png
      or ROOT/train/patient00001/study1/view1_frontal.jpg  the original CheXpert JPEGs (put the CSV
                                              in the CheXpert-v1.0 folder); the PNG is taken when
                                              both exist
    ROOT/chexbert_labels/impression_fixed.json  optional (chexbert_labels.zip unpacked): CheXbert's
    ROOT/chexbert_labels/findings_fixed.json    14 CheXpert labels (1, 0, -1 or null) of each image's
                                              impression and findings section, one JSON object per
                                              line, keyed by path_to_image

The DICOMs (path_to_dcm, some 2.7 TB) are not read; the PNGs converted from them are.

Reports: "FINDINGS: <section_findings>" and "IMPRESSION: <section_impression>", each on one line
(whitespace normalised; the one present when only one is), which ``prepare`` splits back into the
two sections; a row with neither section is rejected. The other sections (history, comparison,
technique ...) stay out, as they do for MIMIC-CXR.

Labels: the CheXbert labels of the impression, or of the findings for a report without an
impression, as MIMIC-CXR-JPG's CheXpert labels were extracted, through the label policy of
:mod:`fastmsd.data.datasets`. Without a ``chexbert_labels`` folder every item is unlabelled (all
14 columns None): the reports still train the contrastive model, and the linear probe takes
its labels from another cache. An image missing from the label file is unlabelled as well.

Splits: the CSV's split column, "train" -> train, "valid" -> validate (CheXpert Plus has no test
split). Ids, patients and studies follow the chexpert reader ("patient00001_study1_view1_frontal",
patient from the path), so the same image has the same id in both caches. ``frontal_only``
keeps frontal_lateral "Frontal"; the view is ap_pa for a frontal image, "LATERAL" otherwise.
Rejects: a malformed row or path, an unknown split, a report without findings or impression, a
label the policy refuses, a malformed line of a label file, an image not on disk.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .items import RAGGED, Found, Item, Reject, open_csv, ragged, require, safe_id, sectioned_report
from .synthcxr import CHEXPERT_COLUMNS

CSV = "df_chexpert_plus_240401.csv"
LABEL_FILES = {"impression": "impression_fixed.json", "findings": "findings_fixed.json"}
_SPLITS = {"train": "train", "valid": "validate"}
_Values = tuple[object, ...]  # one label file line's values, in CHEXPERT_COLUMNS order


def _read_label_file(path: Path, rejects: list[Reject]) -> dict[str, _Values]:
    labels: dict[str, _Values] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("path_to_image"), str):
                source = f"{path.parent.name}/{path.name}:{n}"
                rejects.append(Reject(source, f"malformed line: expected a JSON object with path_to_image, "
                                              f"got {line.strip()[:60]!r}"))
                continue
            labels[entry["path_to_image"].strip()] = tuple(entry.get(c) for c in CHEXPERT_COLUMNS)
    return labels


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    # datasets imports this module, so its label policy is imported when a read needs it.
    from .datasets import apply_label_policy

    csv_path = require(root / CSV, "chexpert-plus")
    rejects: list[Reject] = []
    chexbert: dict[str, dict[str, _Values]] = {}   # section -> path_to_image -> label values
    if (root / "chexbert_labels").is_dir():
        chexbert = {section: _read_label_file(require(root / "chexbert_labels" / name, "chexpert-plus"),
                                              rejects) for section, name in LABEL_FILES.items()}
    unlabelled: _Values = (None,) * len(CHEXPERT_COLUMNS)
    found: Found = []
    required = ("path_to_image", "frontal_lateral", "ap_pa", "section_findings", "section_impression",
                "split")
    with open_csv(csv_path, required) as reader:
        end = reader.line_num
        for row in reader:
            # Reports span several lines: a row's source is the line it starts on.
            source, end = f"{CSV}:{end + 1}", reader.line_num
            if ragged(row):
                rejects.append(Reject(source, RAGGED))
                continue
            frontal = row["frontal_lateral"].strip().lower() == "frontal"
            if frontal_only and not frontal:
                continue
            text = row["path_to_image"].strip()
            rel = PurePosixPath(text)
            if rel.is_absolute() or len(rel.parts) < 3 or ".." in rel.parts:
                rejects.append(Reject(source, f"unexpected path_to_image {text!r}, expected "
                                              "<split>/<patient>/<study>/<view>.jpg"))
                continue
            split = _SPLITS.get(row["split"].strip().lower())
            if split is None:
                rejects.append(Reject(source, f"unknown split {row['split']!r}, expected train or valid"))
                continue
            findings, impression = row["section_findings"].strip(), row["section_impression"].strip()
            if not (findings or impression):
                rejects.append(Reject(source, "no findings or impression section"))
                continue
            labelled = chexbert.get("impression" if impression else "findings", {})
            values = labelled.get(text, unlabelled)
            try:
                labels = apply_label_policy(dict(zip(CHEXPERT_COLUMNS, values, strict=True)))
            except ValueError as e:
                rejects.append(Reject(source, str(e)))
                continue
            png, jpg = root / "PNG" / rel.with_suffix(".png"), root / rel
            image = png if png.is_file() else jpg if jpg.is_file() else None
            if image is None:
                rejects.append(Reject(source, f"image file not found: {png} (nor {jpg})"))
                continue
            patient, study = rel.parts[-3], rel.parts[-2]
            found.append((source, Item(
                id=safe_id(f"{patient}_{study}_{rel.stem}"), dataset="chexpert-plus", image=image,
                split=split, view=(row["ap_pa"].strip().upper() or None) if frontal else "LATERAL",
                patient=patient, study=f"{patient}_{study}", labels=labels,
                report=sectioned_report(findings, impression))))
    return found, rejects
