"""NIH ChestX-ray14 reader on tiny copies of the NIH Box and Kaggle layouts."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmsd.data.chestxray14 import LABELS
from fastmsd.data.datasets import Reject, hash_split, read_dataset
from fastmsd.data.prepare import prepare

# The header as NIH ships it: the bracketed names hold commas, and a trailing comma names an empty column.
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
CSV = "Data_Entry_2017.csv"


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def _row(name: str, findings: str, patient: int, view: str = "PA") -> str:
    return f"{name},{findings},{int(name[9:12])},{patient},57,M,{view},2682,2749,0.143,0.143"


def _write(root: Path, rows: list[str], train_val: list[str], test: list[str], images: list[str], *,
           kaggle: bool = False) -> Path:
    """The dataset under ``root``: the Box copy's rows end in a comma, the Kaggle copy's images
    are spread over images_001/images, images_002/images, ..."""
    root.mkdir(parents=True, exist_ok=True)
    end = "" if kaggle else ","
    (root / CSV).write_text("\n".join([HEADER, *(r + end for r in rows)]) + "\n")
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
    (root / "test_list.txt").write_text("".join(f"{n}\n" for n in test))
    for i, name in enumerate(images):
        _png(root / f"images_{i % 2 + 1:03d}/images" / name if kaggle else root / "images" / name)
    return root


def _fixture(root: Path, kaggle: bool = False) -> Path:
    rows = [
        _row("00000001_000.png", "Cardiomegaly", 1),
        _row("00000001_001.png", "Cardiomegaly|Emphysema", 1),
        _row("00000001_002.png", "Effusion|Pleural_Thickening", 1, "AP"),
        _row("00000002_000.png", "No Finding", 2),
        _row("00000003_000.png", "Hernia", 3),                         # image missing
        _row("00000004_000.png", "Effusion|COVID", 4),                 # unknown finding
        _row("00000005_000.png", "No Finding", 5),                     # in neither list
        _row("00000006_000.png", "No Finding|Mass", 6),                # contradiction
        "00000007_000.png,Nodule,0,7,40,F,PA,2500,2048,0.168,0.168,extra,fields",
        ",Nodule,0,8,40,F,PA,2500,2048,0.168,0.168",                     # no Image Index
    ]
    train_val = ["00000001_000.png", "00000001_001.png", "00000001_002.png", "00000003_000.png",
                 "00000004_000.png", "00000006_000.png", "00000007_000.png"]
    images = ["00000001_000.png", "00000001_001.png", "00000001_002.png", "00000002_000.png",
              "00000004_000.png", "00000005_000.png", "00000006_000.png", "00000007_000.png"]
    return _write(root, rows, train_val, ["00000002_000.png"], images, kaggle=kaggle)


@pytest.mark.parametrize("kaggle", [False, True])
def test_chestxray14_layouts_labels_and_rejects(tmp_path, kaggle):
    root = _fixture(tmp_path / "nih", kaggle)
    items, rejects = read_dataset("chestxray14", root)
    by_id = {it.id: it for it in items}
    assert list(by_id) == ["00000001_000", "00000001_001", "00000001_002", "00000002_000"]
    first = by_id["00000001_000"]
    folder = root / ("images_001/images" if kaggle else "images")
    assert first.image == folder / "00000001_000.png" and first.image.is_file()
    assert (first.dataset, first.view, first.patient, first.study, first.report, first.language) == \
        ("chestxray14", "PA", "1", None, None, None)
    assert set(first.labels) == set(LABELS.values()) and len(first.labels) == 15
    assert first.labels["Cardiomegaly"] == 1.0 and sum(first.labels.values()) == 1.0
    effusion = by_id["00000001_002"].labels
    assert effusion["Pleural Effusion"] == effusion["Pleural_Thickening"] == 1.0
    assert "Effusion" not in effusion
    assert by_id["00000001_002"].view == "AP"
    assert by_id["00000002_000"].labels["No Finding"] == 1.0 and by_id["00000002_000"].split == "test"

    missing = f"image file not found: {root / 'images/00000003_000.png'}"
    assert rejects == [
        Reject(f"{CSV}:6", missing),
        Reject(f"{CSV}:7", "unknown finding(s) 'COVID' in Finding Labels 'Effusion|COVID'"),
        Reject(f"{CSV}:8", "00000005_000.png is in neither of train_val_list.txt and test_list.txt"),
        Reject(f"{CSV}:9", "'No Finding' listed with findings in Finding Labels 'No Finding|Mass'"),
        Reject(f"{CSV}:10", "malformed row: its number of fields differs from the header's"),
        Reject(f"{CSV}:11", "malformed row: Image Index '', Patient ID '8'"),
    ]
    assert len(items) + len(rejects) == 10


def test_chestxray14_validation_is_by_patient(tmp_path):
    names = [f"{p:08d}_{f:03d}.png" for p in range(1, 61) for f in range(3)]
    rows = [_row(n, "Atelectasis" if i % 2 else "No Finding", int(n[:8])) for i, n in enumerate(names)]
    test = [n for n in names if int(n[:8]) > 50]
    root = _write(tmp_path / "nih", rows, [n for n in names if n not in test], test, names)
    items, rejects = read_dataset("chestxray14", root, seed=5)
    assert rejects == [] and len(items) == len(names)
    split_of: dict[str, set[str]] = {}
    for it in items:
        split_of.setdefault(it.patient, set()).add(it.split)
    assert all(len(s) == 1 for s in split_of.values())          # a patient's images share the split
    assert {p: s.pop() for p, s in split_of.items()} == {
        str(p): "test" if p > 50 else "validate" if hash_split(str(p), 5) == "validate" else "train"
        for p in range(1, 61)}
    splits = [it.split for it in items]
    assert 0 < splits.count("validate") < splits.count("train") and splits.count("test") == 30
    assert [it.split for it in read_dataset("chestxray14", root, seed=5)[0]] == splits


def test_chestxray14_image_in_both_lists_is_rejected(tmp_path):
    name = "00000001_000.png"
    root = _write(tmp_path / "nih", [_row(name, "Mass", 1)], [name], [name], [name])
    assert read_dataset("chestxray14", root) == (
        [], [Reject(f"{CSV}:2", f"{name} is in both of train_val_list.txt and test_list.txt")])


@pytest.mark.parametrize("missing", [CSV, "train_val_list.txt", "test_list.txt", "images"])
def test_chestxray14_missing_file_is_named(tmp_path, missing):
    root = _fixture(tmp_path / "nih")
    path = root / missing
    if path.is_dir():
        for png in path.iterdir():
            png.unlink()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        read_dataset("chestxray14", root)


def test_chestxray14_prepare(tmp_path):
    root = _fixture(tmp_path / "nih", kaggle=True)
    out = tmp_path / "cache"
    counts = prepare("chestxray14", root, out, size=16, workers=1, progress=False)
    assert counts == {"found": 10, "prepared": 4, "rejected": 6}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["00000001_000", "00000001_001", "00000001_002", "00000002_000"]
    row = rows[2]
    assert (row["dataset"], row["view"], row["findings"], row["impression"], row["language"]) == \
        ("chestxray14", "AP", "", "", None)
    assert row["labels"]["Pleural Effusion"] == 1.0 and min(row["height"], row["width"]) == 16
    assert (out / row["image"]).is_file() and not (out / "tokens.npy").exists()
