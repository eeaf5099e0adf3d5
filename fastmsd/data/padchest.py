"""Reader for PadChest: the label CSV and the 16-bit PNGs."""

from __future__ import annotations

from pathlib import Path

from .items import Found, Reject


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    raise NotImplementedError("padchest: reader not written yet")
