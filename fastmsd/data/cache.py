"""Reading a cache written by `fastmsd prepare` (see fastmsd.data.prepare for the layout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fastmsd.config import ConfigError

# File names of a cache. Reading one needs none of prepare's decoders (pydicom and codecs).
MANIFEST, REJECTS, PROGRESS, MARKER = "manifest.jsonl", "rejects.csv", "progress.jsonl", "prepare.json"
ZEROSHOT_LIST = "synthcxr-5x200.csv"
TEXT_CHOICES = ("findings", "impression", "both", "longest")


def check_text(text: str) -> None:
    if text not in TEXT_CHOICES:
        raise ConfigError(f"unknown --text {text!r} (choose from {', '.join(TEXT_CHOICES)})")


def choose_text(findings: str, impression: str, text: str) -> str:
    """The report text ``--text`` trains on: "findings" or "impression" (the other section when that
    one is missing, so a report never loses its text), "both" joined, or "longest", the longer of
    the two by characters as CXR-CLIP takes it (findings on a tie)."""
    check_text(text)
    if text == "both":
        return f"{findings} {impression}".strip()
    if text == "longest":
        return impression if len(impression) > len(findings) else findings
    first, other = (findings, impression) if text == "findings" else (impression, findings)
    return first or other


class Cache:
    """The manifest rows of a prepared cache, its token arrays and its tokenizer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        marker = self.root / MARKER
        if not marker.is_file():
            raise ConfigError(f"{self.root} is not a complete prepared cache (no {MARKER}): "
                              "run `fastmsd prepare` into it first")
        self.info = json.loads(marker.read_text())
        with (self.root / MANIFEST).open() as f:
            self.rows = [json.loads(line) for line in f]
        tokens = self.root / "tokens.npy"
        self.tokens = np.load(tokens) if tokens.is_file() else None
        self.lengths = np.load(self.root / "lengths.npy") if tokens.is_file() else None

    @staticmethod
    def is_cache(root: str | Path) -> bool:
        return (Path(root) / MARKER).is_file()

    @property
    def has_reports(self) -> bool:
        return self.tokens is not None

    @property
    def mask_findings(self) -> tuple[str, ...]:
        """The label columns with a segmentation mask for every item (caches from before masks: none)."""
        return tuple(self.info.get("masks", ()))

    @property
    def has_masks(self) -> bool:
        return bool(self.mask_findings)

    def mask_paths(self, indices: list[int], finding: str | None = None) -> list[Path]:
        """The mask PNGs (255 = ``finding``) of the items, on their images' grid; ``finding`` may be
        left out when the cache has masks of one finding only."""
        if finding is None:
            if len(self.mask_findings) != 1:
                found = list(self.mask_findings) or "no finding"
                raise ConfigError(f"cache {self.root} has masks of {found}: name the finding")
            finding = self.mask_findings[0]
        if finding not in self.mask_findings:
            raise ConfigError(f"cache {self.root} has no {finding!r} masks "
                              f"(it has: {', '.join(self.mask_findings) or 'none'})")
        return [self.root / self.rows[i]["masks"][finding] for i in indices]

    def indices(self, split: str) -> list[int]:
        found = [i for i, row in enumerate(self.rows) if row["split"] == split]
        if not found:
            raise ConfigError(f"cache {self.root} has no items in split {split!r}")
        return found

    def image_paths(self, indices: list[int]) -> list[Path]:
        return [self.root / self.rows[i]["image"] for i in indices]

    @property
    def text(self) -> str:
        """The report text the cache was tokenized from (a ``TEXT_CHOICES`` value; "both" for caches
        prepared before the choice)."""
        return self.info["params"].get("text", "both")

    def texts(self, indices: list[int]) -> list[str]:
        return [choose_text(self.rows[i]["findings"], self.rows[i]["impression"], self.text) for i in indices]

    def token_arrays(self, indices: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached token ids [n, max_len] (int32) and attention mask, cut to ``max_len``."""
        if self.tokens is None:
            raise ConfigError(f"cache {self.root} holds no reports: it cannot train a text encoder")
        if max_len > self.tokens.shape[1]:
            raise ConfigError(f"cache {self.root} was tokenized to {self.tokens.shape[1]} tokens, "
                              f"fewer than max_len {max_len}: prepare it again with --max-len {max_len}")
        ids = torch.from_numpy(self.tokens[indices, :max_len].copy())
        lengths = torch.from_numpy(np.minimum(self.lengths[indices], max_len))
        mask = torch.arange(max_len)[None] < lengths[:, None]
        # A report cut short keeps [SEP] as its last token, as the tokenizer's truncation would.
        cut = torch.from_numpy(self.lengths[indices] > max_len)
        if bool(cut.any()):
            ids[cut, max_len - 1] = self.tokenizer().sep_token_id
        return ids, mask

    def tokenizer(self):
        from fastmsd.data.text import load_tokenizer

        return load_tokenizer(self.root / "tokenizer")
