"""Distributed DP noise: each client's share, in numpy alone (devices install this, no torch).

With ``--dp-placement distributed`` no one adds noise to the sum: each client
clips its update to L2 norm C over its slice and adds, to an element that k
clients hold this round, Gaussian noise of variance ``(z C)^2 / (rho k)``. As
long as at least ``rho k`` of the element's holders report, the variances add
up to at least ``(z C)^2``, the noise the server would have added to the sum
(``heterofl_edge.privacy``). The holders of an element follow from the rates
selected this round, which the coordinator publishes: HeteroFL's slices are
nested (and FedRolex's windows start together), so a client of rate r holds an
element exactly when each of the element's indices lies below that dimension's
size at r.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["add_distributed_noise", "clip", "holder_counts"]


def clip(update: Mapping[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """``update`` scaled to L2 norm at most ``bound`` over all of its arrays."""
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {name: (v * scale).astype(v.dtype) for name, v in update.items()}


def holder_counts(
    shapes: Mapping[str, tuple[int, ...]],
    sizes: Mapping[str, Sequence[Sequence[int]]],
    blocks: Mapping[str, Sequence[int]],
) -> dict[str, np.ndarray]:
    """Per element of each tensor (at this client's shape), how many clients hold it.

    Dimension d of a tensor is ``blocks[name][d]`` equal blocks (1: a width, a
    block per head: per-head widths, 0: fixed, every client holds all of it);
    ``sizes[name][d][c]`` is client c's size of one block. Client c holds an
    element when, in every dimension, its index within its block is below that.
    """
    counts = {}
    for name, shape in shapes.items():
        per_dim, per_dim_blocks = sizes[name], blocks[name]
        clients = len(per_dim[0]) if per_dim else 0
        total = np.zeros(shape, np.int32)
        for c in range(clients):
            held = np.ones(shape, bool)
            for d, length in enumerate(shape):
                if per_dim_blocks[d] == 0:
                    continue
                within = np.arange(length) % (length // per_dim_blocks[d])
                axis = [-1 if i == d else 1 for i in range(len(shape))]
                held &= (within < per_dim[d][c]).reshape(axis)
            total += held
        counts[name] = total
    return counts


def add_distributed_noise(
    update: Mapping[str, np.ndarray],
    bound: float,
    noise_multiplier: float,
    reporting_fraction: float,
    sizes: Mapping[str, Sequence[Sequence[int]]],
    blocks: Mapping[str, Sequence[int]],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``update`` clipped to ``bound`` with this client's share of the noise added (float64)."""
    clipped = clip({n: v.astype(np.float64) for n, v in update.items()}, bound)
    counts = holder_counts({n: v.shape for n, v in clipped.items()}, sizes, blocks)
    sigma = noise_multiplier * bound
    noised = {}
    for name, values in clipped.items():
        holders = np.maximum(counts[name], 1)
        std = sigma / np.sqrt(reporting_fraction * holders)
        noised[name] = values + std * rng.standard_normal(values.shape)
    return noised
