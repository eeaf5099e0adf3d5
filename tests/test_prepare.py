"""`fastmsd prepare`: cache contents, resumability, rejects with reasons, the real RG1 radiograph."""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from fastmsd.data.cache import Cache
from fastmsd.data.prepare import prepare, report_sections
from fastmsd.data.synthcxr import generate
from tests.helpers import rg1_files, write_dicom


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rejects(out: Path) -> dict[str, str]:
    with (out / "rejects.csv").open(newline="") as f:
        return {row["source"]: row["reason"] for row in csv.DictReader(f)}


def test_synthcxr_cache_is_complete_resumable_and_idempotent(synth_root, tmp_path):
    out = tmp_path / "cache"
    counts = prepare("synthcxr", synth_root, out, size=48, workers=1, max_len=32, progress=False)
    assert counts["prepared"] == counts["found"] > 600 and counts["rejected"] == 0
    cache = Cache(out)
    assert len(cache.rows) == counts["prepared"] and cache.tokens.shape == (len(cache.rows), 32)
    row = cache.rows[0]
    assert row["findings"] or row["impression"]
    assert min(row["height"], row["width"]) == 48
    with Image.open(out / row["image"]) as im:
        assert im.mode == "L" and min(im.size) == 48
    ids, mask = cache.token_arrays(cache.indices("train")[:4], 16)
    tok = cache.tokenizer()
    assert ids.shape == (4, 16) and bool(mask[:, 0].all())
    assert tok.convert_ids_to_tokens(int(ids[0, 0])) == "[CLS]"
    assert all(tok.convert_ids_to_tokens(int(ids[i, int(mask[i].sum()) - 1])) == "[SEP]" for i in range(4))
    before = {name: digest(out / name) for name in ("manifest.jsonl", "tokens.npy", "rejects.csv")}

    # Interrupted run: three images and their log lines gone, no completion marker.
    lines = (out / "progress.jsonl").read_text().splitlines()
    for line in lines[-3:]:
        (out / json.loads(line)["image"]).unlink()
    (out / "progress.jsonl").write_text("\n".join(lines[:-3]) + '\n{"id": "torn')
    (out / "prepare.json").unlink()
    with pytest.raises(Exception, match="not a complete prepared cache"):
        Cache(out)
    assert prepare("synthcxr", synth_root, out, size=48, workers=1, max_len=32, progress=False) == counts
    redone = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert len(redone) == len(lines)  # the torn line dropped, the three items done again
    assert {name: digest(out / name) for name in before} == before
    # Finished: preparing again changes nothing.
    assert prepare("synthcxr", synth_root, out, size=48, workers=1, max_len=32, progress=False) == counts
    assert {name: digest(out / name) for name in before} == before


def test_report_sections_normalise_whitespace_and_blanks():
    text = "FINAL REPORT\n INDICATION: ___ with cough.\n FINDINGS:  Heart   size\n normal, per Dr. _____.\n" \
           " IMPRESSION:\n No acute process."
    assert report_sections(text) == ("Heart size normal, per Dr. ___.", "No acute process.")


def test_bad_inputs_are_rejected_with_reasons_and_nothing_is_lost(tmp_path):
    root = generate(tmp_path / "raw", n_train=20, n_per_class=1, size=32, n_dicom=0, workers=1,
                    progress=False)
    images = sorted((root / "files").rglob("*.jpg"))
    zero, truncated, text, empty_report, latin1_report, missing = images[:6]
    zero.write_bytes(b"")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    text.write_text("this is not an image")
    empty_report.parent.with_suffix(".txt").write_text("   \n")
    latin1_report.parent.with_suffix(".txt").write_bytes("FINDINGS: Pleural effusion \xe9.".encode("latin-1"))
    missing.unlink()

    out = tmp_path / "cache"
    counts = prepare("synthcxr", root, out, size=32, workers=2, progress=False)
    reasons = rejects(out)
    assert counts["rejected"] == len(reasons) == 6
    assert counts["prepared"] + counts["rejected"] == counts["found"] == len(images)

    def reason(path: Path) -> str:
        return next(r for source, r in reasons.items() if path.name in source)

    assert reason(zero).startswith("empty file")
    assert reason(truncated).startswith("truncated or corrupt image")
    assert reason(text).startswith("not an image")
    assert reason(empty_report) == "empty report"
    assert reason(latin1_report).startswith("report is not UTF-8")
    assert reason(missing).startswith("image file not found")
    prepared = {row["id"] for row in Cache(out).rows}
    assert len(prepared) == counts["prepared"] and not any(p.stem in prepared for p in images[:6])


def rsna_layout(root: Path, dicoms: dict[str, Path | np.ndarray | None]) -> Path:
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    with (root / "stage_2_train_labels.csv").open("w") as f:
        f.write("patientId,x,y,width,height,Target\n")
        for pid, source in dicoms.items():
            f.write(f"{pid},,,,,0\n")
            if isinstance(source, Path):
                shutil.copyfile(source, images / f"{pid}.dcm")
            else:
                write_dicom(images / f"{pid}.dcm", source)
    return root


def test_dicom_without_pixel_data_is_rejected(tmp_path):
    pixels = (np.arange(64 * 80).reshape(64, 80) % 4096).astype(np.uint16)
    root = rsna_layout(tmp_path / "rsna", {"good": pixels, "nopixels": None})
    out = tmp_path / "cache"
    counts = prepare("rsna-pneumonia", root, out, size=32, workers=1, progress=False)
    assert counts == {"found": 2, "prepared": 1, "rejected": 1}
    assert list(rejects(out).values()) == ["DICOM without pixel data"]
    assert not Cache(out).has_reports


@pytest.mark.skipif(not {"RG1_UNCR", "RG1_J2KR"} <= rg1_files().keys(), reason="pydicom-data not installed")
def test_real_radiograph_prepares_identically_from_each_lossless_encoding(tmp_path):
    files = rg1_files()
    assert pydicom.dcmread(files["RG1_J2KR"]).PhotometricInterpretation == "MONOCHROME1"
    root = rsna_layout(tmp_path / "rsna", {"uncompressed": files["RG1_UNCR"], "j2k": files["RG1_J2KR"]})
    out = tmp_path / "cache"
    assert prepare("rsna-pneumonia", root, out, size=256, workers=2, progress=False)["prepared"] == 2
    a, b = (np.asarray(Image.open(out / "images" / f"{name}.jpg")) for name in ("uncompressed", "j2k"))
    assert np.array_equal(a, b)
    # Correctly oriented: lungs dark, mediastinum bright (MONOCHROME1 inverted, not shown raw).
    h, w = a.shape
    rows = slice(h // 4, h // 2)
    centre = a[rows, int(w * 0.45) : int(w * 0.55)].mean()
    left, right = a[rows, int(w * 0.15) : int(w * 0.3)].mean(), a[rows, int(w * 0.7) : int(w * 0.85)].mean()
    assert centre > left + 20 and centre > right + 20, (centre, left, right)
