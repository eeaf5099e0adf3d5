"""Random draws shared by the renderer, the report grammar and the study plan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # A Python float keeps every grid op in float32 (a NumPy scalar would promote to float64).
    return float(rng.uniform(low, high))


def pick(rng: np.random.Generator, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    """One of ``options``: uniformly, or with probabilities ``weights`` (summing to 1)."""
    # The two cases consume the generator differently (an integer draw against a weighted
    # choice), so neither may stand in for the other without changing every seeded set.
    if weights is None:
        return options[int(rng.integers(len(options)))]
    return options[int(rng.choice(len(options), p=weights))]
