"""Reader for IU X-ray / OpenI (NLMCXR): report XML files plus PNG images."""

from __future__ import annotations

from pathlib import Path

from .items import Found, Reject


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    raise NotImplementedError("iu-xray: reader not written yet")
