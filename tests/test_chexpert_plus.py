"""The chexpert-plus reader on fixtures in the CheXpert Plus release layout, and through ``prepare``."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmsd.data.cache import Cache
from fastmsd.data.datasets import Reject, read_dataset
from fastmsd.data.prepare import prepare
from fastmsd.data.synthcxr import CHEXPERT_COLUMNS

# df_chexpert_plus_240401.csv's 27 columns, in the release's order.
HEADER = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
          "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
          "section_history", "section_comparison", "section_technique", "section_procedure_comments",
          "section_findings", "section_impression", "section_end_of_impression", "section_summary",
          "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
          "insurance_type", "recent_bmi", "deceased", "split"]
CSV_NAME = "df_chexpert_plus_240401.csv"


def row(path: str, findings: str, impression: str, split: str = "train", frontal: bool = True,
        ap_pa: str = "AP") -> list[str]:
    values = dict.fromkeys(HEADER, "")
    values.update(path_to_image=path, path_to_dcm=path.replace(".jpg", ".dcm"),
                  frontal_lateral="Frontal" if frontal else "Lateral", ap_pa=ap_pa,
                  deid_patient_id=path.split("/")[1] if path.count("/") >= 3 else "",
                  patient_report_date_order="1",
                  report=f"NARRATIVE: Chest 1 view. FINDINGS: {findings} IMPRESSION: {impression}",
                  section_narrative="Chest 1 view.", section_clinical_history="Cough.",
                  section_comparison="None.", section_findings=findings, section_impression=impression,
                  section_end_of_impression="I have personally reviewed the images.",
                  section_accession_number="123", age="61.0", sex="Female", race="White",
                  ethnicity="Non-Hispanic/Non-Latino", interpreter_needed="No",
                  insurance_type="Private Insurance", recent_bmi="22.2", deceased="No", split=split)
    return [values[c] for c in HEADER]


def write_csv(root: Path, rows: list[list[str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / CSV_NAME, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)


def write_labels(root: Path, name: str, entries: dict[str, dict[str, object]], extra: str = "") -> None:
    folder = root / "chexbert_labels"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"path_to_image": path, **dict.fromkeys(CHEXPERT_COLUMNS), **labels})
             for path, labels in entries.items()]
    (folder / name).write_text("\n".join(lines) + "\n" + extra)


def image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 20), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


P1 = "train/patient00001/study1/view1_frontal.jpg"
P1_LATERAL = "train/patient00001/study1/view2_lateral.jpg"
P2 = "train/patient00002/study1/view1_frontal.jpg"
P3 = "valid/patient64541/study1/view1_frontal.jpg"
P4 = "train/patient00004/study2/view1_frontal.jpg"
NO_SECTION, MISSING, BAD_SPLIT, BAD_LABEL = (f"train/patient0001{i}/study1/view1_frontal.jpg"
                                              for i in range(4))


def layout(root: Path) -> Path:
    rows = [
        # Lines 2-4: the findings' line break is in section_findings and in report.
        row(P1, "Heart size normal.\nNo effusion.", "No acute process."),
        row(P1_LATERAL, "Heart size normal.", "No acute process.", frontal=False, ap_pa="LL"),
        row(P2, "Small left effusion.", "", ap_pa="PA"),                       # findings only
        row(P3, "", "Mild pulmonary edema.", split="valid"),                    # impression only
        row(P4, "LUNGS: Clear.\nHEART: Normal size.", "Normal chest."),        # lines 8-10; no labels
        row(NO_SECTION, "", " "),                                              # line 11
        row(MISSING, "Clear lungs.", "Normal."),                               # line 12
        row(BAD_SPLIT, "Clear lungs.", "Normal.", split="test"),               # line 13
        row("view1_frontal.jpg", "Clear lungs.", "Normal."),                   # line 14
        row(BAD_LABEL, "Clear lungs.", "Edema."),                              # line 15
        row(P2, "Small left effusion.", "")[:-1],                              # line 16: a field short
    ]
    write_csv(root, rows)
    write_labels(root, "impression_fixed.json", {
        P1: {"Atelectasis": -1.0, "Cardiomegaly": -1.0, "Pleural Effusion": 1.0, "No Finding": None},
        P1_LATERAL: {"Pleural Effusion": 1.0},
        P3: {"Edema": 1.0},
        BAD_LABEL: {"Edema": 2.0},
    }, extra="{not json\n")
    write_labels(root, "findings_fixed.json", {
        P1: {"No Finding": 1.0},          # the impression's labels win for a report with one
        P2: {"Pleural Effusion": 1.0, "Edema": 0.0},
    })
    for rel in (P1, P1_LATERAL, P3, P4, NO_SECTION, BAD_SPLIT, BAD_LABEL):
        image(root / "PNG" / Path(rel).with_suffix(".png"))
    image(root / P1)                      # a JPEG beside the PNG: the PNG is taken
    image(root / P2)                      # only the original JPEG
    return root


def test_sections_labels_splits_and_rejects(tmp_path):
    root = layout(tmp_path / "chexpertplus")
    items, rejects = read_dataset("chexpert-plus", root)
    by_id = {it.id: it for it in items}
    assert [it.id for it in items] == [
        "patient00001_study1_view1_frontal", "patient00002_study1_view1_frontal",
        "patient00004_study2_view1_frontal", "patient64541_study1_view1_frontal"]
    assert rejects == [
        Reject("chexbert_labels/impression_fixed.json:5",
               "malformed line: expected a JSON object with path_to_image, got '{not json'"),
        Reject(f"{CSV_NAME}:11", "no findings or impression section"),
        Reject(f"{CSV_NAME}:12", "image file not found: "
                                f"{root / 'PNG' / Path(MISSING).with_suffix('.png')} (nor {root / MISSING})"),
        Reject(f"{CSV_NAME}:13", "unknown split 'test', expected train or valid"),
        Reject(f"{CSV_NAME}:14", "unexpected path_to_image 'view1_frontal.jpg', expected "
                                 "<split>/<patient>/<study>/<view>.jpg"),
        Reject(f"{CSV_NAME}:15", "label 'Edema' has value 2.0, expected 1, 0, -1 or blank"),
        Reject(f"{CSV_NAME}:16", "malformed row: its number of fields differs from the header's"),
    ]
    first = by_id["patient00001_study1_view1_frontal"]
    assert first.report == "FINDINGS: Heart size normal. No effusion.\nIMPRESSION: No acute process."
    assert first.image == root / "PNG" / "train/patient00001/study1/view1_frontal.png"
    assert (first.split, first.view, first.patient, first.study, first.dataset) == (
        "train", "AP", "patient00001", "patient00001_study1", "chexpert-plus")
    assert first.labels["Atelectasis"] == 1.0 and first.labels["Cardiomegaly"] == 0.0   # uncertain
    assert first.labels["Pleural Effusion"] == 1.0 and first.labels["No Finding"] == 0.0
    findings_only = by_id["patient00002_study1_view1_frontal"]
    assert findings_only.report == "FINDINGS: Small left effusion."
    assert findings_only.image == root / P2 and findings_only.view == "PA"
    assert findings_only.labels["Pleural Effusion"] == 1.0 and findings_only.labels["Edema"] == 0.0
    valid = by_id["patient64541_study1_view1_frontal"]
    assert valid.report == "IMPRESSION: Mild pulmonary edema."
    assert (valid.split, valid.labels["Edema"]) == ("validate", 1.0)
    assert set(by_id["patient00004_study2_view1_frontal"].labels.values()) == {None}
    assert list(first.labels) == list(CHEXPERT_COLUMNS)

    all_views, _ = read_dataset("chexpert-plus", root, frontal_only=False)
    lateral = {it.id: it for it in all_views}["patient00001_study1_view2_lateral"]
    assert lateral.view == "LATERAL" and lateral.labels["Pleural Effusion"] == 1.0
    assert len(all_views) == len(items) + 1


def test_without_labels_items_are_unlabelled_and_missing_files_are_named(tmp_path):
    root = tmp_path / "chexpertplus"
    write_csv(root, [row(P1, "Heart size normal.", "No acute process.")])
    image(root / "PNG" / Path(P1).with_suffix(".png"))
    items, rejects = read_dataset("chexpert-plus", root)
    assert rejects == [] and len(items) == 1
    assert items[0].labels == dict.fromkeys(CHEXPERT_COLUMNS)

    write_labels(root, "impression_fixed.json", {P1: {"Edema": 1.0}})
    with pytest.raises(FileNotFoundError, match="findings_fixed.json"):
        read_dataset("chexpert-plus", root)
    (root / CSV_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CSV_NAME):
        read_dataset("chexpert-plus", root)


def test_prepare_end_to_end_with_tokens(tmp_path):
    root = layout(tmp_path / "chexpertplus")
    out = tmp_path / "cache"
    counts = prepare("chexpert-plus", root, out, size=16, workers=1, vocab_size=200, max_len=24,
                     progress=False)
    assert counts == {"found": 11, "prepared": 4, "rejected": 7}   # the frontal rows and a label line
    assert counts["found"] == counts["prepared"] + counts["rejected"]
    cache = Cache(out)
    rows = {r["id"]: r for r in cache.rows}
    first = rows["patient00001_study1_view1_frontal"]
    assert first["findings"] == "Heart size normal. No effusion."
    assert first["impression"] == "No acute process."
    assert first["labels"]["Pleural Effusion"] == 1.0 and first["split"] == "train"
    findings_only = rows["patient00002_study1_view1_frontal"]
    assert (findings_only["findings"], findings_only["impression"]) == ("Small left effusion.", "")
    assert rows["patient64541_study1_view1_frontal"]["impression"] == "Mild pulmonary edema."
    # A capitalised "HEART:" opening a line of the findings stays findings text.
    assert rows["patient00004_study2_view1_frontal"]["findings"] == "LUNGS: Clear. HEART: Normal size."
    assert min(first["height"], first["width"]) == 16
    assert cache.tokens.shape == (4, 24) and (out / "tokenizer" / "vocab.txt").is_file()
    lengths = np.load(out / "lengths.npy")
    assert lengths.shape == (4,) and (lengths > 2).all()
    tok = cache.tokenizer()
    i = list(rows).index("patient00001_study1_view1_frontal")
    words = tok.decode(cache.tokens[i, : int(lengths[i])].tolist(), skip_special_tokens=True)
    assert "heart" in words and "acute" in words
