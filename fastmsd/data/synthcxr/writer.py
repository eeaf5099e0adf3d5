"""Writing a synthcxr set: JPEGs, ground-truth masks, reports and a DICOM subset per study, then
the MIMIC-CXR-JPG CSVs and the completion marker."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from ..masks import write_mask
from .cohort import plan_studies
from .labels import CHEXPERT_COLUMNS, ZEROSHOT_CLASSES
from .radiograph import render_with_masks
from .reports import write_report

VERSION = "1.0"

_SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
_META_FILE = "mimic-cxr-2.0.0-metadata.csv"
_CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv"
_ZEROSHOT_FILE = "synthcxr-5x200.csv"
DONE_MARKER = "synthcxr.json"
PARTIAL_MARKER = "synthcxr.partial"
_BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Everything generate writes at the top of its folder: all it may clear after an interruption.
_OWNED = {"files", "dicom", "masks", _SPLIT_FILE, _META_FILE, _CHEXPERT_FILE, _ZEROSHOT_FILE, DONE_MARKER,
          PARTIAL_MARKER}


def _relative_dir(item: dict) -> Path:
    s = item["subject_id"]
    return Path("files") / f"p{s[:2]}" / f"p{s}"


def _write_dicom(path: Path, img: np.ndarray, item: dict, seed: int, monochrome1: bool) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["synthcxr", str(seed), item["dicom_id"], kind])

    cr_storage = "1.2.840.10008.5.1.4.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = cr_storage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = cr_storage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "CR"
    ds.PatientID = item["subject_id"]
    ds.PatientName = "SYNTH^CXR"
    ds.StudyID = item["study_id"][-8:]
    ds.StudyDate = item["date"]
    ds.StudyTime = item["time"]
    ds.ViewPosition = item["view"]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, 0.0, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    values = np.round(img.astype(np.float32) * (4095.0 / 255.0)).astype(np.uint16)
    if monochrome1:
        # MONOCHROME1 stores inverted values: readers must invert to get dark lungs back.
        ds.PhotometricInterpretation = "MONOCHROME1"
        values = (4095 - values).astype(np.uint16)
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = values.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _render_items(root: str, seed: int, size: int, items: list[dict]) -> list[tuple[int, dict]]:
    """Worker body: write the JPEG, masks, report (and DICOM) of each item; return its labels."""
    out = []
    for item in items:
        # Generators seeded by (seed, item index): an item comes out the same whatever the
        # order or the number of worker processes.
        img_seq, rep_seq = np.random.SeedSequence(seed, spawn_key=(1, item["index"])).spawn(2)
        img, masks = render_with_masks(item["findings"], np.random.default_rng(img_seq), size)
        text, labels = write_report(item["findings"], np.random.default_rng(rep_seq),
                                    view=item["view"])
        folder = Path(root) / _relative_dir(item)
        study_dir = folder / f"s{item['study_id']}"
        study_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(study_dir / f"{item['dicom_id']}.jpg", quality=95)
        (folder / f"s{item['study_id']}.txt").write_text(text)
        for finding, mask in masks.items():
            write_mask(Path(root) / "masks" / finding / f"{item['dicom_id']}.png", mask)
        if item["dicom"]:
            _write_dicom(Path(root) / "dicom" / f"{item['dicom_id']}.dcm", img, item, seed,
                         item["dicom"] == "MONOCHROME1")
        out.append((item["index"], labels))
    return out


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    # Each worker must run single-threaded BLAS: with the default thread pool every process
    # spins on all cores and rendering gets ~8x slower. The thread count is read when numpy
    # loads, hence fresh (spawned) workers started with the variables set.
    saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
    os.environ.update(dict.fromkeys(_BLAS_THREAD_VARS, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _render_all(out: Path, seed: int, size: int, items: list[dict], workers: int,
                progress: bool) -> dict[int, dict]:
    """Write every item's files; returns each item's labels by index."""
    chunk = max(8, min(64, len(items) // (workers * 4) or 1))
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    labels: dict[int, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="synthcxr", unit="img")
    if workers == 1:
        for c in chunks:
            labels.update(_render_items(str(out), seed, size, c))
            if bar is not None:
                bar.update(len(c))
    else:
        with _single_threaded_blas(), \
                ProcessPoolExecutor(max_workers=workers,
                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_render_items, str(out), seed, size, c) for c in chunks]
            for fut in futures:
                res = fut.result()
                labels.update(res)
                if bar is not None:
                    bar.update(len(res))
    if bar is not None:
        bar.close()
    return labels


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _write_tables(out: Path, items: list[dict], labels: dict[int, dict], size: int) -> None:
    """The split, metadata, CheXpert and zero-shot CSVs, and the DICOM subset's index."""
    rows = sorted(items, key=lambda it: (it["subject_id"], it["study_id"], it["dicom_id"]))
    _write_csv(out / _SPLIT_FILE, ["dicom_id", "study_id", "subject_id", "split"],
               [[it["dicom_id"], it["study_id"], it["subject_id"], it["split"]] for it in rows])
    _write_csv(out / _META_FILE,
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"],
               [[it["dicom_id"], it["subject_id"], it["study_id"], proc, it["view"], str(size),
                 str(size), it["date"], it["time"], proc, view_meaning, orient]
                for it in rows
                for proc, view_meaning, orient in [
                    ("CHEST (PA AND LAT)", "postero-anterior", "Erect") if it["view"] == "PA"
                    else ("CHEST (PORTABLE AP)", "antero-posterior", "Recumbent")]])
    _write_csv(out / _CHEXPERT_FILE, ["subject_id", "study_id", *CHEXPERT_COLUMNS],
               [[it["subject_id"], it["study_id"],
                 *(_fmt(labels[it["index"]].get(c)) for c in CHEXPERT_COLUMNS)] for it in rows])
    _write_csv(out / _ZEROSHOT_FILE, ["dicom_id", "label"],
               [[it["dicom_id"], it["label"]] for it in rows if it["label"]])
    _write_csv(out / "dicom" / "index.csv", ["dicom_id", "path"],
               [[it["dicom_id"], f"dicom/{it['dicom_id']}.dcm"] for it in rows if it["dicom"]])


def _check_out_dir(out: Path, params: dict) -> bool:
    """True when ``out`` already holds this exact set; clears a partial earlier attempt."""
    marker = out / DONE_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text()).get("params")
        if done == params:
            return True
        raise FileExistsError(f"{out} holds a synthcxr set made with other parameters {done}")
    if out.exists() and any(out.iterdir()):
        names = {p.name for p in out.iterdir()}
        if not (out / PARTIAL_MARKER).is_file() or not names <= _OWNED:
            raise FileExistsError(f"{out} is not empty and holds no synthcxr set; refusing to "
                                  "write there")
        for name in names - {PARTIAL_MARKER}:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return False


def generate(out_dir: str | Path, *, seed: int = 0, n_train: int = 5000, n_per_class: int = 200,
             size: int = 256, n_dicom: int = 16, workers: int | None = None,
             progress: bool = True) -> Path:
    """Write a synthcxr set in the MIMIC-CXR-JPG layout under ``out_dir``; returns it.

    Returns at once when ``out_dir`` already holds a complete set with the same parameters;
    a partial earlier attempt is cleared and regenerated; any other non-empty folder (or a
    set made with other parameters) raises FileExistsError.
    """
    out = Path(out_dir)
    params = {"version": VERSION, "seed": seed, "n_train": n_train,
              "n_per_class": n_per_class, "size": size, "n_dicom": n_dicom}
    if _check_out_dir(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_MARKER).write_text("generation in progress or interrupted\n")
    (out / "dicom").mkdir(exist_ok=True)

    items = plan_studies(seed, n_train, n_per_class, n_dicom)
    labels = _render_all(out, seed, size, items, max(1, workers or os.cpu_count() or 1), progress)
    _write_tables(out, items, labels, size)

    counts = {s: sum(it["split"] == s for it in items) for s in ("train", "validate", "test")}
    info = {"generator": "synthcxr", "version": VERSION, "seed": seed, "params": params,
            "counts": counts, "n_subjects": len({it["subject_id"] for it in items}),
            "zeroshot": {c: n_per_class for c in ZEROSHOT_CLASSES}, "image_size": size,
            "orientation": "patient right on image left"}
    # The marker is written last and atomically: its presence means the set is complete.
    tmp = out / (DONE_MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / DONE_MARKER)
    (out / PARTIAL_MARKER).unlink()
    return out
