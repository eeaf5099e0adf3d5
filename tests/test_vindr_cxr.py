"""The vindr-cxr reader on fixtures in PhysioNet's vindr-cxr 1.0.0 layout, and through ``prepare``."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmsd.data.datasets import Reject, read_dataset
from fastmsd.data.masks import BoxMask, render_mask, resize_mask
from fastmsd.data.prepare import prepare
from fastmsd.data.vindr_cxr import FINDINGS, MASKED
from tests.helpers import write_dicom

SHAPE = (40, 60)  # rows, columns of every fixture DICOM
LABEL_HEADER = ["image_id", "rad_id", *FINDINGS]
# The test file spells "Other diseases" as "Other disease" and has no rad_id.
TEST_HEADER = ["image_id", *("Other disease" if f == "Other diseases" else f for f in FINDINGS)]
BOX_HEADER = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
STORED = [{"Pleural effusion": "Pleural Effusion", "No finding": "No Finding"}.get(f, f) for f in FINDINGS]


def image_id(i: int) -> str:
    return f"{i:032x}"     # VinDr's ids are 32 hex digits


def marks(*findings: str) -> list[str]:
    """A row's 28 label values: 1 for ``findings`` ("No finding" when none), 0 for the rest."""
    findings = findings or ("No finding",)
    assert set(findings) <= set(FINDINGS)
    return ["1" if f in findings else "0" for f in FINDINGS]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(",".join(header) + "\n")
        csv.writer(f).writerows(rows)


def dicom(root: Path, part: str, name: str) -> Path:
    pixels = (np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE) * 7 % 4096).astype(np.uint16)
    path = root / part / f"{name}.dicom"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom(path, pixels)
    return path


def layout(root: Path, train: list[list[str]], test: list[list[str]], train_boxes: list[list[str]],
           test_boxes: list[list[str]], images: list[tuple[str, str]]) -> Path:
    write_csv(root / "annotations" / "image_labels_train.csv", LABEL_HEADER, train)
    write_csv(root / "annotations" / "image_labels_test.csv", TEST_HEADER, test)
    write_csv(root / "annotations" / "annotations_train.csv", BOX_HEADER, train_boxes)
    write_csv(root / "annotations" / "annotations_test.csv", BOX_HEADER, test_boxes)
    for part in ("train", "test"):
        (root / part).mkdir(parents=True, exist_ok=True)
    for part, name in images:
        dicom(root, part, name)
    return root


A, B, T = image_id(1), image_id(2), image_id(900)
# Cardiomegaly: R1 and R2 (boxes in x_min, y_min, x_max, y_max); Pleural effusion: R1 only.
A_BOXES = [(10.0, 5.0, 30.0, 25.0), (20.5, 10.0, 50.0, 30.0)]


def basic_layout(root: Path, n_plain: int = 38) -> Path:
    plain = [image_id(100 + i) for i in range(n_plain)]
    train = [[A, "R1", *marks("Cardiomegaly", "Pleural effusion")], [A, "R2", *marks("Cardiomegaly")],
             [A, "R3", *marks()],
             [B, "R4", *marks()], [B, "R5", *marks()], [B, "R6", *marks("Nodule/Mass")]]
    train += [[p, f"R{r}", *marks()] for p in plain for r in (7, 8, 9)]
    train_boxes = [[A, "R1", "Cardiomegaly", *map(str, A_BOXES[0])],
                   [A, "R1", "Pleural effusion", "1", "2", "8", "9"],
                   [A, "R2", "Cardiomegaly", *map(str, A_BOXES[1])],
                   [A, "R3", "No finding", "", "", "", ""],
                   [B, "R6", "Nodule/Mass", "3", "3", "6", "6"]]
    test = [[T, *marks("Pneumothorax", "Other diseases")]]
    test_boxes = [[T, "R_consensus", "Pneumothorax", "40", "0", "60", "20"]]
    return layout(root, train, test, train_boxes, test_boxes,
                  [("train", A), ("train", B), ("test", T)] + [("train", p) for p in plain])


def test_majority_vote_names_splits_and_masks(tmp_path):
    root = basic_layout(tmp_path / "1.0.0")
    items, rejects = read_dataset("vindr-cxr", root, seed=1)
    assert rejects == []
    assert len(items) == 41
    by_id = {it.id: it for it in items}
    a, b, t = by_id[A], by_id[B], by_id[T]
    assert list(a.labels) == STORED and "Other diseases" in STORED
    assert a.labels["Cardiomegaly"] == 1.0                        # two of three readers
    assert a.labels["Pleural Effusion"] == a.labels["No Finding"] == 0.0   # one of three
    assert sum(a.labels.values()) == 1.0
    assert b.labels["No Finding"] == 1.0 and b.labels["Nodule/Mass"] == 0.0
    assert t.labels["Pneumothorax"] == t.labels["Other diseases"] == 1.0 and sum(t.labels.values()) == 2.0
    assert (a.dataset, a.view, a.patient, a.study, a.report) == ("vindr-cxr", None, A, None, None)
    assert a.image == root / "train" / f"{A}.dicom" and a.image.is_absolute()

    # The union of the two positive readers' boxes; the outvoted Pleural effusion box is dropped.
    assert set(a.masks) == set(MASKED)
    xywh = tuple((x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in A_BOXES)
    assert a.masks["Cardiomegaly"] == BoxMask(xywh, None)
    union = np.zeros(SHAPE, bool)
    union[5:25, 10:30] = union[10:30, 20:50] = True
    assert (render_mask(a.masks["Cardiomegaly"], SHAPE) == union).all()
    assert a.masks["Pleural Effusion"] == BoxMask((), None)
    assert all(m == BoxMask((), None) for m in b.masks.values())
    assert t.masks["Pneumothorax"] == BoxMask(((40.0, 0.0, 20.0, 20.0),), None)

    splits = {it.id: it.split for it in items}
    assert splits[T] == "test"
    assert {s for i, s in splits.items() if i != T} == {"train", "validate"}
    assert splits == {it.id: it.split for it in read_dataset("vindr-cxr", root, seed=1)[0]}
    assert splits != {it.id: it.split for it in read_dataset("vindr-cxr", root, seed=2)[0]}


def test_rejects_with_reasons(tmp_path):
    ids = [image_id(i) for i in range(10, 18)]
    c, missing, unboxed, damaged, bad_value, dup, unknown_box, ok = ids
    train = [
        [c, "R1", *marks("Atelectasis")], [c, "R2", *marks("Atelectasis")], [c, "R3", *marks()],
        [missing, "R1", *marks()],                                        # no DICOM
        [unboxed, "R1", *marks("Pneumothorax")], [unboxed, "R2", *marks("Pneumothorax")],
        [damaged, "R1", *marks("Cardiomegaly")],                          # not a DICOM: prepare's reject
        [bad_value, "R1", *marks()[:-1], "2"],                            # line 9
        [dup, "R1", *marks()], [dup, "R1", *marks("Edema")],               # line 11: R1 again
        ["", "R1", *marks()],                                             # line 12
        [ok, "R1", *marks()[:-1]],                                        # line 13: a field short
        [ok, "R2", *marks()],
    ]
    boxes = [
        [c, "R1", "Atelectasis", "1", "1", "5", "5"],
        [c, "R2", "Lung nodule", "1", "1", "5", "5"],                     # line 3
        [c, "R2", "Atelectasis", "1", "one", "5", "5"],                   # line 4
        [c, "R2", "Atelectasis", "5", "1", "5", "5"],                     # line 5: zero width
        [unknown_box, "R1", "Cardiomegaly", "1", "1", "5", "5"],          # line 6: no labels row
        [damaged, "R1", "Cardiomegaly", "1", "1", "5", "5"],
        [c, "R2", "Atelectasis", "2", "2", "9", "9", "extra"],            # line 8
    ]
    root = layout(tmp_path / "1.0.0", train, [], boxes, [],
                  [("train", i) for i in (c, unboxed, bad_value, dup, ok)])
    (root / "train" / f"{damaged}.dicom").write_text("not a DICOM file")

    items, rejects = read_dataset("vindr-cxr", root)
    assert {it.id for it in items} == {c, damaged, dup, ok}
    labels_csv, boxes_csv = "image_labels_train.csv", "annotations_train.csv"
    assert rejects[:5] == [
        Reject(f"{labels_csv}:9", "label 'No finding' has value '2', expected 0 or 1"),
        Reject(f"{labels_csv}:11", f"duplicate row: radiologist R1 already labelled image {dup}"),
        Reject(f"{labels_csv}:12", "malformed row: empty image_id"),
        Reject(f"{labels_csv}:13", "malformed row: its number of fields differs from the header's"),
        Reject(f"{boxes_csv}:3", "unknown class_name 'Lung nodule'"),
    ]
    assert rejects[5] == Reject(f"{boxes_csv}:4", "malformed box: x_min, y_min, x_max, y_max "
                                                  "'1', 'one', '5', '5'")
    assert rejects[6] == Reject(f"{boxes_csv}:5", "empty box: x_min 5.0, y_min 1.0, x_max 5.0, y_max 5.0")
    assert rejects[7] == Reject(f"{boxes_csv}:6", f"image_id '{unknown_box}' has no row in {labels_csv}")
    assert rejects[8].source == f"{boxes_csv}:8" and "number of fields" in rejects[8].reason
    assert rejects[9:] == [
        Reject(f"{labels_csv}:5", f"image file not found: {root / 'train' / (missing + '.dicom')}"),
        Reject(f"{labels_csv}:6", f"positive Pneumothorax without a box in {boxes_csv}"),
    ]
    by_id = {it.id: it for it in items}
    assert by_id[c].labels["Atelectasis"] == 1.0
    assert by_id[c].masks["Atelectasis"] == BoxMask(((1.0, 1.0, 4.0, 4.0),), None)
    assert by_id[dup].labels["Edema"] == 0.0 and by_id[dup].labels["No Finding"] == 1.0
    assert by_id[ok].labels["No Finding"] == 1.0       # the one well-formed row


@pytest.mark.parametrize("missing", [
    "annotations/image_labels_train.csv", "annotations/image_labels_test.csv",
    "annotations/annotations_train.csv", "annotations/annotations_test.csv", "test",
])
def test_missing_file_is_named(tmp_path, missing):
    root = layout(tmp_path / "1.0.0", [], [], [], [], [])
    target = root / missing
    target.rmdir() if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=Path(missing).name):
        read_dataset("vindr-cxr", root)


def test_missing_label_column_is_named(tmp_path):
    root = layout(tmp_path / "1.0.0", [], [], [], [], [])
    write_csv(root / "annotations" / "image_labels_test.csv", [c for c in TEST_HEADER if c != "COPD"], [])
    with pytest.raises(ValueError, match="lacks the column.s. COPD"):
        read_dataset("vindr-cxr", root)


def test_prepare_renders_the_box_masks(tmp_path):
    root = basic_layout(tmp_path / "1.0.0", n_plain=2)
    write_csv(root / "annotations" / "image_labels_test.csv", TEST_HEADER,
              [[T, *marks("Pneumothorax", "Other diseases")], [image_id(901), *marks()]])  # no DICOM
    out = tmp_path / "cache"
    counts = prepare("vindr-cxr", root, out, size=20, workers=1, progress=False)
    assert counts == {"found": 6, "prepared": 5, "rejected": 1}
    assert counts["found"] == counts["prepared"] + counts["rejected"]
    info = json.loads((out / "prepare.json").read_text())
    assert info["masks"] == sorted(MASKED)
    rows = {row["id"]: row for row in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(rows) == {A, B, T, image_id(100), image_id(101)}
    a = rows[A]
    assert (a["height"], a["width"]) == (20, 30) and a["labels"]["Cardiomegaly"] == 1.0
    assert a["split"] in ("train", "validate") and rows[T]["split"] == "test"
    assert a["findings"] == a["impression"] == "" and not (out / "tokens.npy").exists()
    assert set(a["masks"]) == set(MASKED)
    assert a["masks"]["Cardiomegaly"] == f"masks/cardiomegaly/{A}.png"

    def png(path: str) -> np.ndarray:
        with Image.open(out / path) as im:
            return np.asarray(im)

    cardio = png(a["masks"]["Cardiomegaly"])
    xywh = tuple((x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in A_BOXES)
    expected = resize_mask(render_mask(BoxMask(xywh, None), SHAPE), (20, 30))
    assert cardio.shape == (20, 30) and set(np.unique(cardio)) == {0, 255}
    assert ((cardio > 0) == expected).all()
    assert cardio[5, 7] == 255 and cardio[12, 22] == 255 and cardio[2, 25] == 0 and cardio[17, 2] == 0
    assert not png(a["masks"]["Pleural Effusion"]).any()           # outvoted: no mask
    thorax = png(rows[T]["masks"]["Pneumothorax"])
    assert thorax[:10, 20:].all() and not thorax[10:].any() and not thorax[:, :20].any()
    with (out / "rejects.csv").open(newline="") as f:
        assert [r["reason"] for r in csv.DictReader(f)] == [
            f"image file not found: {root / 'test' / (image_id(901) + '.dicom')}"]
