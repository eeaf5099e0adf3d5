"""Decoding of chest radiographs (DICOM, JPEG, PNG) to display-ready 8-bit grayscale.

The output follows the radiologist's convention, bright = dense (bone, mediastinum), dark = air.
Every input that cannot be turned into such an image raises :class:`RejectError` whose message is a
one-line, specific reason, so that a preparation run can list rejects instead of crashing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["RejectError", "dicom_to_uint8", "pil_to_uint8", "read_image", "resize_shorter",
           "shorter_side_shape", "to_uint8"]

# Robust window for images without a stored one: a few hot or dead pixels (burnt-in markers,
# detector defects) must not stretch the window the way min/max would.
PERCENTILE_WINDOW = (0.5, 99.5)
_DICOM_SUFFIXES = {".dcm", ".dicom"}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
# ITU-R BT.601 luma, the weights PIL uses for RGB -> "L", so DICOM and PNG colour inputs agree.
_LUMA = np.array([0.299, 0.587, 0.114])
_MAX_REASON = 300


class RejectError(Exception):
    """An input that cannot be prepared; str(err) is the one-line reason written to the rejects file."""


def _reason(exc: BaseException) -> str:
    """One line from an exception: pydicom's decoder errors span several lines, one per plugin."""
    text = " | ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip())
    text = text or type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map the window [low, high] linearly onto 0..255, clipping outside it and rounding.

    ``low > high`` gives an inverted ramp. A zero-width window becomes a threshold at ``low``
    (a constant image comes out black) instead of a division by zero.
    """
    values = np.asarray(values)
    if high == low:
        return np.where(values > low, 255, 0).astype(np.uint8)
    out = (values.astype(np.float64) - low) * (255.0 / (high - low))
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out).astype(np.uint8)


def _percentile_uint8(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, PERCENTILE_WINDOW)
    return to_uint8(values, float(low), float(high))


def _decode_first_frame(ds: pydicom.Dataset) -> np.ndarray:
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsyntax is not None and tsyntax.is_compressed:
        label = f"{tsyntax.name} ({tsyntax})"
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise RejectError(f"no decoder exists in pydicom for transfer syntax {label}") from None
        if not decoder.is_available:
            raise RejectError(f"no codec installed for transfer syntax {label}; install one of: "
                              + "; ".join(decoder.missing_dependencies))
    try:
        # index=0 decodes only the first frame instead of a whole multi-frame series.
        return pixel_array(ds, index=0)
    except MemoryError:
        raise
    except Exception as exc:
        name = tsyntax.name if tsyntax is not None else "unknown transfer syntax"
        raise RejectError(f"cannot decode DICOM pixel data ({name}): {_reason(exc)}") from exc


def _apply_stored_voi(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """Window with the dataset's own VOI LUT or window, as pydicom's ``apply_voi_lut`` would
    (a VOI LUT Sequence wins over Window Center/Width, first item or window when several);
    None when there is none.

    The two branches are taken here rather than through ``apply_voi_lut`` because the output range
    that maps onto 0..255 differs: the LUT's own entries, or the window's y range.
    """
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        nr_entries, first_map = seq[0].LUTDescriptor[0] or 2**16, seq[0].LUTDescriptor[1]
        # Rescaled values are float; the LUT indexes integers. Clipping to the LUT's input range
        # first also keeps pydicom from wrapping values above 65535 in its uint16 index.
        indices = np.clip(np.rint(values), first_map, first_map + nr_entries - 1).astype(np.int64)
        # The LUT's actual entries, not its nominal bit depth: LUTs declared 16-bit but filled
        # with 12-bit values are common and would otherwise come out nearly black.
        entries = apply_voi(np.arange(first_map, first_map + nr_entries), ds)
        return to_uint8(apply_voi(indices, ds), float(entries.min()), float(entries.max()))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # pydicom maps the window onto [y_min, y_max] (stored range through the rescale); the
        # ends of that range are what -inf and +inf come out as, for LINEAR(_EXACT) and SIGMOID.
        y_min, y_max = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return to_uint8(apply_windowing(values, ds), float(y_min), float(y_max))
    return None


def dicom_to_uint8(ds: pydicom.Dataset) -> np.ndarray:
    """Decode a DICOM dataset to uint8 [H, W], bright = dense.

    Modality LUT (rescale or LUT sequence), then the stored VOI LUT or window (a robust percentile
    window when there is none or it is invalid), then MONOCHROME1 inversion. Multi-frame: the first
    frame. Colour: BT.601 luminance over the stored bit range.
    """
    if "PixelData" not in ds:
        raise RejectError("DICOM without pixel data")
    arr = _decode_first_frame(ds)

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if ds.get("SamplesPerPixel", 1) == 3:
        # pydicom already converts YBR_FULL(_422) to RGB; colour images carry no modality/VOI LUT.
        luma = arr.astype(np.float64) @ _LUMA
        return to_uint8(luma, 0.0, float(2 ** int(ds.get("BitsStored", 8)) - 1))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RejectError(f"unsupported PhotometricInterpretation {photometric or '(missing)'!r}")
    if arr.ndim != 2:
        raise RejectError(f"unexpected decoded pixel array shape {arr.shape} for a grayscale image")

    values = apply_modality_lut(arr, ds)
    try:
        out = _apply_stored_voi(values, ds)
    except (ValueError, NotImplementedError):
        # A stored window pydicom refuses (width < 1, unknown VOI LUT Function, odd LUT depth)
        # says nothing about the pixels, which are still good: fall back to the robust window.
        out = None
    if out is None:
        out = _percentile_uint8(values)
    if photometric == "MONOCHROME1":
        # After windowing, because the stored window is defined on the stored (rescaled) values,
        # in which low = dense for MONOCHROME1.
        out = 255 - out
    return out


def _read_dicom(path: Path, has_preamble: bool) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path, force=not has_preamble)
    except InvalidDicomError as exc:
        raise RejectError(f"not a DICOM file: {_reason(exc)}") from exc
    except Exception as exc:
        raise RejectError(f"truncated or corrupt DICOM: {_reason(exc)}") from exc
    # A forced read parses almost any bytes into some "dataset"; every real DICOM has the type 1
    # SOP Class UID, a text file renamed .dcm does not.
    if not has_preamble and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise RejectError("not a DICOM file: no 'DICM' preamble and no DICOM attributes")
    if "PixelData" not in ds and _PIXEL_DATA_TAG in path.read_bytes():
        # pydicom drops an element cut off by the end of the file with only a warning, so a
        # truncated file would otherwise be reported as a DICOM without pixel data.
        raise RejectError("truncated or corrupt DICOM: the pixel data element is cut off or unreadable")
    if "TransferSyntaxUID" not in ds.file_meta:
        # Datasets written without file meta (old archives) are natively encoded; pydicom detected
        # the encoding while parsing, but decodes pixels only by the transfer syntax.
        implicit_vr, little_endian = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit_vr
            else ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
        )
    return dicom_to_uint8(ds)


def pil_to_uint8(im: Image.Image) -> np.ndarray:
    """A decoded PIL image as uint8 [H, W], bright = dense, as ``read_image`` turns files into."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
        # High bit depth (16-bit PNG): windowed like a DICOM without a stored window.
        return _percentile_uint8(np.asarray(im))
    return np.array(im if im.mode == "L" else im.convert("L"))


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            # Image.open only parses the header; load() decodes, and with Pillow's default
            # LOAD_TRUNCATED_IMAGES = False it raises on a cut-off file instead of padding grey.
            im.load()
            return pil_to_uint8(im)
    except UnidentifiedImageError as exc:
        raise RejectError(f"not an image: {_reason(exc)}") from exc
    except (OSError, SyntaxError) as exc:
        # Pillow reports truncated or damaged streams as OSError (and some plugins as SyntaxError).
        raise RejectError(f"truncated or corrupt image: {_reason(exc)}") from exc


def read_image(path: str | Path) -> np.ndarray:
    """Read a DICOM, JPEG or PNG file as uint8 [H, W], bright = dense.

    DICOM is recognised by its 'DICM' preamble, or by a .dcm/.dicom suffix for files written
    without one; anything else goes to PIL. Every failure raises :class:`RejectError`.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except FileNotFoundError:
        raise RejectError("file not found") from None
    except OSError as exc:
        raise RejectError(f"cannot read file: {_reason(exc)}") from exc
    if not head:
        raise RejectError("empty file")

    has_preamble = head[128:132] == b"DICM"
    try:
        if has_preamble or path.suffix.lower() in _DICOM_SUFFIXES:
            return _read_dicom(path, has_preamble)
        return _read_pil(path)
    except RejectError:
        raise
    except MemoryError:
        # Out of memory is the machine's problem, not the image's: not a reject.
        raise
    except Exception as exc:
        raise RejectError(f"cannot decode image: {_reason(exc)}") from exc


def shorter_side_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """The (H, W) that :func:`resize_shorter` gives an image of ``shape``: masks must land on it."""
    h, w = shape
    scale = size / min(h, w)
    return (max(1, round(h * scale)), size) if w <= h else (size, max(1, round(w * scale)))


def resize_shorter(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 [H, W] image so that its shorter side is ``size``, keeping the aspect ratio."""
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"expected a uint8 [H, W] image, got {img.dtype} {img.shape}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    h, w = img.shape
    if min(h, w) == size:
        return img
    scale = size / min(h, w)
    new_h, new_w = shorter_side_shape((h, w), size)
    im = Image.fromarray(np.ascontiguousarray(img))
    if scale < 1:
        # reducing_gap: a fast integer box reduction first, then Lanczos over the last factor <= 3,
        # which Pillow documents as indistinguishable from full Lanczos in most cases, at a fraction
        # of the time on 2k-3k radiographs.
        im = im.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    else:
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.array(im)
