import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    MPEG2MPML,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from fastmsd.data.images import RejectError, dicom_to_uint8, read_image, resize_shorter, to_uint8
from tests.helpers import cr_dataset, rg1_files

RG1 = rg1_files()
needs_rg1 = pytest.mark.skipif("RG1_UNCR" not in RG1,
                               reason="pydicom-data (data_store/data/RG1_*.dcm) not installed")


def _dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
             **attrs) -> Dataset:
    ds = cr_dataset()
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _write(path: Path, ds: Dataset) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, scaled to 0..255 and rounded."""
    frac = (np.asarray(x, dtype=np.float64) - (center - 0.5)) / (width - 1) + 0.5
    return np.rint(np.clip(frac, 0.0, 1.0) * 255).astype(np.uint8)


# --- the real radiograph ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rg1() -> dict[str, np.ndarray]:
    return {name: read_image(RG1[f"RG1_{name}"]) for name in ("UNCR", "J2KR", "UNCI", "J2KI")}


@needs_rg1
def test_rg1_lossless_encodings_agree_and_lossy_is_close(rg1):
    # UNCR/J2KR are the lossless pair; UNCI is NOT a lossless original but the lossy J2KI image
    # stored uncompressed (pydicom-data naming), so it pairs with J2KI.
    assert rg1["UNCR"].dtype == np.uint8 and rg1["UNCR"].shape == (1955, 1841)
    assert np.array_equal(rg1["UNCR"], rg1["J2KR"])
    # <= 1: another OpenJPEG version may round the lossy wavelet differently.
    assert np.abs(rg1["UNCI"].astype(int) - rg1["J2KI"]).max() <= 1
    lossy_diff = np.abs(rg1["J2KI"].astype(int) - rg1["J2KR"])
    assert not np.array_equal(rg1["J2KI"], rg1["J2KR"])
    assert lossy_diff.mean() < 1.0  # measured 0.43 (max 3)


@needs_rg1
def test_rg1_orientation_lungs_dark_mediastinum_bright(rg1):
    img = rg1["UNCR"].astype(np.float64)
    h, w = img.shape
    mediastinum = img[int(0.35 * h):int(0.65 * h), int(0.425 * w):int(0.575 * w)].mean()
    left_lung = img[int(0.25 * h):int(0.55 * h), int(0.08 * w):int(0.30 * w)].mean()
    right_lung = img[int(0.25 * h):int(0.55 * h), int(0.70 * w):int(0.92 * w)].mean()
    # Measured with the stored window (WC 15000 / WW 30000, MONOCHROME1 inverted):
    # mediastinum 219.4, left lung field 171.1, right lung field 171.0. Not inverting MONOCHROME1
    # would give about 36 vs 84: the sign of this difference is the orientation check.
    assert mediastinum > left_lung + 30
    assert mediastinum > right_lung + 30


# --- synthetic DICOMs ---------------------------------------------------------------------------

# 12-bit stored values; with slope 2 / intercept -1000 the modality values are 2p - 1000.
STORED_12 = np.array([[0, 1000, 1100, 1260], [1500, 1750, 4095, 1400]], dtype=np.uint16)
# First window: center 1500.5, width 1001 -> c' = 1500, w' = 1000, i.e. values 1000..2000 -> 0..255.
# Modality values [[-1000, 1000, 1200, 1520], [2000, 2500, 7190, 1800]]:
EXPECTED_12 = np.array([[0, 0, 51, 133], [255, 255, 255, 204]], dtype=np.uint8)


def test_12bit_rescale_and_first_window_exact(tmp_path):
    ds = _dataset(STORED_12, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000,
                  WindowCenter=[1500.5, 40], WindowWidth=[1001, 80])
    out = read_image(_write(tmp_path / "a.dcm", ds))
    assert out.dtype == np.uint8
    assert np.array_equal(out, EXPECTED_12)


def test_monochrome1_with_inverted_stored_values_gives_same_image(tmp_path):
    # Stored s = 4095 - p -> modality 6190 - x; the same tissue window is 4190..5190 there.
    ds = _dataset((4095 - STORED_12).astype(np.uint16), "MONOCHROME1", bits_stored=12,
                  RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=4690.5, WindowWidth=1001)
    assert np.array_equal(read_image(_write(tmp_path / "m1.dcm", ds)), EXPECTED_12)


@pytest.mark.parametrize(
    "dtype, bits_stored, center",
    [(np.uint8, 8, 130), (np.uint16, 16, 40000), (np.int16, 12, -300), (np.int16, 16, -20000)],
    ids=["8bit", "16bit", "signed12", "signed16"],
)
def test_bit_depths_and_signedness(tmp_path, dtype, bits_stored, center):
    info = np.iinfo(dtype)
    lo = max(info.min, -(2 ** (bits_stored - 1)) if info.min < 0 else 0)
    hi = min(info.max, 2 ** (bits_stored - 1) - 1 if info.min < 0 else 2**bits_stored - 1)
    # The full stored range (its extremes exercise the signed/unsigned decoding) plus every value
    # around the window, where the ramp of the formula is.
    ramp = np.linspace(lo, hi, 1024).round()
    near = np.clip(np.arange(center - 64, center + 64), lo, hi)
    stored = np.concatenate([ramp, near]).astype(dtype).reshape(-1, 64)
    # Width 98 (w' = 97): 255 k / 97 is never a .5 tie, so rounding is unambiguous.
    ds = _dataset(stored, bits_stored=bits_stored, WindowCenter=center, WindowWidth=98)
    assert ds.PixelRepresentation == int(info.min < 0)
    out = read_image(_write(tmp_path / "d.dcm", ds))
    assert np.array_equal(out, _linear(stored, center, 98))
    assert 0 < np.count_nonzero((out > 0) & (out < 255))


def test_voi_function_linear_exact_and_sigmoid(tmp_path):
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    ds = _dataset(stored, bits_stored=12, WindowCenter=2000, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT")
    expected = np.rint(np.clip((stored - 2000.0) / 1000 + 0.5, 0, 1) * 255)
    out = read_image(_write(tmp_path / "le.dcm", ds))
    assert np.abs(out.astype(int) - expected).max() <= 1  # ties may round either way in float

    ds.VOILUTFunction = "SIGMOID"
    expected = np.rint(255 / (1 + np.exp(-4 * (stored - 2000.0) / 1000)))
    out = read_image(_write(tmp_path / "sig.dcm", ds))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_percentile_window_ignores_one_hot_pixel(tmp_path):
    stored = np.tile(np.linspace(1000, 3000, 200), (100, 1)).round().astype(np.uint16)
    stored[50, 100] = 65535
    out = read_image(_write(tmp_path / "hot.dcm", _dataset(stored)))
    assert out[50, 100] == 255
    # min/max would squeeze the whole gradient into 0..12; the percentile window spreads it.
    assert out[0, 0] == 0 and out[0, -1] == 255
    assert abs(int(out[0, 100]) - 128) <= 3


def test_constant_image_does_not_divide_by_zero(tmp_path):
    with np.errstate(all="raise"):
        out = read_image(_write(tmp_path / "flat.dcm", _dataset(np.full((8, 8), 700, np.uint16))))
    assert out.dtype == np.uint8 and out.shape == (8, 8) and np.all(out == out[0, 0])


def test_invalid_stored_window_falls_back_to_percentile(tmp_path):
    stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    ds = _dataset(stored, bits_stored=12, WindowCenter=100, WindowWidth=0)  # LINEAR needs width >= 1
    assert np.array_equal(read_image(_write(tmp_path / "w0.dcm", ds)), read_image(
        _write(tmp_path / "nowin.dcm", _dataset(stored, bits_stored=12))))


def test_voi_lut_sequence_wins_over_window_and_uses_its_entry_range(tmp_path):
    stored = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
    # Declared 16 bits per entry but filled with 12-bit values, as many modalities do.
    lut = np.clip((np.arange(4096) - 1000) * 2, 0, 4095)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    ds = _dataset(stored, bits_stored=12, WindowCenter=10, WindowWidth=5)
    ds.VOILUTSequence = [item]
    out = read_image(_write(tmp_path / "lut.dcm", ds))
    assert np.array_equal(out, np.rint(lut[stored] * 255 / 4095).astype(np.uint8))


def test_multiframe_takes_first_frame_and_rgb_becomes_luminance(tmp_path):
    frames = np.stack([np.tile(np.arange(256, dtype=np.uint8), (4, 1)), np.zeros((4, 256), np.uint8)])
    ds = _dataset(frames, WindowCenter=128, WindowWidth=256)
    assert ds.NumberOfFrames == 2
    assert np.array_equal(read_image(_write(tmp_path / "mf.dcm", ds)), _linear(frames[0], 128, 256))

    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[1, 2] = (200, 100, 50)
    out = dicom_to_uint8(_dataset(rgb, "RGB", bits_stored=8))
    assert out.shape == (2, 3)
    assert out[0, 0] == 76 and out[0, 1] == 150 and out[1, 2] == round(0.299 * 200 + 0.587 * 100 + 5.7)


def test_dicom_without_pixel_data(tmp_path):
    ds = _dataset(np.zeros((4, 4), np.uint8))
    del ds.PixelData
    with pytest.raises(RejectError, match="^DICOM without pixel data$"):
        read_image(_write(tmp_path / "nopix.dcm", ds))


def _compressed(tsyntax, frames: list[bytes]) -> Dataset:
    ds = _dataset(np.zeros((4, 4), np.uint8))
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


@pytest.mark.parametrize("tsyntax", [JPEGBaseline8Bit, RLELossless])
def test_corrupt_compressed_pixel_data(tmp_path, tsyntax):
    with pytest.raises(RejectError, match=re.escape(f"cannot decode DICOM pixel data ({tsyntax.name}): ")):
        read_image(_write(tmp_path / "bad.dcm", _compressed(tsyntax, [b"garbage!" * 4])))


def test_missing_codec_names_transfer_syntax_and_package(tmp_path, monkeypatch):
    # Simulates a machine without pylibjpeg-libjpeg: no available plugin for JPEG Lossless.
    decoder = get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1")})
    with pytest.raises(RejectError, match="no codec installed .* JPEG Lossless.*pylibjpeg-libjpeg"):
        read_image(_write(tmp_path / "jll.dcm", _compressed(JPEGLosslessSV1, [b"\xff\xd8"])))


def test_transfer_syntax_without_any_decoder(tmp_path):
    with pytest.raises(RejectError, match="no decoder exists .*MPEG2"):
        read_image(_write(tmp_path / "mpeg.dcm", _compressed(MPEG2MPML, [b"\x00" * 16])))


def test_dicom_detection_by_content_and_without_preamble(tmp_path):
    stored = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (4, 1))
    ds = _dataset(stored, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    expected = _linear(stored, 2048, 1024)
    # Preamble present: the suffix does not matter.
    assert np.array_equal(read_image(_write(tmp_path / "looks_like.jpg", ds)), expected)
    # No preamble, no file meta (raw dataset): recognised by the .dcm suffix.
    raw = tmp_path / "raw.dcm"
    del ds.file_meta
    pydicom.dcmwrite(raw, ds, implicit_vr=True, little_endian=True)
    assert raw.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(read_image(raw), expected)


def test_not_dicom_and_truncated_dicom(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("this is a radiology report, not an image\n" * 5)
    with pytest.raises(RejectError, match="^not a DICOM file"):
        read_image(text)
    full = _write(tmp_path / "full.dcm", _dataset(np.zeros((64, 64), np.uint16)))
    half = tmp_path / "half.dcm"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(RejectError, match="^cannot decode DICOM pixel data .*less than expected"):
        read_image(half)
    if "RG1_J2KR" in RG1:
        # Encapsulated (JPEG 2000) data cut in half: pydicom drops the element, warning only.
        data = RG1["RG1_J2KR"].read_bytes()
        half.write_bytes(data[: len(data) // 2])
        with pytest.warns(UserWarning), pytest.raises(RejectError, match="^truncated or corrupt DICOM"):
            read_image(half)


# --- JPEG / PNG ---------------------------------------------------------------------------------


def _smooth(h: int = 96, w: int = 128) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (127 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)).astype(np.uint8)


def test_jpeg_round_trip(tmp_path):
    src = _smooth()
    Image.fromarray(src).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.dtype == np.uint8 and out.shape == src.shape
    assert np.abs(out.astype(int) - src).mean() < 2


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(RejectError, match="^truncated or corrupt image: "):
        read_image(tmp_path / "cut.jpg")


def test_empty_text_and_missing_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(RejectError, match="^empty file$"):
        read_image(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    with pytest.raises(RejectError, match="^not an image: "):
        read_image(tmp_path / "text.jpg")
    with pytest.raises(RejectError, match="^file not found$"):
        read_image(tmp_path / "nope.png")


def test_rgb_png_becomes_luminance(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = read_image(tmp_path / "c.png")
    assert out.shape == (2, 2) and out.dtype == np.uint8
    assert out[0, 0] == 76 and out[1, 1] == 255 and out[0, 1] == 0


def test_16bit_png_percentile_window(tmp_path):
    src = np.tile(np.linspace(10000, 30000, 200), (50, 1)).round().astype(np.uint16)
    src[25, 100] = 65535
    Image.fromarray(src).save(tmp_path / "d16.png")
    with Image.open(tmp_path / "d16.png") as im:
        assert im.mode in ("I;16", "I")
    out = read_image(tmp_path / "d16.png")
    assert out.dtype == np.uint8
    assert out[0, 0] == 0 and out[0, -1] == 255 and abs(int(out[0, 100]) - 128) <= 3
    assert np.all(np.diff(out[0].astype(int)) >= 0)


# --- to_uint8 / resize_shorter ------------------------------------------------------------------


def test_to_uint8_window_clip_and_zero_width():
    values = np.array([-5.0, 0.0, 40.0, 100.0, 300.0])
    assert to_uint8(values, 0, 100).tolist() == [0, 0, 102, 255, 255]
    assert to_uint8(values, 100, 0).tolist() == [255, 255, 153, 0, 0]
    with np.errstate(all="raise"):
        assert to_uint8(values, 50, 50).tolist() == [0, 0, 0, 255, 255]


@pytest.mark.parametrize("shape, size, expected", [
    ((300, 200), 100, (150, 100)),   # portrait, downscale
    ((200, 300), 100, (100, 150)),   # landscape, downscale
    ((50, 80), 100, (100, 160)),     # upscale
    ((100, 90), 90, (100, 90)),      # already there
    ((2048, 1700), 512, (617, 512)),
])
def test_resize_shorter(shape, size, expected):
    out = resize_shorter(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), size)
    assert out.shape == expected and out.dtype == np.uint8


def test_resize_shorter_rejects_non_uint8():
    with pytest.raises(ValueError):
        resize_shorter(np.zeros((10, 10), np.float32), 5)
