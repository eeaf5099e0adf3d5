"""Plain helpers that several test modules share (the fixtures stay in conftest.py).

Imported as ``from tests.helpers import ...``; the heavy imports (the engine and its model) wait
until a helper needs them, so that modules which only run the CLI do not pay for them.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent  # the repository root

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def rel_err(a, b) -> float:
    """Norm-wise relative error of tensor ``a`` against ``b``, computed in float64 (0 when both are 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_engine(cfg, seed=0):
    """A CPU Engine for ``cfg`` whose model is built after ``torch.manual_seed(seed)``."""
    import torch

    from fastmsd.engine import Engine
    from fastmsd.model import build_model

    torch.manual_seed(seed)
    return Engine(cfg, build_model(cfg.model, cfg.model.vocab_size), "cpu")


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m fastmsd ARGS`` in a subprocess, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "fastmsd", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result, *needles):
    """A user error: exit code 2 and one line on stderr, no traceback, naming every needle."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def cr_dataset(**attrs) -> Dataset:
    """A CR image's DICOM dataset without pixel data: file meta (explicit VR little endian), fresh
    SOP instance UID, Modality "CR", then ``attrs``. ``save_as(path, enforce_file_format=True)``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write_dicom(path: Path, pixels: np.ndarray | None) -> None:
    """A 12-bit MONOCHROME2 CR file holding ``pixels`` (none at all when None)."""
    ds = cr_dataset(PatientID=path.stem)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def rg1_files() -> dict[str, Path]:
    """pydicom-data's real radiographs by stem ("RG1_UNCR", "RG1_J2KR", ...); empty without it."""
    # find_spec, not pydicom.data.get_testdata_file: the latter goes to the network for missing files.
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return {p.stem: p for p in folder.glob("RG1_*.dcm")}
