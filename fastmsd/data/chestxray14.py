"""Reader for NIH ChestX-ray14: Data_Entry_2017.csv, train_val_list.txt / test_list.txt, images/."""

from __future__ import annotations

from pathlib import Path

from .items import Found, Reject


def read(root: Path, frontal_only: bool, seed: int) -> tuple[Found, list[Reject]]:
    raise NotImplementedError("chestxray14: reader not written yet")
