"""Reader for VinDr-CXR: DICOMs, image-level labels and the radiologists' boxes."""

from __future__ import annotations

from pathlib import Path

from .items import Found, Reject


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    raise NotImplementedError("vindr-cxr: reader not written yet")
