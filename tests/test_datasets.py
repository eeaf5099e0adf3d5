"""Dataset readers on small hand-built copies of each public layout."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmsd.data.datasets import (
    DATASETS,
    UNCERTAIN_POLICY,
    Reject,
    apply_label_policy,
    hash_split,
    read_dataset,
)
from fastmsd.data.synthcxr import CHEXPERT_COLUMNS, generate
from tests.helpers import cr_dataset


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8), mode="L").save(path)
    return path


def _dicom(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = cr_dataset(Rows=4, Columns=4, SamplesPerPixel=1, BitsAllocated=16, BitsStored=12, HighBit=11,
                    PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2",
                    PixelData=np.zeros((4, 4), np.uint16).tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(",".join(header) + "\n")
        csv.writer(f).writerows(rows)
    return path


# --------------------------------------------------------------------------- general

def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="rsna-pneumonia"):
        read_dataset("nih-cxr14", tmp_path)
    assert DATASETS == ("mimic-cxr", "chexpert", "rsna-pneumonia", "covidx", "siim-pneumothorax",
                        "synthcxr", "iu-xray", "chestxray14", "vindr-cxr", "padchest", "chexpert-plus")


@pytest.mark.parametrize("name, folders, missing", [
    ("chexpert", [], "train.csv"),
    ("rsna-pneumonia", ["stage_2_train_images"], "stage_2_train_labels.csv"),
    ("covidx", ["train", "test"], "train.txt"),
    ("siim-pneumothorax", ["dicom-images-train"], "train-rle.csv"),
    ("mimic-cxr", ["files"], "mimic-cxr-2.0.0-split.csv"),
])
def test_missing_csv_is_named(tmp_path, name, folders, missing):
    for folder in folders:
        (tmp_path / folder).mkdir()
    with pytest.raises(FileNotFoundError, match=missing):
        read_dataset(name, tmp_path)


def test_label_policy():
    raw = dict.fromkeys(CHEXPERT_COLUMNS)
    raw |= {"Atelectasis": -1.0, "Edema": -1.0, "Pleural Effusion": -1.0, "Cardiomegaly": -1.0,
            "Consolidation": 1.0, "Pneumothorax": 0.0}
    out = apply_label_policy(raw)
    assert out["Atelectasis"] == out["Edema"] == out["Pleural Effusion"] == 1.0   # U-Ones
    assert out["Cardiomegaly"] == 0.0                                             # U-Zeros
    assert out["Consolidation"] == 1.0 and out["Pneumothorax"] == 0.0
    assert out["No Finding"] == out["Fracture"] == 0.0                            # blank
    assert set(out) == set(UNCERTAIN_POLICY) == set(CHEXPERT_COLUMNS)
    # A study without any label stays unlabelled rather than becoming all-negative.
    assert apply_label_policy(dict.fromkeys(CHEXPERT_COLUMNS)) == dict.fromkeys(CHEXPERT_COLUMNS)
    with pytest.raises(ValueError, match="Edema"):
        apply_label_policy({"Edema": 2.0})


def test_hash_split_is_deterministic_and_about_80_10_10():
    splits = [hash_split(f"patient{i}", 0) for i in range(2000)]
    assert splits == [hash_split(f"patient{i}", 0) for i in range(2000)]
    assert splits != [hash_split(f"patient{i}", 1) for i in range(2000)]
    assert abs(splits.count("train") / 2000 - 0.8) < 0.03
    assert abs(splits.count("test") / 2000 - 0.1) < 0.03


# --------------------------------------------------------------------------- CheXpert

_CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                    "Pleural Other", "Fracture", "Support Devices"]


def _chexpert_row(path: str, frontal: bool, ap_pa: str, **labels: str) -> list[str]:
    values = {c: "" for c in _CHEXPERT_HEADER[5:]} | {k.replace("_", " "): v for k, v in labels.items()}
    return [path, "Female", "68", "Frontal" if frontal else "Lateral", ap_pa,
            *(values[c] for c in _CHEXPERT_HEADER[5:])]


@pytest.mark.parametrize("root_name", ["CheXpert-v1.0-small", "renamed"])
def test_chexpert(tmp_path, root_name):
    root = tmp_path / root_name
    p = "CheXpert-v1.0-small/"
    rows = [
        _chexpert_row(p + "train/patient00001/study1/view1_frontal.jpg", True, "AP", Atelectasis="-1.0",
                      Cardiomegaly="-1.0", Pleural_Effusion="1.0", Pneumothorax="0.0"),
        _chexpert_row(p + "train/patient00001/study1/view2_lateral.jpg", False, "LL", Edema="-1.0"),
        _chexpert_row(p + "train/patient00002/study1/view1_frontal.jpg", True, "PA"),    # no file
        _chexpert_row("train/patient00003/study2/view1_frontal.jpg", True, "PA", No_Finding="1.0"),
        _chexpert_row(p + "train/patient00004/study1/view1_frontal.jpg", True, "PA", Edema="yes"),
    ]
    _csv(root / "train.csv", _CHEXPERT_HEADER, rows)
    _csv(root / "valid.csv", _CHEXPERT_HEADER, [_chexpert_row(
        p + "valid/patient64541/study1/view1_frontal.jpg", True, "AP", Edema="1.0")])
    for rel in ("train/patient00001/study1/view1_frontal.jpg", "train/patient00001/study1/view2_lateral.jpg",
                "train/patient00003/study2/view1_frontal.jpg", "train/patient00004/study1/view1_frontal.jpg",
                "valid/patient64541/study1/view1_frontal.jpg"):
        _jpeg(root / rel)

    items, rejects = read_dataset("chexpert", root)
    by_id = {it.id: it for it in items}
    assert [it.id for it in items] == ["patient00001_study1_view1_frontal",
                                       "patient00003_study2_view1_frontal",
                                       "patient64541_study1_view1_frontal"]
    assert rejects == [
        Reject("train.csv:4",
               f"image file not found: {root / 'train/patient00002/study1/view1_frontal.jpg'}"),
        Reject("train.csv:6", "label 'Edema' has value 'yes', expected 1, 0, -1 or blank"),
    ]
    assert len(items) + len(rejects) == 5                    # the frontal rows
    first = by_id["patient00001_study1_view1_frontal"]
    assert first.image == root / "train/patient00001/study1/view1_frontal.jpg" and first.image.is_absolute()
    assert (first.split, first.view, first.patient, first.study) == ("train", "AP", "patient00001",
                                                                   "patient00001_study1")
    assert first.labels["Atelectasis"] == 1.0 and first.labels["Cardiomegaly"] == 0.0   # uncertain
    assert first.labels["Pleural Effusion"] == 1.0 and first.labels["Pneumothorax"] == 0.0
    assert first.labels["Edema"] == first.labels["No Finding"] == 0.0                   # blank
    assert first.report is None and first.dataset == "chexpert"
    assert by_id["patient00003_study2_view1_frontal"].labels["No Finding"] == 1.0
    valid = by_id["patient64541_study1_view1_frontal"]
    assert (valid.split, valid.labels["Edema"]) == ("validate", 1.0)

    all_views, _ = read_dataset("chexpert", root, frontal_only=False)
    lateral = {it.id: it for it in all_views}["patient00001_study1_view2_lateral"]
    assert lateral.view == "LATERAL" and lateral.labels["Edema"] == 1.0    # U-Ones
    assert len(all_views) == 4


def test_chexpert_missing_valid_csv(tmp_path):
    _csv(tmp_path / "train.csv", _CHEXPERT_HEADER, [])
    with pytest.raises(FileNotFoundError, match="valid.csv"):
        read_dataset("chexpert", tmp_path)


# --------------------------------------------------------------------------- MIMIC-CXR / synthcxr

def test_mimic_cxr(tmp_path):
    folder = tmp_path / "files/p10/p10000001"
    _csv(tmp_path / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], [
        ["aaaa-0001", "50000001", "10000001", "train"], ["aaaa-0002", "50000001", "10000001", "train"],
        ["aaaa-0003", "50000002", "10000001", "validate"], ["aaaa-0004", "50000003", "10000001", "test"]])
    _csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition"], [
        ["aaaa-0001", "10000001", "50000001", "PA"], ["aaaa-0002", "10000001", "50000001", "LATERAL"],
        ["aaaa-0003", "10000001", "50000002", "AP"], ["aaaa-0004", "10000001", "50000003", "AP"]])
    labels = {c: "" for c in CHEXPERT_COLUMNS} | {"Edema": "-1.0", "Cardiomegaly": "-1.0", "Fracture": "1.0"}
    _csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_COLUMNS],
         [["10000001", "50000001", *labels.values()]])
    _jpeg(folder / "s50000001/aaaa-0001.jpg")
    _jpeg(folder / "s50000001/aaaa-0002.jpg")
    _jpeg(folder / "s50000003/aaaa-0004.jpg")       # aaaa-0003's image is missing
    report = "FINAL REPORT\n FINDINGS: Mild edema.\n IMPRESSION: Possible edema.\n"
    for study in ("s50000001", "s50000002", "s50000003"):
        (folder / f"{study}.txt").write_text(report)

    items, rejects = read_dataset("mimic-cxr", tmp_path)
    assert [it.id for it in items] == ["aaaa-0001", "aaaa-0004"]
    first, unlabelled = items
    assert (first.split, first.view, first.patient, first.study) == ("train", "PA", "10000001", "50000001")
    assert first.report == report
    assert first.labels["Edema"] == 1.0 and first.labels["Cardiomegaly"] == 0.0
    assert first.labels["Fracture"] == 1.0 and first.labels["Pneumonia"] == 0.0
    assert all(v is None for v in unlabelled.labels.values())      # study absent from the CSV
    assert rejects == [Reject("files/p10/p10000001/s50000002/aaaa-0003.jpg",
                              f"image file not found: {folder / 's50000002/aaaa-0003.jpg'}")]
    all_views, _ = read_dataset("mimic-cxr", tmp_path, frontal_only=False)
    assert {it.id: it.view for it in all_views}["aaaa-0002"] == "LATERAL"
    (folder / "s50000003.txt").unlink()
    items, rejects = read_dataset("mimic-cxr", tmp_path)
    assert [it.id for it in items] == ["aaaa-0001"]
    assert rejects[1] == Reject("files/p10/p10000001/s50000003/aaaa-0004.jpg",
                                f"report file not found: {folder / 's50000003.txt'}")


def test_synthcxr(tmp_path):
    root = generate(tmp_path / "synth", n_train=12, n_per_class=1, size=32, n_dicom=0, workers=1,
                    progress=False)
    with open(root / "mimic-cxr-2.0.0-split.csv") as f:
        rows = list(csv.DictReader(f))
    gone = next(root.rglob("*.jpg"))
    gone.unlink()
    items, rejects = read_dataset("synthcxr", root)
    assert len(items) + len(rejects) == len(rows) and len(rejects) == 1
    assert rejects[0].reason == f"image file not found: {gone}"
    assert {it.id for it in items} == {r["dicom_id"] for r in rows} - {gone.stem}
    assert {it.split for it in items} == {"train", "validate", "test"}
    assert all(it.dataset == "synthcxr" and it.view in ("PA", "AP") and it.report for it in items)
    assert all(v in (0.0, 1.0) for it in items for v in it.labels.values())
    assert items == read_dataset("synthcxr", root)[0]


# --------------------------------------------------------------------------- RSNA Pneumonia

def test_rsna_pneumonia(tmp_path):
    pids = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(50)]
    rows = [[pids[0], "10", "20", "30", "40", "1"], [pids[0], "50", "60", "30", "40", "1"]]
    rows += [[pid, "", "", "", "", "0"] for pid in pids[1:]]
    rows.append(["", "", "", "", "", "0"])
    _csv(tmp_path / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    for pid in pids[:-1]:          # the last patient's DICOM is missing
        _dicom(tmp_path / "stage_2_train_images" / f"{pid}.dcm")

    items, rejects = read_dataset("rsna-pneumonia", tmp_path, seed=3)
    assert len(items) == 49 and len(items) + len(rejects) == 51    # 50 patients and one bad row
    assert rejects[0].source == "stage_2_train_labels.csv:53"
    assert rejects[1] == Reject("stage_2_train_labels.csv:52", "image file not found: "
                                f"{tmp_path / 'stage_2_train_images' / (pids[-1] + '.dcm')}")
    by_id = {it.id: it for it in items}
    assert by_id[pids[0]].labels == {"Pneumonia": 1.0}
    assert sum(it.labels["Pneumonia"] for it in items) == 1.0
    assert by_id[pids[1]].view is None and by_id[pids[1]].patient == pids[1]
    splits = {it.id: it.split for it in items}
    assert set(splits.values()) == {"train", "validate", "test"}
    assert splits == {it.id: it.split for it in read_dataset("rsna-pneumonia", tmp_path, seed=3)[0]}
    assert splits != {it.id: it.split for it in read_dataset("rsna-pneumonia", tmp_path, seed=4)[0]}


# --------------------------------------------------------------------------- COVIDx

def test_covidx(tmp_path):
    (tmp_path / "train.txt").write_text(
        "p1 a.png positive ricord\n"
        "p1 b(1).png negative rsna\n"
        "p2 c.jpg COVID-19 cohen\n"
        "p3 d.jpg pneumonia sirm\n"
        "\n"
        "p4 e.jpg normal\n"                  # three fields
        "p5 f.jpg maybe bimcv\n"
        "p6 missing.png negative rsna\n")
    (tmp_path / "test.txt").write_text("p7 g.png positive ricord\np8 a.png negative rsna\n")
    for name in ("a.png", "b(1).png", "c.jpg", "d.jpg", "e.jpg", "f.jpg"):
        _jpeg(tmp_path / "train" / name)
    _jpeg(tmp_path / "test/g.png")
    _jpeg(tmp_path / "test/a.png")

    items, rejects = read_dataset("covidx", tmp_path)
    assert {it.id: (it.split, it.patient, it.labels["COVID-19"]) for it in items} == {
        "a": ("train", "p1", 1.0), "b_1_": ("train", "p1", 0.0), "c": ("train", "p2", 1.0),
        "d": ("train", "p3", 0.0), "g": ("test", "p7", 1.0)}
    assert {it.image for it in items} >= {tmp_path / "train/b(1).png", tmp_path / "test/g.png"}
    assert [r.source for r in rejects] == ["train.txt:6", "train.txt:7", "train.txt:8", "test.txt:2"]
    assert rejects[0].reason.startswith("malformed line")
    assert rejects[1].reason == "unknown label 'maybe'"
    assert rejects[2].reason == f"image file not found: {tmp_path / 'train/missing.png'}"
    assert rejects[3].reason.startswith("duplicate id a")     # would overwrite train's a.png


def test_covidx_val_txt_needs_its_folder(tmp_path):
    for name in ("train.txt", "test.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    assert read_dataset("covidx", tmp_path) == ([], [])
    (tmp_path / "val.txt").write_text("p1 a.png positive ricord\n")
    with pytest.raises(FileNotFoundError, match="val"):
        read_dataset("covidx", tmp_path)


# --------------------------------------------------------------------------- SIIM-ACR Pneumothorax

def test_siim_pneumothorax(tmp_path):
    ids = [f"1.2.276.0.7230010.3.1.4.{i}" for i in range(5)]
    (tmp_path / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n"
        f"{ids[0]}, -1\n"
        f"{ids[1]}, 387620 23 996 33\n"
        f"{ids[1]}, 1000 5\n"
        f"{ids[2]},-1\n"
        f"{ids[3]}, -1\n"                    # no DICOM on disk
        f"{ids[4]}, 12 3 4\n"                # odd number of RLE values
        f"{ids[0]}\n")                       # one field
    for i in (0, 1, 4):
        _dicom(tmp_path / "dicom-images-train" / f"1.2.study.{i}" / f"1.2.series.{i}" / f"{ids[i]}.dcm")
    _dicom(tmp_path / "dicom-images-train" / f"{ids[2]}.dcm")    # not nested: no study known

    items, rejects = read_dataset("siim-pneumothorax", tmp_path, seed=0)
    by_id = {it.id: it for it in items}
    assert {i: it.labels["Pneumothorax"] for i, it in by_id.items()} == {ids[0]: 0.0, ids[1]: 1.0,
                                                                        ids[2]: 0.0}
    assert by_id[ids[1]].study == "1.2.study.1" and by_id[ids[2]].study is None
    assert by_id[ids[0]].image == tmp_path / f"dicom-images-train/1.2.study.0/1.2.series.0/{ids[0]}.dcm"
    assert all(it.split == hash_split(it.id, 0) for it in items)
    assert [r.source for r in rejects] == ["train-rle.csv:7", "train-rle.csv:8", "train-rle.csv:6"]
    assert rejects[0].reason.startswith("malformed row: ImageId")
    assert rejects[1].reason.startswith("malformed row: its number of fields")
    assert rejects[2].reason.startswith("image file not found") and ids[3] in rejects[2].reason
