"""Reader for CheXpert Plus: CheXpert images with their released reports."""

from __future__ import annotations

from pathlib import Path

from .items import Found, Reject


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    raise NotImplementedError("chexpert-plus: reader not written yet")
