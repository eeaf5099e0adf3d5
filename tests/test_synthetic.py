"""synthcxr generator and MIMIC-CXR-JPG reader."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from fastmsd.data.mimic import extract_sections, read_mimic_cxr, report_text
from fastmsd.data.synthcxr import FINDINGS, ZEROSHOT_CLASSES, generate, render_image, write_report
from fastmsd.data.synthcxr.cohort import plan_studies, sample_attributes
from fastmsd.data.synthcxr.labels import FINDING_COLUMN
from fastmsd.data.synthcxr.writer import PARTIAL_MARKER

SMALL = dict(n_train=40, n_per_class=4, size=64, n_dicom=6, workers=1, progress=False)
KEYWORDS = {
    "Atelectasis": ("atelectasis", "collapse"),
    "Cardiomegaly": ("cardiomegaly", "heart", "cardiac", "cardiomediastinal"),
    "Consolidation": ("consolidation", "airspace opacification"),
    "Edema": ("edema", "congestion", "fluid overload"),
    "Pleural Effusion": ("effusion", "pleural fluid"),
    "Pneumothorax": ("pneumothorax", "pleural air"),
}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted((root / "files").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "set", seed=3, **SMALL)


def test_layout_and_counts(synth):
    split = _csv(synth / "mimic-cxr-2.0.0-split.csv")
    meta = _csv(synth / "mimic-cxr-2.0.0-metadata.csv")
    chex = _csv(synth / "mimic-cxr-2.0.0-chexpert.csv")
    assert [r["dicom_id"] for r in split] == [r["dicom_id"] for r in meta]
    assert {r["split"] for r in split} == {"train", "validate", "test"}
    assert sum(r["split"] == "train" for r in split) == SMALL["n_train"]
    assert {r["ViewPosition"] for r in meta} <= {"PA", "AP"}
    assert len(chex) == len({r["study_id"] for r in split})
    for r in split:
        dicom_id = r["dicom_id"]
        assert len(dicom_id.split("-")) == 5 and all(len(g) == 8 for g in dicom_id.split("-"))
        s = r["subject_id"]
        assert len(s) == 8
        folder = synth / "files" / f"p{s[:2]}" / f"p{s}"
        assert (folder / f"s{r['study_id']}.txt").is_file()
        with Image.open(folder / f"s{r['study_id']}" / f"{dicom_id}.jpg") as im:
            assert im.mode == "L" and im.size == (64, 64)


def test_splits_disjoint_by_patient(synth):
    by_split: dict[str, set[str]] = {}
    for r in _csv(synth / "mimic-cxr-2.0.0-split.csv"):
        by_split.setdefault(r["split"], set()).add(r["subject_id"])
    assert not by_split["train"] & by_split["validate"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["validate"] & by_split["test"]


def test_zeroshot_set_shows_exactly_its_class(synth):
    rows = _csv(synth / "synthcxr-5x200.csv")
    counts = {c: sum(r["label"] == c for r in rows) for c in ZEROSHOT_CLASSES}
    assert counts == {c: SMALL["n_per_class"] for c in ZEROSHOT_CLASSES}
    split = {r["dicom_id"]: r for r in _csv(synth / "mimic-cxr-2.0.0-split.csv")}
    chex = {r["study_id"]: r for r in _csv(synth / "mimic-cxr-2.0.0-chexpert.csv")}
    for r in rows:
        assert split[r["dicom_id"]]["split"] == "test"
        labels = chex[split[r["dicom_id"]]["study_id"]]
        column = FINDING_COLUMN[r["label"]]
        assert labels[column] == "1.0"
        others = [FINDING_COLUMN[f] for f in FINDINGS if f != r["label"]]
        assert all(labels[c] in ("", "0.0") for c in others)
    plan = plan_studies(3, SMALL["n_train"], SMALL["n_per_class"], SMALL["n_dicom"])
    for item in plan:
        if item["label"]:
            assert set(item["findings"]) - {"support_devices"} == {item["label"]}
            assert not item["findings"][item["label"]].get("uncertain")


def test_labels_agree_with_reports(synth):
    split = {r["study_id"]: r for r in _csv(synth / "mimic-cxr-2.0.0-split.csv")}
    for row in _csv(synth / "mimic-cxr-2.0.0-chexpert.csv"):
        s = row["subject_id"]
        text = (synth / "files" / f"p{s[:2]}" / f"p{s}" / f"s{row['study_id']}.txt").read_text()
        text = " ".join(text.lower().split())
        assert row["study_id"] in split
        for column, words in KEYWORDS.items():
            mentioned = any(w in text for w in words)
            if row[column] == "":
                assert not mentioned, (column, text)
            else:
                assert mentioned, (column, text)
            if row[column] == "-1.0":
                assert "possibl" in text or "may represent" in text
        positive = any(row[c] in ("1.0", "-1.0") for c in KEYWORDS)
        assert (row["No Finding"] == "1.0") == (not positive and row["Lung Opacity"] == ""
                                                and row["Pneumonia"] == "")


def test_report_grammar_uses_zero_shot_words():
    rng = np.random.default_rng(0)
    for name, word in [("atelectasis", "atelectasis"), ("cardiomegaly", "cardiomegaly"),
                       ("consolidation", "consolidation"), ("edema", "edema"),
                       ("pleural_effusion", "pleural effusion"), ("pneumothorax", "pneumothorax")]:
        hits = 0
        for _ in range(40):
            attrs = sample_attributes(name, rng, allow_uncertain=False)
            text, labels = write_report({name: attrs}, rng)
            assert labels[FINDING_COLUMN[name]] == 1.0
            hits += word in text.lower()
        assert hits >= 12, name
    text, labels = write_report({}, np.random.default_rng(1))
    assert labels["No Finding"] == 1.0 and "___" in text


def test_determinism(tmp_path, synth):
    again = generate(tmp_path / "again", seed=3, **{**SMALL, "workers": 2})
    assert _files(again) == _files(synth)
    for name in ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-chexpert.csv", "synthcxr-5x200.csv"):
        assert (again / name).read_bytes() == (synth / name).read_bytes()
    other = generate(tmp_path / "other", seed=4, **SMALL)
    assert (other / "mimic-cxr-2.0.0-split.csv").read_bytes() != \
        (synth / "mimic-cxr-2.0.0-split.csv").read_bytes()

    f = {"pleural_effusion": {"side": "left", "severity": "small"}}
    a = render_image(f, np.random.default_rng(7), 96)
    b = render_image(f, np.random.default_rng(7), 96)
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_image(f, np.random.default_rng(8), 96))
    assert write_report(f, np.random.default_rng(7)) == write_report(f, np.random.default_rng(7))


def test_idempotent_and_safe(tmp_path, synth):
    stamp = {p: p.stat().st_mtime_ns for p in synth.rglob("*")}
    t = time.perf_counter()
    assert generate(synth, seed=3, **SMALL) == synth
    assert time.perf_counter() - t < 0.5
    assert {p: p.stat().st_mtime_ns for p in synth.rglob("*")} == stamp
    with pytest.raises(FileExistsError):
        generate(synth, seed=5, **SMALL)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(foreign, **SMALL)

    # An interrupted attempt (marker written first, no synthcxr.json) is redone from scratch.
    partial = tmp_path / "partial"
    (partial / "files").mkdir(parents=True)
    (partial / "files" / "junk.jpg").write_bytes(b"x")
    (partial / PARTIAL_MARKER).write_text("")
    generate(partial, seed=3, **SMALL)
    assert (partial / "synthcxr.json").is_file() and not (partial / PARTIAL_MARKER).exists()
    assert not (partial / "files" / "junk.jpg").exists()
    assert _files(partial) == _files(synth)


def test_dicom_subset(synth):
    index = _csv(synth / "dicom" / "index.csv")
    assert len(index) == SMALL["n_dicom"]
    split = {r["dicom_id"]: r for r in _csv(synth / "mimic-cxr-2.0.0-split.csv")}
    kinds = set()
    for row in index:
        info = split[row["dicom_id"]]
        assert info["split"] == "test"
        ds = pydicom.dcmread(synth / row["path"])
        assert ds.Modality == "CR" and ds.PatientID == info["subject_id"]
        assert ds.BitsStored == 12 and ds.ViewPosition in ("PA", "AP")
        pixels = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) \
            + float(ds.RescaleIntercept)
        kinds.add(ds.PhotometricInterpretation)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = 4095.0 - pixels
        s = info["subject_id"]
        jpg = synth / "files" / f"p{s[:2]}" / f"p{s}" / f"s{info['study_id']}" \
            / f"{row['dicom_id']}.jpg"
        ref = np.asarray(Image.open(jpg), np.float32)
        assert np.corrcoef(pixels.ravel(), ref.ravel())[0, 1] > 0.97
        lung = pixels[20:36, 8:20].mean()           # patient's right mid lung
        mediastinum = pixels[20:36, 30:34].mean()
        assert lung < mediastinum
    assert len({row["dicom_id"] for row in index}) == len(index)
    assert kinds == {"MONOCHROME1", "MONOCHROME2"}


def _lung_band_width(img: np.ndarray) -> float:
    """Mean width (in image fractions) of the bright central band at heart level."""
    n = img.shape[0]
    lung = np.percentile(img[int(0.3 * n):int(0.5 * n), int(0.15 * n):int(0.85 * n)], 10)
    rows = img[int(0.6 * n):int(0.7 * n), int(0.1 * n):int(0.9 * n)].astype(np.float32)
    return float(((rows > lung + 0.5 * (rows.max() - lung)).mean(axis=1)).mean())


def test_images_show_findings():
    n = 12
    normal = [render_image({}, np.random.default_rng(i), 128) for i in range(n)]
    big = [render_image({"cardiomegaly": {"severity": "moderate"}}, np.random.default_rng(i), 128)
           for i in range(n)]
    assert np.mean([_lung_band_width(i) for i in big]) > \
        np.mean([_lung_band_width(i) for i in normal]) + 0.1

    def base_asymmetry(img: np.ndarray) -> float:
        # Image left is the patient's right.
        band = img[int(0.62 * 128):int(0.74 * 128)].astype(np.float32)
        return float(band[:, 16:44].mean() - band[:, 84:112].mean())

    right = [render_image({"pleural_effusion": {"side": "right", "severity": "moderate"}},
                          np.random.default_rng(i), 128) for i in range(n)]
    left = [render_image({"pleural_effusion": {"side": "left", "severity": "moderate"}},
                         np.random.default_rng(i), 128) for i in range(n)]
    base = np.mean([base_asymmetry(i) for i in normal])
    assert np.mean([base_asymmetry(i) for i in right]) > base + 20
    assert np.mean([base_asymmetry(i) for i in left]) < base - 20

    ptx = [render_image({"pneumothorax": {"side": "left", "severity": "large"}},
                        np.random.default_rng(i), 128) for i in range(n)]
    apex = (slice(28, 50), slice(92, 108))          # patient's left apex, lateral side
    assert np.mean([i[apex].mean() for i in ptx]) < np.mean([i[apex].mean() for i in normal])


def test_extract_sections():
    mimic = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.

 FINDINGS:

 The heart is mildly enlarged.   No effusion.

 IMPRESSION:

 Mild cardiomegaly.
"""
    assert extract_sections(mimic) == {"findings": "The heart is mildly enlarged. No effusion.",
                                       "impression": "Mild cardiomegaly."}
    only_impression = "INDICATION: fever\n\nCONCLUSION:\n  No acute process.\n"
    assert extract_sections(only_impression) == {"findings": "", "impression": "No acute process."}
    combined = "Findings:\n lungs clear.\nRECOMMENDATION(S): none\n"
    assert extract_sections(combined) == {"findings": "lungs clear.", "impression": ""}
    both = " FINDINGS AND IMPRESSION: No acute findings: lungs clear.\n NOTIFICATION: called"
    assert extract_sections(both)["findings"] == "No acute findings: lungs clear."
    inline = "PA and lateral. FINDINGS: Clear lungs. IMPRESSION: Normal."
    assert extract_sections(inline) == {"findings": "Clear lungs.", "impression": "Normal."}
    assert report_text(mimic) == "The heart is mildly enlarged. No effusion. Mild cardiomegaly."
    assert report_text("  WET READ: ___  no   pneumothorax ") == "WET READ: ___ no pneumothorax"


def test_reader_joins(synth, tmp_path):
    records = read_mimic_cxr(synth)
    split = _csv(synth / "mimic-cxr-2.0.0-split.csv")
    assert len(records) == len(split)
    assert records == sorted(records, key=lambda r: (r.subject_id, r.study_id, r.dicom_id))
    chex = {r["study_id"]: r for r in _csv(synth / "mimic-cxr-2.0.0-chexpert.csv")}
    for rec in records:
        assert rec.image_path.is_file() and rec.report_path.is_file()
        assert rec.view in ("PA", "AP")
        row = chex[rec.study_id]
        assert rec.labels["Cardiomegaly"] == (float(row["Cardiomegaly"])
                                              if row["Cardiomegaly"] else None)
        assert report_text(rec.report_path.read_text())
    with pytest.raises(FileNotFoundError, match="files"):
        read_mimic_cxr(tmp_path)
    (tmp_path / "files").mkdir()
    with pytest.raises(FileNotFoundError, match="split"):
        read_mimic_cxr(tmp_path)
