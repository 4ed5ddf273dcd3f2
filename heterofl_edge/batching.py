"""The order in which a client visits its examples (numpy only, no torch).

The in-process simulation and the device runtime both draw local batches
from here, so that the same seed gives the same batches everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["epoch_batches", "stats_batches"]


def epoch_batches(
    num_examples: int, epochs: int, batch_size: int, seed: int
) -> Iterator[np.ndarray]:
    """Index arrays of each local batch: a fresh shuffle per epoch, the last batch short."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def stats_batches(num_examples: int, batch_size: int = 500) -> Iterator[slice]:
    """Consecutive batches for the sBN statistics pass (data order, no shuffle)."""
    for start in range(0, num_examples, batch_size):
        yield slice(start, min(start + batch_size, num_examples))
