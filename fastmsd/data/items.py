"""What a dataset reader gives ``prepare``: items and rejects, and the helpers every reader shares."""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .masks import MaskSource

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Item:
    """One image to prepare, with its labels (after the policy) and report."""

    id: str                     # filesystem-safe, unique within the dataset, stable
    dataset: str
    image: Path                 # absolute path of the JPEG, PNG or DICOM file
    split: str                  # "train" | "validate" | "test"
    view: str | None
    patient: str
    study: str | None
    labels: dict[str, float | None] = field(hash=False)
    report: str | None          # raw report text (MIMIC-CXR, synthcxr), else None
    language: str | None = None  # the report's ISO 639-1 language ("es": PadChest); None: English or none
    # label column -> where its segmentation mask comes from (SIIM, RSNA, synthcxr), else empty
    masks: dict[str, MaskSource] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Reject:
    """A label row or file that yields no item, and why."""

    source: str                 # e.g. "train.csv:17"
    reason: str


# (source, item) pairs: the source names the row when the item later turns out a duplicate.
Found = list[tuple[str, Item]]
Reader = Callable[[Path, bool, int], tuple[Found, list[Reject]]]


def hash_split(key: str, seed: int) -> str:
    """Deterministic 80 / 10 / 10 train / validate / test assignment of ``key``."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < 0.8 else "validate" if u < 0.9 else "test"


def safe_id(text: str) -> str:
    return _UNSAFE.sub("_", text)


def require(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{dataset}: missing {path}")
    return path


def keep_if_present(source: str, item: Item, found: Found, rejects: list[Reject]) -> None:
    if item.image.is_file():
        found.append((source, item))
    else:
        rejects.append(Reject(source, f"image file not found: {item.image}"))


@contextmanager
def open_csv(path: Path, required: tuple[str, ...]) -> Iterator[csv.DictReader]:
    """A CSV file (or a gzipped one, ``.gz``) whose header must hold the ``required`` columns."""
    opener = gzip.open if path.suffix == ".gz" else open
    # skipinitialspace: SIIM's header reads "ImageId, EncodedPixels" and its rows " -1".
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}")
        yield reader


def sectioned_report(findings: str, impression: str) -> str:
    """A report shipped as separate FINDINGS and IMPRESSION texts, written so that ``prepare``'s
    section parser reads both back: "FINDINGS: ...\nIMPRESSION: ...", the sections that have text,
    each on one line (a capitalised "LUNGS:" opening a line inside a section would read as a header
    of its own, and its text would be lost)."""
    sections = (("FINDINGS", findings), ("IMPRESSION", impression))
    return "\n".join(f"{header}: {' '.join(text.split())}" for header, text in sections if text.strip())


RAGGED = "malformed row: its number of fields differs from the header's"


def ragged(row: dict[str | None, str | None]) -> bool:
    # DictReader files a row's surplus fields under None and fills its missing ones with None.
    return None in row or None in row.values()


