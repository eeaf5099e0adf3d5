"""Segmentation masks of the datasets that ship them, as boolean arrays on the source image's grid.

A reader attaches a :data:`MaskSource` per finding to an item without decoding anything; ``prepare``
renders it with :func:`render_mask`, checks it against the decoded image and writes it beside the
image in the cache, resized to the same geometry with :func:`resize_mask`.

* SIIM-ACR Pneumothorax ships run-length masks (``train-rle.csv``) on its 1024 x 1024 images;
* RSNA Pneumonia ships boxes (``stage_2_train_labels.csv``) in pixels of its 1024 x 1024 images;
* VinDr-CXR ships boxes (``annotations_*.csv``) in pixels of each DICOM, whose sizes differ;
* synthcxr writes one PNG per image and finding (``masks/<finding>/<dicom_id>.png``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BoxMask", "FileMask", "MaskSource", "RleMask", "decode_rle", "mask_folder", "render_mask",
           "resize_mask", "write_mask"]

# Both Kaggle releases annotate on these images; a source image of another size would put the
# runs or boxes on the wrong pixels, so it is rejected rather than stretched.
KAGGLE_SHAPE = (1024, 1024)
_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class RleMask:
    """The union of SIIM run-length masks (one per row of ``train-rle.csv``, "-1" rows left out)."""

    runs: tuple[str, ...]
    shape: tuple[int, int] = KAGGLE_SHAPE


@dataclass(frozen=True)
class BoxMask:
    """The union of (x, y, width, height) boxes in pixels of a ``shape`` grid; ``None``: the grid of the
    image they belong to, whatever its size (VinDr-CXR annotates every DICOM on its own grid)."""

    boxes: tuple[tuple[float, float, float, float], ...]
    shape: tuple[int, int] | None = KAGGLE_SHAPE


@dataclass(frozen=True)
class FileMask:
    """A mask stored as an image file (nonzero = the finding)."""

    path: Path


MaskSource = RleMask | BoxMask | FileMask


def decode_rle(text: str, width: int, height: int) -> np.ndarray:
    """One SIIM EncodedPixels string as a bool [height, width] mask; "-1" is the empty mask.

    The SIIM variant: pairs (offset, length) where each offset counts from the end of the previous
    run (the first from pixel 0), over the pixels in column-major order (down the first column,
    then the next). Raises ValueError for anything else, or for runs past the last pixel.
    """
    text = text.strip()
    flat = np.zeros(width * height, dtype=bool)
    if text != "-1":
        try:
            values = np.array([int(v) for v in text.split()], dtype=np.int64)
        except ValueError:
            raise ValueError(f"run-length mask is not integers: {text[:40]!r}") from None
        if values.size == 0 or values.size % 2 or (values < 0).any():
            raise ValueError(f"run-length mask is not (offset, length) pairs: {text[:40]!r}")
        offsets, lengths = values[0::2], values[1::2]
        starts = np.cumsum(offsets) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        ends = starts + lengths
        if ends[-1] > flat.size:
            raise ValueError(f"run-length mask runs to pixel {int(ends[-1])}, past the "
                             f"{height}x{width} image's {flat.size}")
        # A +1 / -1 step at each run's ends, summed, marks the covered pixels without a Python loop.
        steps = np.zeros(flat.size + 1, dtype=np.int64)
        np.add.at(steps, starts, 1)
        np.add.at(steps, ends, -1)
        flat = np.cumsum(steps[:-1]) > 0
    return flat.reshape(width, height).T


def _boxes(boxes: tuple[tuple[float, float, float, float], ...], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    height, width = shape
    for x, y, w, h in boxes:
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise ValueError(f"box (x {x}, y {y}, width {w}, height {h}) is not inside the "
                             f"{height}x{width} image")
        mask[round(y):round(y + h), round(x):round(x + w)] = True
    return mask


def render_mask(source: MaskSource, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The mask as bool [H, W] on its own grid; ValueError (one line) when it cannot be read.

    A negative (no run, no box) is empty on any grid, so it takes ``image_shape`` when given:
    an image of another size than the annotated ones still serves classification.
    """
    negative = (isinstance(source, RleMask) and not source.runs) \
        or (isinstance(source, BoxMask) and not source.boxes)
    if negative:
        return np.zeros(image_shape or source.shape, dtype=bool)
    if isinstance(source, BoxMask) and source.shape is None:
        if image_shape is None:
            raise ValueError("boxes on their image's own grid need the image's size")
        return _boxes(source.boxes, image_shape)
    if isinstance(source, RleMask):
        height, width = source.shape
        mask = np.zeros(source.shape, dtype=bool)
        for text in source.runs:
            mask |= decode_rle(text, width, height)
        return mask
    if isinstance(source, BoxMask):
        return _boxes(source.boxes, source.shape)
    try:
        with Image.open(source.path) as im:
            return np.asarray(im.convert("L")) > 0
    except FileNotFoundError:
        raise ValueError(f"mask file not found: {source.path}") from None
    except OSError as err:
        raise ValueError(f"unreadable mask file {source.path}: {err}") from None


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``shape`` (H, W): no value but 0 and 1 appears."""
    if mask.shape == shape:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(im) > 0


def mask_folder(finding: str) -> str:
    """The folder name of a finding's masks: "Pleural Effusion" -> "pleural_effusion"."""
    return _SLUG.sub("_", finding.lower()).strip("_")


def write_mask(path: Path, mask: np.ndarray) -> None:
    """An 8-bit PNG, 255 = the finding, so that it shows in any image viewer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, format="PNG")
