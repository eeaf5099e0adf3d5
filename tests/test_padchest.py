"""PadChest reader on a tiny copy of the BIMCV layout, and the windowing of its 16-bit PNGs."""

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmsd.data.datasets import Reject, hash_split, read_dataset
from fastmsd.data.images import PERCENTILE_WINDOW, read_image, to_uint8
from fastmsd.data.padchest import LABELS
from fastmsd.data.prepare import prepare

CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
# The columns in the order BIMCV ships them.
HEADER = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
    "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM",
    "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM", "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]
REPORT = "derram pleural bilateral . cardiomegali . "


def _png16(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(1000, 3000, (24, 20)).astype(np.uint16)
    Image.fromarray(pixels).save(path)            # mode "I;16": a 16-bit grayscale PNG
    return path


def _row(image_id: str, folder: str, patient: str, projection: str, labels: str,
         report: str = REPORT) -> list[str]:
    values = dict.fromkeys(HEADER, "") | {
        "ImageID": image_id, "ImageDir": folder, "StudyDate_DICOM": "20140915", "StudyID": f"s{patient}",
        "PatientID": patient, "PatientBirth": "1940.0", "PatientSex_DICOM": "M",
        "ViewPosition_DICOM": "POSTEROANTERIOR", "Projection": projection,
        "MethodProjection": "Manual review of DICOM fields", "Pediatric": "No", "Modality_DICOM": "CR",
        "PhotometricInterpretation_DICOM": "MONOCHROME2", "BitsStored_DICOM": "12", "ReportID": "4765777",
        "Report": report, "MethodLabel": "Physician", "Labels": labels, "Localizations": "[]",
        "LabelsLocalizationsBySentence": f"[{labels}]", "labelCUIS": "[]", "LocalizationsCUIS": "[]"}
    return [values[c] for c in HEADER]


def _write_csv(root: Path, rows: list[list[str]], gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([HEADER, *rows])
    if gz:
        with gzip.open(root / f"{CSV}.gz", "wt", encoding="utf-8") as f:
            f.write(text.getvalue())
    else:
        (root / CSV).write_text(text.getvalue(), encoding="utf-8")
    return root


def _fixture(root: Path, gz: bool = False) -> Path:
    rows = [
        _row("p1_pa.png", "0", "p1", "PA", "['pleural effusion', 'cardiomegaly']"),
        _row("p1_l.png", "0", "p1", "L", "['pleural effusion', 'cardiomegaly']"),
        _row("p2_ap.png", "12", "p2", "AP_horizontal", "['normal']", "sin hallazg signific ."),
        _row("p3_costal.png", "12", "p3", "COSTAL", "['rib fracture']"),
        _row("p4.png", "12", "p4", "AP", "[' NSG tube', 'hydropneumothorax', 'chronic changes']"),
        _row("p5.png", "3", "p5", "PA", "['pleural effusion'"),        # unparseable Labels
        _row("p6.png", "3", "p6", "PA", ""),                           # no Labels
        _row("p7.png", "3", "p7", "PA", "['exclude']"),
        _row("p8.png", "3", "p8", "PA", "['normal']"),                 # image missing
        _row("p9.png", "3", "p9", "PA", "['normal']", report=" "),     # empty Report
        _row("p10.png", "../..", "p10", "PA", "['normal']"),           # ImageDir not a folder number
        _row("p11.png", "3", "p11", "PA", "[]"),                       # no term
        _row("p12.png", "3", "p12", "PA", "['normal']")[:-2],          # too few fields
    ]
    _write_csv(root, rows, gz)
    for name, folder in (("p1_pa.png", "0"), ("p1_l.png", "0"), ("p2_ap.png", "12"), ("p3_costal.png", "12"),
                         ("p4.png", "12"), ("p5.png", "3"), ("p6.png", "3"), ("p7.png", "3"), ("p9.png", "3"),
                         ("p11.png", "3"), ("p12.png", "3")):
        _png16(root / folder / name)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_padchest_views_labels_reports_and_rejects(tmp_path, gz):
    root = _fixture(tmp_path / "padchest", gz)
    name = CSV + (".gz" if gz else "")
    items, rejects = read_dataset("padchest", root, seed=1)
    by_id = {it.id: it for it in items}
    assert list(by_id) == ["p1_pa", "p2_ap", "p4"]
    first = by_id["p1_pa"]
    assert first.image == root / "0/p1_pa.png" and first.image.is_file()
    assert (first.dataset, first.view, first.patient, first.study) == ("padchest", "PA", "p1", "sp1")
    assert (first.report, first.language, first.split) == (REPORT.strip(), "es", hash_split("p1", 1))
    assert set(first.labels) == set(LABELS)
    assert {c for c, v in first.labels.items() if v} == {"Pleural Effusion", "Cardiomegaly"}
    assert all(v in (0.0, 1.0) for v in first.labels.values())
    assert by_id["p2_ap"].view == "AP_horizontal" and by_id["p2_ap"].labels["No Finding"] == 1.0
    # Terms are matched case- and space-insensitively; a term may set two columns.
    assert {c for c, v in by_id["p4"].labels.items() if v} == {"Support Devices", "Pneumothorax",
                                                               "Pleural Effusion"}
    assert rejects == [
        Reject(f"{name}:7", "Labels is not a list of terms: \"['pleural effusion'\""),
        Reject(f"{name}:8", "Labels is not a list of terms: ''"),
        Reject(f"{name}:9", "Labels has 'exclude': the report does not describe the image"),
        Reject(f"{name}:10", f"image file not found: {root / '3/p8.png'}"),
        Reject(f"{name}:11", "empty Report"),
        Reject(f"{name}:12", "malformed row: ImageID 'p10.png', ImageDir '../..', PatientID 'p10'"),
        Reject(f"{name}:13", "Labels lists no term: '[]'"),
        Reject(f"{name}:14", "malformed row: its number of fields differs from the header's"),
    ]

    every, _ = read_dataset("padchest", root, frontal_only=False, seed=1)
    views = {it.id: it.view for it in every}
    assert views["p1_l"] == "LATERAL" and views["p3_costal"] == "COSTAL" and len(every) == 5
    assert {it.id: it.labels["Fracture"] for it in every}["p3_costal"] == 1.0


def test_padchest_split_is_by_patient(tmp_path):
    rows = [_row(f"p{p}_{k}.png", str(p % 3), f"p{p}", "PA", "['normal']")
            for p in range(40) for k in range(2)]
    root = _write_csv(tmp_path / "padchest", rows)
    for p in range(40):
        for k in range(2):
            _png16(root / str(p % 3) / f"p{p}_{k}.png")
    items, rejects = read_dataset("padchest", root, seed=7)
    assert rejects == [] and len(items) == 80
    assert all(it.split == hash_split(it.patient, 7) for it in items)
    assert {it.split for it in items} == {"train", "validate", "test"}


def test_padchest_missing_csv_is_named(tmp_path):
    (tmp_path / "0").mkdir()
    with pytest.raises(FileNotFoundError, match=CSV):
        read_dataset("padchest", tmp_path)


def test_16bit_png_is_windowed_like_a_dicom_without_a_window(tmp_path):
    pixels = np.tile(np.linspace(1000, 3000, 200), (100, 1)).round().astype(np.uint16)
    pixels[0, 0] = 65535                           # a hot pixel must not stretch the window
    path = tmp_path / "16bit.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    out = read_image(path)
    low, high = np.percentile(pixels, PERCENTILE_WINDOW)
    np.testing.assert_array_equal(out, to_uint8(pixels, float(low), float(high)))
    assert out.dtype == np.uint8 and out[50, 0] == 0 and out[50, -1] == 255 and 120 < out[50, 100] < 135


def test_padchest_prepare(tmp_path):
    rows = [_row(f"p{p}.png", "0", f"p{p}", "PA", "['normal']" if p % 2 else "['pulmonary edema']",
                 f"estudi {p} sin cambi signific . ") for p in range(12)]
    rows.append(_row("gone.png", "0", "p99", "PA", "['normal']"))
    root = _write_csv(tmp_path / "padchest", rows)
    for p in range(12):
        _png16(root / "0" / f"p{p}.png", seed=p)
    out = tmp_path / "cache"
    counts = prepare("padchest", root, out, size=16, workers=1, max_len=16, progress=False)
    assert counts == {"found": 13, "prepared": 12, "rejected": 1}
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_id = {row["id"]: row for row in manifest}
    row = by_id["p3"]
    assert (row["dataset"], row["language"], row["view"]) == ("padchest", "es", "PA")
    # No section headers: the whole report is the findings text.
    assert (row["findings"], row["impression"]) == ("estudi 3 sin cambi signific .", "")
    assert row["labels"]["No Finding"] == 1.0 and by_id["p2"]["labels"]["Edema"] == 1.0
    assert min(row["height"], row["width"]) == 16 and (out / row["image"]).is_file()
    assert np.load(out / "tokens.npy").shape == (12, 16)
    with (out / "rejects.csv").open(newline="") as f:
        assert [r["source"] for r in csv.DictReader(f)] == [f"{CSV}:14"]
