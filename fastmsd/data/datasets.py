"""Readers of public chest X-ray datasets as they ship, producing one item list for ``prepare``.

Each reader checks its layout (a missing CSV or folder raises FileNotFoundError naming it),
turns every label row into either an :class:`Item` or a :class:`Reject` (an image that is not
on disk, a malformed line, an unknown label value), and never opens an image: decoding is
``prepare``'s job. Items come sorted by (patient, study, id); rejects in file order. A reject's
source is "<file>:<line>" (header = line 1), except for MIMIC-CXR / synthcxr, whose reader
gives no line numbers: there it is the image path relative to the root.

Label policy
------------
One policy, applied here, for the datasets labelled by the CheXpert labeler or CheXbert (``chexpert``,
``mimic-cxr``, ``synthcxr``, ``chexpert-plus``); :func:`apply_label_policy` implements it:

* positive 1.0 stays 1.0, negative 0.0 stays 0.0;
* blank (the report does not mention the finding) becomes 0.0 for every column, "No Finding"
  included: an unmentioned finding is read as absent, as the CheXpert and GLoRIA / MGCA
  evaluations do;
* uncertain -1.0 becomes ``UNCERTAIN_POLICY[column]``: 1.0 ("U-Ones") for Atelectasis, Edema
  and Pleural Effusion, 0.0 ("U-Zeros") for every other column. Irvin et al. 2019 (CheXpert,
  table 2) compare the two binary mappings on the radiologist-labelled validation set: U-Ones
  scores higher for Atelectasis, Edema and (narrowly) Pleural Effusion, U-Zeros for
  Cardiomegaly and Consolidation; we take the better of the two per finding. The other columns
  were not evaluated there; for them U-Zeros keeps hedged mentions ("cannot exclude ...") from
  becoming positives;
* a row with no value at all (a MIMIC-CXR study missing from the CheXpert CSV) stays all None:
  unlabelled, not negative.

The single-finding datasets carry their own binary labels: ``rsna-pneumonia``
``{"Pneumonia": 0/1}``, ``covidx`` ``{"COVID-19": 0/1}``, ``siim-pneumothorax``
``{"Pneumothorax": 0/1}``. ``iu-xray``, ``chestxray14``, ``vindr-cxr`` and ``padchest`` map their
own findings to binary labels, under the CheXpert column's name where one matches (each reader's
module documents its table).

Masks
-----
``siim-pneumothorax``, ``rsna-pneumonia``, ``vindr-cxr`` and ``synthcxr`` (a set with a ``masks/``
folder) give every item a mask source per masked label column (:mod:`fastmsd.data.masks`): the
union of the image's run-length masks, of its boxes, or synthcxr's PNG. Nothing is decoded here;
``prepare`` renders and checks them.

Splits
------
CheXpert, MIMIC-CXR / synthcxr and COVIDx ship their splits. RSNA Pneumonia and SIIM
Pneumothorax ship labels for their training set only, so it is split here 80 / 10 / 10 into
train / validate / test by :func:`hash_split`: the first 8 bytes of
``sha256(f"{seed}:{key}")`` as a fraction of 2**64, below 0.8 -> train, below 0.9 -> validate,
else test. The key is the RSNA patientId or the SIIM ImageId (SIIM names no patient outside
the DICOM header; its images are nearly all one per patient). The assignment depends only on
the key and the seed, never on which other images are present. IU X-ray (by report) and PadChest
(by patient) are split the same way; ChestX-ray14 and VinDr-CXR ship a test split and take
validation from their training images by the same hash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import chestxray14, chexpert_plus, iu_xray, padchest, vindr_cxr
from .items import (
    RAGGED,
    Found,
    Item,
    Reader,
    Reject,
    hash_split,
    keep_if_present,
    open_csv,
    ragged,
    require,
    safe_id,
)
from .masks import BoxMask, FileMask, RleMask, mask_folder
from .mimic import read_mimic_cxr
from .synthcxr import CHEXPERT_COLUMNS
from .synthcxr.labels import FINDING_COLUMN, MASKED_FINDINGS

__all__ = [
    "DATASETS",
    "UNCERTAIN_POLICY",
    "Item",
    "Reject",
    "apply_label_policy",
    "hash_split",
    "read_dataset",
]

DATASETS: tuple[str, ...] = (
    "mimic-cxr", "chexpert", "rsna-pneumonia", "covidx", "siim-pneumothorax", "synthcxr",
    "iu-xray", "chestxray14", "vindr-cxr", "padchest", "chexpert-plus",
)

_U_ONES = frozenset({"Atelectasis", "Edema", "Pleural Effusion"})
UNCERTAIN_POLICY: dict[str, float] = {c: 1.0 if c in _U_ONES else 0.0 for c in CHEXPERT_COLUMNS}

# COVIDx CXR-3/-4 label positive/negative; older releases name the class instead.
_COVIDX_LABELS = {"positive": 1.0, "covid-19": 1.0, "negative": 0.0, "normal": 0.0,
                  "pneumonia": 0.0}


def apply_label_policy(raw: dict[str, float | None]) -> dict[str, float | None]:
    """CheXpert-labeler values (1, 0, -1 or None) mapped by the module's label policy.

    Raises ValueError for a value other than 1, 0, -1 or None, or a column the policy does
    not cover.
    """
    if all(v is None for v in raw.values()):
        return dict(raw)
    out: dict[str, float | None] = {}
    for name, value in raw.items():
        if name not in UNCERTAIN_POLICY:
            raise ValueError(f"no label policy for column {name!r}")
        if value is None:
            out[name] = 0.0
        elif value == -1.0:
            out[name] = UNCERTAIN_POLICY[name]
        elif value in (0.0, 1.0):
            out[name] = float(value)
        else:
            raise ValueError(f"label {name!r} has value {value!r}, expected 1, 0, -1 or blank")
    return out


# --------------------------------------------------------------------------- MIMIC-CXR layout

@dataclass(frozen=True)
class _Unreadable:
    reason: str


def _read_report(path: Path) -> str | _Unreadable:
    # A report that is not UTF-8 is rejected, never guessed at: mojibake would train the text
    # encoder on garbage without anyone noticing.
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return _Unreadable(f"report file not found: {path}")
    except UnicodeDecodeError as err:
        return _Unreadable(f"report is not UTF-8 text ({err.reason} at byte {err.start}): {path}")


def _mimic_reader(dataset: str) -> Reader:
    def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
        found: Found = []
        rejects: list[Reject] = []
        reports: dict[Path, str | _Unreadable] = {}
        # Sets generated before synthcxr drew masks have no masks/ folder: their items get none.
        masked = [FINDING_COLUMN[f] for f in MASKED_FINDINGS] \
            if dataset == "synthcxr" and (root / "masks").is_dir() else []
        for rec in read_mimic_cxr(root, frontal_only=frontal_only):
            # read_mimic_cxr gives no CSV line numbers; the image path names the row as well.
            source = rec.image_path.relative_to(root).as_posix()
            try:
                labels = apply_label_policy(rec.labels)
            except ValueError as e:
                rejects.append(Reject(source, str(e)))
                continue
            if rec.report_path not in reports:
                reports[rec.report_path] = _read_report(rec.report_path)
            report = reports[rec.report_path]
            if isinstance(report, _Unreadable):
                rejects.append(Reject(source, report.reason))
                continue
            keep_if_present(source, Item(
                id=safe_id(rec.dicom_id), dataset=dataset, image=rec.image_path, split=rec.split,
                view=rec.view or None, patient=rec.subject_id, study=rec.study_id, labels=labels,
                report=report,
                masks={column: FileMask(root / "masks" / mask_folder(column) / f"{rec.dicom_id}.png")
                       for column in masked}), found, rejects)
        return found, rejects
    return read


# --------------------------------------------------------------------------- CheXpert

def _chexpert_relpath(root: Path, text: str) -> PurePosixPath:
    rel = PurePosixPath(text.strip())
    # Paths start with the release folder ("CheXpert-v1.0-small/train/..."), which is the root
    # itself unless it was renamed; drop it either way so both spellings resolve under root.
    if rel.parts and (rel.parts[0] == root.name or rel.parts[0].startswith("CheXpert-v1.0")):
        rel = PurePosixPath(*rel.parts[1:])
    return rel


def _chexpert_values(row: dict[str, str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for column in CHEXPERT_COLUMNS:
        text = row[column].strip()
        try:
            out[column] = float(text) if text else None
        except ValueError:
            raise ValueError(f"label {column!r} has value {text!r}, expected 1, 0, -1 or blank") from None
    return out


def _read_chexpert(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    found: Found = []
    rejects: list[Reject] = []
    required = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS)
    for name, split, needed in (("train.csv", "train", True), ("valid.csv", "validate", True),
                                ("test.csv", "test", False)):
        path = root / name
        if not needed and not path.is_file():
            continue
        with open_csv(require(path, "chexpert"), required) as reader:
            for row in reader:
                source = f"{name}:{reader.line_num}"
                if ragged(row):
                    rejects.append(Reject(source, RAGGED))
                    continue
                frontal = row["Frontal/Lateral"].strip().lower() == "frontal"
                if frontal_only and not frontal:
                    continue
                rel = _chexpert_relpath(root, row["Path"])
                if rel.is_absolute() or len(rel.parts) < 3:
                    rejects.append(Reject(source, f"unexpected Path {row['Path']!r}, expected "
                                                  "<split>/<patient>/<study>/<view>.jpg"))
                    continue
                try:
                    labels = apply_label_policy(_chexpert_values(row))
                except ValueError as e:
                    rejects.append(Reject(source, str(e)))
                    continue
                patient, study = rel.parts[-3], rel.parts[-2]
                view = (row["AP/PA"].strip().upper() or None) if frontal else "LATERAL"
                keep_if_present(source, Item(
                    id=safe_id(f"{patient}_{study}_{rel.stem}"), dataset="chexpert",
                    image=root.joinpath(*rel.parts), split=split, view=view, patient=patient,
                    study=f"{patient}_{study}", labels=labels, report=None), found, rejects)
    return found, rejects


# --------------------------------------------------------------------------- RSNA Pneumonia

_Positives = dict[str, tuple[str, bool, list[dict[str, str]]]]


def _positives_by_id(path: Path, id_column: str, value_column: str,
                     positive: Callable[[str], bool | None]) -> tuple[_Positives, list[Reject]]:
    """Rows of a label CSV with several rows per image (one per box or mask), folded into
    id -> (first row's source, any row positive, the positive rows). A row whose value
    ``positive`` cannot read (None) is rejected."""
    found: _Positives = {}
    rejects: list[Reject] = []
    with open_csv(path, (id_column, value_column)) as reader:
        for row in reader:
            source = f"{path.name}:{reader.line_num}"
            if ragged(row):
                rejects.append(Reject(source, RAGGED))
                continue
            key, value = row[id_column].strip(), row[value_column].strip()
            is_positive = positive(value) if key else None
            if is_positive is None:
                rejects.append(Reject(source, f"malformed row: {id_column} {key!r}, "
                                              f"{value_column} {value[:40]!r}"))
                continue
            first, any_positive, rows = found.get(key, (source, False, []))
            found[key] = (first, any_positive or is_positive, rows + [row] if is_positive else rows)
    return found, rejects


def _rle_positive(rle: str) -> bool | None:
    """SIIM's EncodedPixels: -1 for no pneumothorax, else (start, length) pairs of a mask."""
    if rle == "-1":
        return False
    runs = rle.split()
    return True if runs and len(runs) % 2 == 0 and all(r.isdigit() for r in runs) else None


def _read_rsna(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    images = require(root / "stage_2_train_images", "rsna-pneumonia")
    # One row per box, so a patient may repeat.
    patients, rejects = _positives_by_id(require(root / "stage_2_train_labels.csv", "rsna-pneumonia"),
                                         "patientId", "Target", {"0": False, "1": True}.get)
    found: Found = []
    for pid, (source, positive, rows) in patients.items():
        try:
            boxes = tuple(tuple(float(row[c]) for c in ("x", "y", "width", "height")) for row in rows)
        except (KeyError, TypeError, ValueError):
            rejects.append(Reject(source, "malformed box: a Target 1 row needs numbers in x, y, "
                                          "width and height"))
            continue
        keep_if_present(source, Item(
            id=safe_id(pid), dataset="rsna-pneumonia", image=images / f"{pid}.dcm",
            split=hash_split(pid, seed), view=None, patient=pid, study=None,
            labels={"Pneumonia": 1.0 if positive else 0.0}, report=None,
            masks={"Pneumonia": BoxMask(boxes)}), found, rejects)
    return found, rejects


# --------------------------------------------------------------------------- COVIDx

def _read_covidx(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    found: Found = []
    rejects: list[Reject] = []
    for stem, split, needed in (("train", "train", True), ("val", "validate", False),
                                ("test", "test", True)):
        name = f"{stem}.txt"
        if not needed and not (root / name).is_file():
            continue
        listing = require(root / name, "covidx")
        folder = require(root / stem, "covidx")
        with open(listing) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source = f"{name}:{n}"
                fields = line.split()
                if len(fields) != 4:
                    reason = (f"malformed line ({len(fields)} fields, expected patient_id filename "
                              f"label source): {line.strip()[:80]!r}")
                    rejects.append(Reject(source, reason))
                    continue
                patient, filename, label, _origin = fields
                value = _COVIDX_LABELS.get(label.lower())
                if value is None:
                    rejects.append(Reject(source, f"unknown label {label!r}"))
                    continue
                keep_if_present(source, Item(
                    id=safe_id(Path(filename).stem), dataset="covidx", image=folder / filename,
                    split=split, view=None, patient=patient, study=None,
                    labels={"COVID-19": value}, report=None), found, rejects)
    return found, rejects


# --------------------------------------------------------------------------- SIIM-ACR Pneumothorax

def _read_siim(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    folder = require(root / "dicom-images-train", "siim-pneumothorax")
    # An image with several masks has several rows.
    images, rejects = _positives_by_id(require(root / "train-rle.csv", "siim-pneumothorax"),
                                       "ImageId", "EncodedPixels", _rle_positive)
    on_disk = {p.stem: p for p in folder.rglob("*.dcm")}
    found: Found = []
    for image_id, (source, positive, rows) in images.items():
        path = on_disk.get(image_id)
        if path is None:
            rejects.append(Reject(source, f"image file not found: {folder}/**/{image_id}.dcm"))
            continue
        # The Kaggle release nests <StudyUID>/<SeriesUID>/<ImageId>.dcm.
        nested = len(path.relative_to(folder).parts) >= 3
        found.append((source, Item(
            id=safe_id(image_id), dataset="siim-pneumothorax", image=path,
            split=hash_split(image_id, seed), view=None, patient=image_id,
            study=path.parent.parent.name if nested else None,
            labels={"Pneumothorax": 1.0 if positive else 0.0}, report=None,
            masks={"Pneumothorax": RleMask(tuple(row["EncodedPixels"].strip() for row in rows))})))
    return found, rejects


_READERS: dict[str, Reader] = {
    "mimic-cxr": _mimic_reader("mimic-cxr"),
    "chexpert": _read_chexpert,
    "rsna-pneumonia": _read_rsna,
    "covidx": _read_covidx,
    "siim-pneumothorax": _read_siim,
    "synthcxr": _mimic_reader("synthcxr"),
    "iu-xray": iu_xray.read,
    "chestxray14": chestxray14.read,
    "vindr-cxr": vindr_cxr.read,
    "padchest": padchest.read,
    "chexpert-plus": chexpert_plus.read,
}


def read_dataset(name: str, root: str | Path, *, frontal_only: bool = True,
                 seed: int = 0) -> tuple[list[Item], list[Reject]]:
    """The items of dataset ``name`` stored under ``root``, and the rows that gave none.

    ``frontal_only`` drops lateral images (CheXpert, CheXpert Plus, MIMIC-CXR, synthcxr, PadChest;
    IU X-ray names no views and keeps every image; the other datasets are frontal only). ``seed``
    drives the hashed splits. A second item with an already used id is rejected rather than
    allowed to overwrite the first one's cache file.
    """
    reader = _READERS.get(name)
    if reader is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: root folder {root} does not exist")
    found, rejects = reader(root, frontal_only, seed)
    items: list[Item] = []
    first_source: dict[str, str] = {}
    for source, item in found:
        if item.id in first_source:
            rejects.append(Reject(source, f"duplicate id {item.id} (first from {first_source[item.id]})"))
            continue
        first_source[item.id] = source
        items.append(item)
    items.sort(key=lambda it: (it.patient, it.study or "", it.id))
    return items, rejects
