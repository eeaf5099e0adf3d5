"""Pretraining on several caches at once: ``--data PATH=WEIGHT,PATH=WEIGHT,...``.

Each cache of the mix is a ``Source``: its training rows and the texts they train on, its reports
or, for a cache without reports (or with reports not in English), texts written from its labels
(:mod:`fastmsd.data.label_text`; images whose labels are all unknown are left out, and counted).
The run lays the sources' items end to end, in the order ``--data`` names them, as one index
space (tokens, image paths), and a ``MixStream`` draws each effective batch from it by weight.
The first source that trains on its reports gives the run its vocabulary, which tokenizes every
other source's texts (``fastmsd.run.run_tokens``); the run evaluates on the first cache of the mix.

Sampling: every slot of an effective batch picks its cache by weight, from a generator keyed by
(seed, batch number); each cache hands out its next items from its own seeded shuffle per epoch,
as ``BatchStream`` does for a single cache (a shuffle with fewer items left than a batch takes
is dropped for the next one, so no image appears twice in a batch unless its cache is smaller
than its share of it). The caches' epochs run independently: a small cache with a large weight
goes round many times while a large one goes round once. The state (batches drawn, each
cache's epoch and position) goes into the checkpoint, so a resumed run draws the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastmsd.config import ConfigError
from fastmsd.data.cache import Cache
from fastmsd.data.label_text import LabelGrammar

# Keys of the generators, beside the seed: the slots' draws, and each source's shuffles (1 + its position).
_SLOTS = 0


@dataclass(frozen=True)
class Source:
    """One cache of the training data: the training rows kept, and their label texts (None: its reports)."""

    cache: Cache
    weight: float
    indices: list[int]
    texts: list[str] | None
    unlabelled: int = 0  # training images left out: no label known to write a text from

    def describe(self) -> str:
        kind = "reports" if self.texts is None else "label texts"
        left_out = f", {self.unlabelled} without known labels left out" if self.unlabelled else ""
        return f"{self.cache.root} ({len(self.indices)} images, {kind}{left_out}) weight {self.weight:.3g}"


def training_source(cache: Cache, weight: float, grammar: LabelGrammar | None, seed: int) -> Source:
    """The training split of ``cache``: with its reports, or, when it has none or they are not in
    English (PadChest's are Spanish), with texts the ``grammar`` writes from its labels (None:
    ``--no-label-text``: reports whatever their language, and a cache without them is refused)."""
    indices = cache.indices("train")
    # The English vocabulary and text encoder would read another language's reports as noise.
    foreign = any(cache.rows[i].get("language") not in (None, "en") for i in indices)
    if cache.has_reports and not (foreign and grammar is not None):
        return Source(cache, weight, indices, None)
    if grammar is None:
        raise ConfigError(f"cache {cache.root} holds no reports: pass --label-text to train on texts written "
                          "from its labels")
    texts = [grammar.text(cache.rows[i]["labels"], seed, cache.rows[i]["id"]) for i in indices]
    kept = [(i, text) for i, text in zip(indices, texts, strict=True) if text is not None]
    if not kept:
        raise ConfigError(f"cache {cache.root} has no training image with a known label to write a text from")
    return Source(cache, weight, [i for i, _ in kept], [text for _, text in kept], len(indices) - len(kept))


def _seed(*parts: int) -> int:
    # SeedSequence hashes the parts into a well-mixed 64-bit seed: nearby (seed, key) pairs give
    # unrelated streams, which seed * K + key would not guarantee.
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class _Cursor:
    """A source's place in its sequence of per-epoch shuffles."""

    n: int
    key: int
    epoch: int
    index: int
    perm: torch.Tensor

    @classmethod
    def start(cls, n: int, key: int, seed: int, epoch: int = 0, index: int = 0) -> _Cursor:
        g = torch.Generator().manual_seed(_seed(seed, key, epoch))
        return cls(n, key, epoch, index, torch.randperm(n, generator=g))

    def take(self, count: int, seed: int) -> tuple[torch.Tensor, _Cursor]:
        """The next ``count`` items and the cursor after them."""
        taken, cursor = [], self
        while count:
            if cursor.index + min(count, cursor.n) > cursor.n:
                cursor = _Cursor.start(cursor.n, cursor.key, seed, cursor.epoch + 1)
            k = min(count, cursor.n - cursor.index)
            taken.append(cursor.perm[cursor.index : cursor.index + k])
            cursor = _Cursor(cursor.n, cursor.key, cursor.epoch, cursor.index + k, cursor.perm)
            count -= k
        return torch.cat(taken) if taken else torch.empty(0, dtype=torch.int64), cursor


class MixStream:
    """Effective batches of indices into the sources laid end to end (``sizes`` in order), each
    slot's source drawn by ``weights``; ``state_dict`` holds the data position. The interface of
    ``fastmsd.data.loader.BatchStream``."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int, seed: int):
        if len(sizes) != len(weights) or not sizes or min(sizes) < 1 or min(weights) <= 0:
            raise ValueError(f"a mix needs non-empty sources with positive weights, got {sizes}, {weights}")
        self.sizes, self.batch_size, self.seed = [int(n) for n in sizes], batch_size, seed
        total = float(sum(weights))
        self.bounds = torch.tensor(np.cumsum([w / total for w in weights]), dtype=torch.float64)
        self.offsets = [0, *np.cumsum(self.sizes)[:-1].tolist()]
        self.batch = 0
        self._cursors = [_Cursor.start(n, 1 + s, seed) for s, n in enumerate(self.sizes)]

    def _draw(self) -> tuple[torch.Tensor, list[_Cursor]]:
        g = torch.Generator().manual_seed(_seed(self.seed, _SLOTS, self.batch))
        slots = torch.searchsorted(self.bounds, torch.rand(self.batch_size, generator=g, dtype=torch.float64),
                                   right=True).clamp_(max=len(self.sizes) - 1)
        idx = torch.empty(self.batch_size, dtype=torch.int64)
        cursors = []
        for s, cursor in enumerate(self._cursors):
            mine = slots == s
            taken, cursor = cursor.take(int(mine.sum()), self.seed)
            idx[mine] = taken + self.offsets[s]
            cursors.append(cursor)
        return idx, cursors

    def next(self) -> torch.Tensor:
        idx, self._cursors = self._draw()
        self.batch += 1
        return idx

    def peek(self) -> torch.Tensor:
        """The batch the next ``next()`` returns, without moving (for prefetching)."""
        return self._draw()[0]

    def state_dict(self) -> dict:
        return {"batch": self.batch,
                "sources": [{"size": c.n, "epoch": c.epoch, "index": c.index} for c in self._cursors]}

    def load_state_dict(self, state: dict) -> None:
        sizes = [int(s["size"]) for s in state.get("sources", ())]
        if sizes != self.sizes:
            saved = "one cache" if "sources" not in state else f"caches of {sizes} training images"
            raise ConfigError(f"the checkpoint's data position is for {saved}, this run's --data has "
                              f"caches of {self.sizes}: resume with the run's own --data")
        self.batch = int(state["batch"])
        self._cursors = [_Cursor.start(n, 1 + s, self.seed, int(c["epoch"]), int(c["index"]))
                         for s, (n, c) in enumerate(zip(self.sizes, state["sources"], strict=True))]
