"""Reader for VinDr-CXR: DICOMs, the radiologists' image labels and their boxes.

Layout, as PhysioNet ships it (vindr-cxr 1.0.0; ``ROOT`` is the ``1.0.0`` folder)::

    ROOT/train/<image_id>.dicom                15,000 images
    ROOT/test/<image_id>.dicom                 3,000 images
    ROOT/annotations/image_labels_train.csv    image_id, rad_id, then 0/1 for each of the 28 findings
                                               below: one row per radiologist (R1..R17), three per image
    ROOT/annotations/image_labels_test.csv     image_id, the 28 findings ("Other disease" for "Other
                                               diseases"): one consensus row per image
    ROOT/annotations/annotations_train.csv     image_id, rad_id, class_name, x_min, y_min, x_max, y_max:
    ROOT/annotations/annotations_test.csv      one row per box, in the DICOM's pixels; a mark without
                                               a box ("No finding") has empty coordinates

Every image is a frontal (PA) radiograph; there are no reports and no patient ids, so the patient
is the image. The view is None: nothing per image records it.

Labels
------
Binary, 1.0 or 0.0 for each of the 28 findings. The test labels are the consensus of five
radiologists and are taken as they are. Each training image was labelled independently by three
radiologists; a finding is positive when a majority of the image's readers marked it (two of
three; with a malformed row rejected, a majority of the rows left). One reader's mark alone is
too noisy to call positive (the readers often disagree), and unanimity would discard most real
findings. "No finding" is voted like the others, so an image whose three readers disagree on
every finding has no positive label.

Findings with a CheXpert column are stored under the CheXpert name, the others under VinDr's:

* "Pleural effusion" -> "Pleural Effusion", "No finding" -> "No Finding";
* Atelectasis, Cardiomegaly, Consolidation, Edema, Lung Opacity, Pneumonia, Pneumothorax: the
  same name (CheXpert's);
* Aortic enlargement, Calcification, Clavicle fracture, Emphysema, Enlarged PA, ILD, Infiltration,
  Lung cavity, Lung cyst, Mediastinal shift, Nodule/Mass, Pleural thickening, Pulmonary fibrosis,
  Rib fracture, Other lesion, COPD, Lung tumor, Tuberculosis, Other diseases: VinDr's name (no
  CheXpert column of the same definition).

Masks
-----
Every item has a box mask (:class:`BoxMask`) for each of :data:`MASKED`: the linear probe's
findings (Atelectasis, Cardiomegaly, Consolidation, Pleural Effusion; Edema is left out, marked
on a handful of images in the whole release) and Pneumothorax, the finding SIIM segments; the
other findings' boxes are not kept, as ``prepare`` writes a PNG per image for every masked
finding. A finding's mask is the union of the boxes that the radiologists drew for it when
its label is positive, and empty when its label is negative, so that mask and label agree: a
box drawn by a reader who was outvoted is dropped. An image with a positive masked finding but
no box for it is rejected (the release's two files disagree). Boxes lie on the DICOM's own pixel
grid, which differs from image to image: their BoxMask has no fixed shape, and ``prepare`` draws
them on the decoded image's grid (a box past its edge is a reject).

Splits: test is the test folder. The training images are split by image (each is its own
patient): an image whose :func:`hash_split` of (image_id, seed) is "validate" goes to
validation, about 10 % of them, the rest to train. Rejects: a malformed row, a duplicate
radiologist's row, a label other than 0 or 1, an unknown class_name, a malformed or empty box,
a box for an image without labels, a positive masked finding without a box, an image not on
disk.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
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
from .masks import BoxMask

# The 28 label columns of image_labels_train.csv, in its order.
FINDINGS: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
    "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
    "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD",
    "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding",
)
# VinDr's name (or the test file's spelling of it) -> the stored label column, where they differ.
_RENAMED = {"Pleural effusion": "Pleural Effusion", "No finding": "No Finding",
            "Other disease": "Other diseases"}
_SPELLINGS = {"Other diseases": ("Other diseases", "Other disease")}
MASKED: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumothorax")
_CORNERS = ("x_min", "y_min", "x_max", "y_max")
_Box = tuple[float, float, float, float]  # x, y, width, height: BoxMask's convention


def _column(name: str) -> str:
    return _RENAMED.get(name, name)


@dataclass
class _Votes:
    """One image's rows of an image_labels file."""

    source: str                 # the first row's
    readers: set[str] = field(default_factory=set)
    positives: dict[str, int] = field(default_factory=lambda: dict.fromkeys(map(_column, FINDINGS), 0))

    def labels(self) -> dict[str, float]:
        return {name: 1.0 if 2 * n > len(self.readers) else 0.0 for name, n in self.positives.items()}


def _label_columns(path: Path, header: list[str]) -> dict[str, str]:
    """Stored label column -> the file's column for it."""
    columns, missing = {}, []
    for name in FINDINGS:
        spelled = next((s for s in _SPELLINGS.get(name, (name,)) if s in header), None)
        if spelled is None:
            missing.append(name)
        else:
            columns[_column(name)] = spelled
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
    return columns


def _binary(row: dict[str, str], column: str) -> int:
    text = row[column].strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise ValueError(f"label {column!r} has value {text!r}, expected 0 or 1")
    return int(value)


def _read_labels(path: Path, rejects: list[Reject]) -> dict[str, _Votes]:
    images: dict[str, _Votes] = {}
    with open_csv(path, ("image_id",)) as reader:
        columns = _label_columns(path, list(reader.fieldnames or []))
        for row in reader:
            source = f"{path.name}:{reader.line_num}"
            if ragged(row):
                rejects.append(Reject(source, RAGGED))
                continue
            image_id = row["image_id"].strip()
            # The test file has one consensus row per image and no reader to name.
            reader_id = (row.get("rad_id") or "").strip()
            if not image_id:
                rejects.append(Reject(source, "malformed row: empty image_id"))
                continue
            try:
                marks = {name: _binary(row, column) for name, column in columns.items()}
            except ValueError as e:
                rejects.append(Reject(source, str(e)))
                continue
            votes = images.setdefault(image_id, _Votes(source))
            if reader_id in votes.readers:
                who = f"radiologist {reader_id}" if reader_id else "the consensus"
                rejects.append(Reject(source, f"duplicate row: {who} already labelled image {image_id}"))
                continue
            votes.readers.add(reader_id)
            for name, mark in marks.items():
                votes.positives[name] += mark
    return images


def _box(row: dict[str, str]) -> _Box | None | str:
    """The row's box, None for a mark without one, or why it is malformed."""
    corners = [row[c].strip() for c in _CORNERS]
    if not any(corners):
        return None
    try:
        x0, y0, x1, y1 = (float(c) for c in corners)
    except ValueError:
        x0 = y0 = x1 = y1 = math.nan
    if not all(map(math.isfinite, (x0, y0, x1, y1))):
        return f"malformed box: x_min, y_min, x_max, y_max {', '.join(map(repr, corners))}"
    if x1 <= x0 or y1 <= y0:
        return f"empty box: x_min {x0}, y_min {y0}, x_max {x1}, y_max {y1}"
    return x0, y0, x1 - x0, y1 - y0


def _read_boxes(path: Path, labelled: dict[str, _Votes], labels_name: str,
                rejects: list[Reject]) -> dict[str, dict[str, list[_Box]]]:
    """image_id -> masked finding -> every box drawn for it, whoever drew it."""
    known = set(FINDINGS) | set(_RENAMED)
    boxes: dict[str, dict[str, list[_Box]]] = defaultdict(lambda: defaultdict(list))
    with open_csv(path, ("image_id", "class_name", *_CORNERS)) as reader:
        for row in reader:
            source = f"{path.name}:{reader.line_num}"
            if ragged(row):
                rejects.append(Reject(source, RAGGED))
                continue
            image_id, name = row["image_id"].strip(), row["class_name"].strip()
            if name not in known:
                rejects.append(Reject(source, f"unknown class_name {name!r}"))
                continue
            if image_id not in labelled:
                rejects.append(Reject(source, f"image_id {image_id!r} has no row in {labels_name}"))
                continue
            box = _box(row)
            if isinstance(box, str):
                rejects.append(Reject(source, box))
            elif box is not None and _column(name) in MASKED:
                boxes[image_id][_column(name)].append(box)
    return boxes


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    annotations = root / "annotations"
    found: Found = []
    rejects: list[Reject] = []
    for part in ("train", "test"):
        folder = require(root / part, "vindr-cxr")
        labels_path = require(annotations / f"image_labels_{part}.csv", "vindr-cxr")
        boxes_path = require(annotations / f"annotations_{part}.csv", "vindr-cxr")
        images = _read_labels(labels_path, rejects)
        boxes = _read_boxes(boxes_path, images, labels_path.name, rejects)
        for image_id, votes in images.items():
            labels = votes.labels()
            drawn = boxes.get(image_id, {})
            positive = {name: tuple(drawn.get(name, ())) for name in MASKED if labels[name] == 1.0}
            unboxed = [name for name, b in positive.items() if not b]
            if unboxed:
                rejects.append(Reject(votes.source, f"positive {', '.join(unboxed)} without a box in "
                                                    f"{boxes_path.name}"))
                continue
            image = folder / f"{image_id}.dicom"
            masks = {name: BoxMask(positive.get(name, ()), None) for name in MASKED}
            split = "test" if part == "test" else \
                "validate" if hash_split(image_id, seed) == "validate" else "train"
            keep_if_present(votes.source, Item(
                id=safe_id(image_id), dataset="vindr-cxr", image=image, split=split, view=None,
                patient=image_id, study=None, labels=labels, report=None, masks=masks), found, rejects)
    return found, rejects
