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

from fastmsd import cli
from fastmsd.config import ConfigError
from fastmsd.data.cache import Cache
from fastmsd.data.prepare import prepare, report_sections
from fastmsd.data.synthcxr import generate
from fastmsd.data.text import tokenize
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


FINAL = " " * 33 + "FINAL REPORT\n"
# Report -> (findings, impression) as the manifest keeps them.
SHAPES = {
    FINAL + " FINDINGS: \n \n Small left pleural effusion.\n \n IMPRESSION: \n \n Effusion.\n":
        ("Small left pleural effusion.", "Effusion."),
    FINAL + " INDICATION:  Cough.\n \n IMPRESSION: \n \n No acute process.\n": ("", "No acute process."),
    FINAL + " FINDINGS:  Normal.\n \n IMPRESSION:  Right lower lobe pneumonia, follow up.\n":
        ("Normal.", "Right lower lobe pneumonia, follow up."),
    FINAL + " PORTABLE CHEST OF ___\n \n Lungs are clear.\n": ("Lungs are clear.", ""),
}
CHOSEN = {  # --text -> the text tokenized for each of SHAPES, in order
    "findings": ["Small left pleural effusion.", "No acute process.", "Normal.", "Lungs are clear."],
    "impression": ["Effusion.", "No acute process.", "Right lower lobe pneumonia, follow up.",
                   "Lungs are clear."],
    "both": ["Small left pleural effusion. Effusion.", "No acute process.",
             "Normal. Right lower lobe pneumonia, follow up.", "Lungs are clear."],
    "longest": ["Small left pleural effusion.", "No acute process.", "Right lower lobe pneumonia, follow up.",
                "Lungs are clear."],
}


@pytest.fixture(scope="module")
def shaped_root(tmp_path_factory) -> Path:
    """A tiny synthcxr set whose first studies carry the reports of SHAPES."""
    root = generate(tmp_path_factory.mktemp("shaped"), n_train=12, n_per_class=1, size=32, n_dicom=0,
                    workers=1, progress=False)
    for path, text in zip(sorted((root / "files").rglob("s*.txt")), SHAPES, strict=False):
        path.write_text(text)
    return root


def shaped_rows(cache: Cache) -> list[int]:
    """The cache rows of the SHAPES reports, in SHAPES order."""
    reports = sorted((Path(cache.info["params"]["root"]) / "files").rglob("s*.txt"))[:len(SHAPES)]
    return [next(i for i, row in enumerate(cache.rows) if row["study"] == p.stem[1:]) for p in reports]


@pytest.mark.parametrize("text", list(CHOSEN))
def test_text_choice_is_what_gets_tokenized(shaped_root, tmp_path, text):
    out = tmp_path / "cache"
    counts = prepare("synthcxr", shaped_root, out, size=16, workers=1, max_len=64, text=text, progress=False)
    assert counts["prepared"] + counts["rejected"] == counts["found"] and counts["rejected"] == 0
    cache = Cache(out)
    assert cache.text == text == cache.info["params"]["text"]
    rows = shaped_rows(cache)
    # The manifest keeps both sections whatever the choice.
    assert [(cache.rows[i]["findings"], cache.rows[i]["impression"]) for i in rows] == list(SHAPES.values())
    assert cache.texts(rows) == CHOSEN[text]
    tok = cache.tokenizer()
    ids, mask = cache.token_arrays(rows, 64)
    decoded = [tok.decode(ids[k][mask[k]].tolist(), skip_special_tokens=True) for k in range(len(rows))]
    assert decoded == [t.lower() for t in CHOSEN[text]]
    # Every row: the tokens are those of the text the cache says it trains on.
    every = list(range(len(cache.rows)))
    assert np.array_equal(cache.token_arrays(every, 64)[0], tokenize(tok, cache.texts(every), 64)[0])


def test_text_choice_is_checked_and_is_a_cache_parameter(shaped_root, tmp_path, capsys):
    out = tmp_path / "cache"
    with pytest.raises(ConfigError, match="unknown --text 'summary' .*findings, impression, both, longest"):
        prepare("synthcxr", shaped_root, out, size=16, workers=1, text="summary", progress=False)
    assert cli.main(["prepare", "synthcxr", "--root", str(shaped_root), "--out", str(out),
                     "--text", "summary", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown --text 'summary'" in err
    prepare("synthcxr", shaped_root, out, size=16, workers=1, max_len=24, progress=False)
    with pytest.raises(ConfigError, match="other parameters"):
        prepare("synthcxr", shaped_root, out, size=16, workers=1, max_len=24, text="longest", progress=False)

    # A cache prepared before the choice existed trains on both sections joined.
    info = json.loads((out / "prepare.json").read_text())
    del info["params"]["text"]
    (out / "prepare.json").write_text(json.dumps(info))
    cache = Cache(out)
    assert cache.text == "both" and cache.texts(shaped_rows(cache)) == CHOSEN["both"]
