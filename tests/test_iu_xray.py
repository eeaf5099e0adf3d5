"""The iu-xray reader (IU X-ray / Open-i NLMCXR): a hand-written copy of the layout, and the 3,955 real
report XML files that the torchxrayvision wheel ships."""

import html
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmsd.data.datasets import Reject, hash_split, read_dataset
from fastmsd.data.iu_xray import mesh_labels
from fastmsd.data.prepare import prepare, report_sections
from fastmsd.data.synthcxr import CHEXPERT_COLUMNS


def _png(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 128, np.uint8), mode="L").save(path)
    return path


def _section(label: str, text: str | None) -> str:
    if text is None:
        return f'            <AbstractText Label="{label}"/>\n'
    return f'            <AbstractText Label="{label}">{text}</AbstractText>\n'


def _report_xml(n: int, findings: str | None, impression: str | None, mesh: list[str],
                images: list[str]) -> str:
    """One report as ecgen-radiology/<n>.xml writes it (the elements the reader does not use trimmed)."""
    parents = "".join(
        f'   <parentImage id="{image}">\n      <figureId>F{i}</figureId>\n'
        f'      <caption>Xray Chest PA and Lateral</caption>\n      <panel type="single">\n'
        f'         <url>/hadoop/storage/radiology/extract/{image}.jpg</url>\n'
        f'         <imgModality>7</imgModality>\n      </panel>\n   </parentImage>\n'
        for i, image in enumerate(images, 1))
    majors = "".join(f"      <major>{term}</major>\n" for term in mesh)
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation>\n   <meta type="rr"/>\n   <uId id="CXR{n}"/>\n'
        f'   <pmcId id="{n}"/>\n   <docSource>CXR</docSource>\n   <IUXRId id="{n}"/>\n'
        '   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">\n'
        '      <Article PubModel="Electronic">\n'
        '         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>\n'
        '         <Abstract>\n'
        + _section("COMPARISON", "None.") + _section("INDICATION", "Cough")
        + _section("FINDINGS", findings) + _section("IMPRESSION", impression)
        + '         </Abstract>\n      </Article>\n   </MedlineCitation>\n'
        f'   <MeSH>\n{majors}      <automatic>Pleural Effusion</automatic>\n   </MeSH>\n'
        f'{parents}</eCitation>\n')


def _write(root: Path, n: int, *args, **kwargs) -> Path:
    path = root / "ecgen-radiology" / f"{n}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_report_xml(n, *args, **kwargs))
    return path


def _line(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _fixture(root: Path, images: str = "NLMCXR_png") -> dict[str, Path]:
    folder = root / images
    xml = {
        "two": _write(root, 1, "The heart is  enlarged.\n   Small right XXXX effusion.",
                      "Cardiomegaly &amp; effusion.",
                      ["Cardiomegaly/mild", "pleural effusion/Right/small ", "Opacity/ribs/left",
                       "Nodule/lung/lingula"], ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
        "no_findings": _write(root, 2, None, "Normal chest.", ["normal"], ["CXR2_IM-0652-1001"]),
        "neither": _write(root, 3, None, "  ", ["No Indexing"], ["CXR3_IM-1384-1001"]),
        "missing": _write(root, 10, "Clear lungs.", "No acute disease.", ["No Indexing"],
                          ["CXR10_IM-0002-1001"]),
        "no_image": _write(root, 11, "Clear lungs.", "Normal.", ["normal"], []),
    }
    malformed = '<?xml version="1.0"?>\n<eCitation>\n   <MeSH>\n</eCitation>\n'
    (root / "ecgen-radiology" / "12.xml").write_text(malformed)
    for image in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001", "CXR3_IM-1384-1001"):
        _png(folder / f"{image}.png")
    return xml


@pytest.mark.parametrize("images", ["NLMCXR_png", "images", "."])
def test_iu_xray(tmp_path, images):
    xml = _fixture(tmp_path, images)
    items, rejects = read_dataset("iu-xray", tmp_path, seed=3)
    by_id = {it.id: it for it in items}
    assert list(by_id) == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]
    first, second, normal = by_id.values()
    # One item per image, its report's text, labels and split.
    assert first.report == second.report == ("FINDINGS: The heart is enlarged. Small right ___ effusion.\n"
                                             "IMPRESSION: Cardiomegaly & effusion.")
    assert first.patient == first.study == "1" and first.view is None and first.dataset == "iu-xray"
    assert first.image == tmp_path / images / "CXR1_1_IM-0001-3001.png"  # pathlib drops a "." part
    assert first.split == second.split == hash_split("1", 3) and normal.split == hash_split("2", 3)
    positive = {"Cardiomegaly", "Pleural Effusion", "Lung Lesion"}  # Opacity of the ribs is no lung opacity
    assert first.labels == second.labels == {c: float(c in positive) for c in CHEXPERT_COLUMNS}
    assert normal.report == "IMPRESSION: Normal chest."
    assert normal.labels == {c: float(c == "No Finding") for c in CHEXPERT_COLUMNS}
    assert report_sections(first.report) == ("The heart is enlarged. Small right ___ effusion.",
                                              "Cardiomegaly & effusion.")
    assert report_sections(normal.report) == ("", "Normal chest.")
    assert rejects == [
        Reject(f"ecgen-radiology/3.xml:{_line(xml['neither'], 'parentImage')}",
                         "report has no FINDINGS or IMPRESSION text"),
        Reject(f"ecgen-radiology/10.xml:{_line(xml['missing'], 'parentImage')}",
                         f"image file not found: {tmp_path / images / 'CXR10_IM-0002-1001.png'}"),
        Reject("ecgen-radiology/11.xml", "report names no image (no parentImage element)"),
        Reject("ecgen-radiology/12.xml:4", "malformed XML: mismatched tag"),
    ]


def test_iu_xray_splits_follow_the_report_and_seed(tmp_path):
    images = [[f"CXR{n}_IM-{n:04d}-{k}001" for k in (1, 2, 3)] for n in range(1, 41)]
    for n, names in enumerate(images, 1):
        _write(tmp_path, n, "Clear.", "Normal.", ["normal"], names)
        for name in names:
            _png(tmp_path / "NLMCXR_png" / f"{name}.png", 2)
    for seed in (0, 1):
        items, rejects = read_dataset("iu-xray", tmp_path, seed=seed)
        assert len(items) == 120 and not rejects
        splits = {it.patient: {i.split for i in items if i.patient == it.patient} for it in items}
        assert all(s == {hash_split(p, seed)} for p, s in splits.items())
        assert {it.split for it in items} == {"train", "validate", "test"}


def test_mesh_labels():
    def positives(*terms: str) -> set[str]:
        return {c for c, v in mesh_labels(list(terms)).items() if v == 1.0}

    assert positives("normal") == {"No Finding"}
    assert positives("Lung/hypoinflation", "Spine/degenerative", "No Indexing",
                     "Technical Quality of Image Unsatisfactory ") == set()
    assert positives("Cardiac Shadow/enlarged/mild", "Cardiac Shadow/obscured") == {"Cardiomegaly"}
    assert positives("Mediastinum/prominent", "Pulmonary Congestion/mild", "Heart Failure") \
        == {"Enlarged Cardiomediastinum", "Edema"}
    assert positives("Opacity/lung/base/left", "Density/ribs/left") == {"Lung Opacity"}
    assert positives("Density/retrocardiac", "Mass/breast/large", "Cavitation/lung/apex/right") \
        == {"Lung Opacity", "Lung Lesion"}
    assert positives("Hydropneumothorax/right", "Thickening/pleura/apex", "Fractures, Bone/ribs/healed") \
        == {"Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture"}
    assert positives("Catheters, Indwelling/right", "Surgical Instruments/mediastinum") == {"Support Devices"}
    assert positives("Pulmonary  Atelectasis/base", "CONSOLIDATION/lung", "Pneumonia/lower lobe") \
        == {"Atelectasis", "Consolidation", "Pneumonia"}
    assert mesh_labels(["No Indexing"]) == mesh_labels([]) == {c: None for c in CHEXPERT_COLUMNS}
    assert set(mesh_labels(["normal"])) == set(CHEXPERT_COLUMNS)


def test_iu_xray_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ecgen-radiology"):
        read_dataset("iu-xray", tmp_path)
    _write(tmp_path, 1, "Clear.", "Normal.", ["normal"], ["CXR1_1_IM-0001-3001"])
    with pytest.raises(FileNotFoundError, match="NLMCXR_png"):
        read_dataset("iu-xray", tmp_path)


def test_iu_xray_prepare(tmp_path):
    root = tmp_path / "raw"
    _fixture(root)
    out = tmp_path / "cache"
    counts = prepare("iu-xray", root, out, size=16, workers=1, max_len=32, vocab_size=200, progress=False)
    assert counts == {"found": 7, "prepared": 3, "rejected": 4}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]
    assert rows[0]["findings"] == "The heart is enlarged. Small right ___ effusion."
    assert rows[0]["impression"] == "Cardiomegaly & effusion."
    assert (rows[2]["findings"], rows[2]["impression"]) == ("", "Normal chest.")
    assert rows[0]["split"] == rows[1]["split"] and rows[0]["labels"]["Cardiomegaly"] == 1.0
    assert all(r["dataset"] == "iu-xray" and r["patient"] == r["study"] and r["view"] is None for r in rows)
    assert all(min(r["height"], r["width"]) == 16 and (out / r["image"]).is_file() for r in rows)
    assert np.load(out / "tokens.npy").shape == (3, 32)
    assert len((out / "rejects.csv").read_text().splitlines()) == 1 + 4


# --------------------------------------------------------------------------- the real reports

WHEEL = "torchxrayvision==1.5.7"
# The wheel's copy of NLMCXR_reports.tgz (CC BY-NC-ND 4.0): read at test time, never committed.
REPORTS_TGZ = "torchxrayvision/data/NLMCXR_reports.tgz"


def _wheel() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastmsd-tests"
    found = sorted(cache.glob("torchxrayvision-1.5.7-*.whl"))
    if found:
        return found[0]
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "--retries", "1", WHEEL, "-d", str(cache)],
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"could not download {WHEEL} for its real IU X-ray reports: {err}")
    found = sorted(cache.glob("torchxrayvision-1.5.7-*.whl"))
    if done.returncode != 0 or not found:
        pytest.skip(f"could not download {WHEEL} for its real IU X-ray reports (no network?): "
                    f"{' | '.join(done.stderr.strip().splitlines()[-2:])}")
    return found[0]


@pytest.fixture(scope="module")
def real_root(tmp_path_factory) -> Path:
    """The real reports, each parentImage with a 1x1 PNG (about 5 s with the wheel cached)."""
    root = tmp_path_factory.mktemp("iu-xray")
    with zipfile.ZipFile(_wheel()) as wheel, tarfile.open(fileobj=io.BytesIO(wheel.read(REPORTS_TGZ))) as tgz:
        tgz.extractall(root, filter="data")
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    (root / "NLMCXR_png").mkdir()
    for path in (root / "ecgen-radiology").glob("*.xml"):
        for image in re.findall(r'<parentImage id="([^"]+)"', path.read_text()):
            (root / "NLMCXR_png" / f"{image}.png").write_bytes(buf.getvalue())
    return root


def _raw_section(xml: str, label: str) -> str:
    m = re.search(rf'<AbstractText Label="{label}">([^<]*)</AbstractText>', xml)
    return " ".join(html.unescape(m.group(1)).split()) if m else ""


def test_iu_xray_real_reports(real_root):
    raw = {p.stem: p.read_text() for p in (real_root / "ecgen-radiology").glob("*.xml")}
    assert len(raw) == 3955
    items, rejects = read_dataset("iu-xray", real_root)
    # Every report gives items or rejects; every image of it is an item or a reject.
    reject_reports = [re.fullmatch(r"ecgen-radiology/(\d+)\.xml(:\d+)?", r.source).group(1) for r in rejects]
    assert {it.patient for it in items} | set(reject_reports) == set(raw)
    assert not [r for r in rejects if r.reason.startswith("malformed")]
    n_images = {n: len(re.findall(r"<parentImage ", xml)) for n, xml in raw.items()}
    per_report = {n: 0 for n in raw}
    for report in [it.patient for it in items] + reject_reports:
        per_report[report] += 1
    assert per_report == {n: max(k, 1) for n, k in n_images.items()}
    assert len(items) + len(rejects) == sum(n_images.values()) + sum(k == 0 for k in n_images.values())

    # Section counts: the reader's against a regex over the raw XML.
    findings = {n for n, xml in raw.items() if _raw_section(xml, "FINDINGS")}
    impression = {n for n, xml in raw.items() if _raw_section(xml, "IMPRESSION")}
    assert (len(findings), len(impression)) == (3425, 3921)
    with_images = {n for n, k in n_images.items() if k}
    reports = {it.patient: it.report for it in items}
    assert {n for n, text in reports.items() if text.startswith("FINDINGS: ")} == findings & with_images
    assert {n for n, text in reports.items() if "IMPRESSION: " in text} == impression & with_images
    assert set(reports) == (findings | impression) & with_images
    having = {"FINDINGS": findings, "IMPRESSION": impression}
    for n, text in reports.items():
        expected = [f"{label}: {re.sub('X{4,}', '___', _raw_section(raw[n], label))}"
                    for label, reports_with in having.items() if n in reports_with]
        assert text.splitlines() == expected, n
    # prepare's sectioning finds both sections of every report.
    sectioned = {n: report_sections(text) for n, text in reports.items()}
    assert {n for n, (f, _) in sectioned.items() if f} == findings & with_images
    assert {n for n, (_, i) in sectioned.items() if i} == impression & with_images

    # Splits by report; labels against the MeSH terms in the raw XML.
    assert all(it.split == hash_split(it.patient, 0) for it in items)
    for it in items:
        majors = re.findall(r"<major>([^<]*)</major>", raw[it.patient])
        assert (it.labels["No Finding"] == 1.0) == (majors == ["normal"]), it.patient
        cardiomegaly = any(re.match(r"(Cardiomegaly|Cardiac Shadow/enlarged)", m) for m in majors)
        assert (it.labels["Cardiomegaly"] == 1.0) == cardiomegaly, it.patient
        assert (it.labels["Atelectasis"] is None) == (majors == ["No Indexing"]), it.patient
