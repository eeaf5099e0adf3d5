"""Reader for NIH ChestX-ray14: Data_Entry_2017.csv, train_val_list.txt / test_list.txt, images/.

Layout, as the NIH Clinical Center ships it (the 2017 release on its Box folder, also copied to
Kaggle as "NIH Chest X-rays")::

    ROOT/Data_Entry_2017.csv        Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
                                    Patient Gender, View Position, OriginalImage[Width, Height],
                                    OriginalImagePixelSpacing[x, y] (the header, and in some copies the
                                    rows, end in a comma: a trailing nameless column, ignored)
    ROOT/train_val_list.txt         one image name per line
    ROOT/test_list.txt
    ROOT/images/00000001_000.png    images_001.tar.gz .. images_012.tar.gz unpacked (NIH), or
    ROOT/images_001/images/...      .. images_012/images/... (the Kaggle copy); both are searched

Every image is frontal (View Position PA or AP). There are no reports. Labels are binary: the
14 findings and "No Finding" of "Finding Labels" ("|"-separated), each image 1.0 for the
findings it lists and 0.0 for the others. Findings with a CheXpert column are stored under the
CheXpert name, the others under NIH's:

* Effusion -> "Pleural Effusion";
* Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia, Pneumothorax, No Finding: the
  same name (CheXpert's);
* Infiltration, Mass, Nodule, Emphysema, Fibrosis, Pleural_Thickening, Hernia: NIH's name (no
  CheXpert column).

Splits: test is test_list.txt. train_val_list.txt is split by patient (NIH's lists keep a
patient in one of them): a patient whose :func:`hash_split` of (Patient ID, seed) is "validate"
goes to validation, about 10 % of the train_val patients, the rest to train; all images of a
patient share the split. Rejects: a malformed row, an unknown finding (or "No Finding" listed
with findings), an image in neither list (or in both), an image not on disk.
"""

from __future__ import annotations

from pathlib import Path

from .items import (
    RAGGED,
    Found,
    Item,
    Reject,
    hash_split,
    keep_if_present,
    open_csv,
    ragged,
    require,
    safe_id,
)

_CSV = "Data_Entry_2017.csv"
_TRAIN_VAL, _TEST = "train_val_list.txt", "test_list.txt"
_NO_FINDING = "No Finding"
# NIH finding -> stored label column.
LABELS: dict[str, str] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Edema": "Edema", "Effusion": "Pleural Effusion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", _NO_FINDING: _NO_FINDING,
    "Infiltration": "Infiltration", "Mass": "Mass", "Nodule": "Nodule", "Emphysema": "Emphysema",
    "Fibrosis": "Fibrosis", "Pleural_Thickening": "Pleural_Thickening", "Hernia": "Hernia",
}


def _listed(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _image_paths(root: Path) -> dict[str, Path]:
    folders = [f for f in (root / "images", *sorted(root.glob("images_*/images"))) if f.is_dir()]
    if not folders:
        raise FileNotFoundError(f"chestxray14: missing {root / 'images'} (or the Kaggle copy's "
                                f"{root / 'images_001/images'} ..)")
    return {p.name: p for folder in folders for p in folder.iterdir()}


def _labels(text: str) -> dict[str, float] | str:
    """The label columns of a "Finding Labels" value, or why it is malformed."""
    findings = {f.strip() for f in text.split("|")}
    unknown = sorted(f for f in findings if f not in LABELS)
    if unknown:
        return f"unknown finding(s) {', '.join(map(repr, unknown))} in Finding Labels {text!r}"
    if _NO_FINDING in findings and len(findings) > 1:
        return f"'{_NO_FINDING}' listed with findings in Finding Labels {text!r}"
    return {column: 1.0 if name in findings else 0.0 for name, column in LABELS.items()}


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    train_val = _listed(require(root / _TRAIN_VAL, "chestxray14"))
    test = _listed(require(root / _TEST, "chestxray14"))
    csv_path = require(root / _CSV, "chestxray14")
    paths = _image_paths(root)
    found: Found = []
    rejects: list[Reject] = []
    with open_csv(csv_path, ("Image Index", "Finding Labels", "Patient ID", "View Position")) as reader:
        for row in reader:
            source = f"{_CSV}:{reader.line_num}"
            # The header's trailing comma names an empty column that rows may or may not fill.
            if ragged({k: v for k, v in row.items() if k != ""}):
                rejects.append(Reject(source, RAGGED))
                continue
            name, patient = row["Image Index"].strip(), row["Patient ID"].strip()
            if not name or not patient:
                rejects.append(Reject(source, f"malformed row: Image Index {name!r}, Patient ID {patient!r}"))
                continue
            labels = _labels(row["Finding Labels"])
            if isinstance(labels, str):
                rejects.append(Reject(source, labels))
                continue
            if (name in test) == (name in train_val):
                where = "both" if name in test else "neither"
                rejects.append(Reject(source, f"{name} is in {where} of {_TRAIN_VAL} and {_TEST}"))
                continue
            split = "test" if name in test else \
                "validate" if hash_split(patient, seed) == "validate" else "train"
            keep_if_present(source, Item(
                id=safe_id(Path(name).stem), dataset="chestxray14",
                image=paths.get(name, root / "images" / name), split=split,
                view=row["View Position"].strip().upper() or None, patient=patient, study=None,
                labels=labels, report=None), found, rejects)
    return found, rejects
