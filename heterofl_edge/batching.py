"""The order in which a client visits its examples (no torch; the generator is pure Python).

The in-process simulation, the Python device runtime and the browser device
(``web/shuffle.js``) all draw local batches from the generator specified here,
so that the same seed gives the same batches in every language. The test
vectors in ``tests/vectors/shuffle.json`` pin it; both test suites check them.

The specification, complete enough to write it in any language with 64-bit
unsigned integers (or BigInt, or pairs of 32-bit halves):

1. **SplitMix64** (Steele, Lea and Flood, 2014). The state is a uint64 that
   starts at the seed, an integer in [0, 2**32). Each draw, all arithmetic
   modulo 2**64::

       state = state + 0x9E3779B97F4A7C15
       z = state
       z = (z XOR (z >> 30)) * 0xBF58476D1CE4E5B9
       z = (z XOR (z >> 27)) * 0x94D049BB133111EB
       next64 = z XOR (z >> 31)

   ``next32`` is the upper half of the next draw: ``next64 >> 32``.
2. **Bounded integer in [0, b)**, 1 <= b <= 2**32, without bias (Lemire, 2019,
   "Fast random integer generation in an interval")::

       m = next32 * b                      # exact, < 2**64
       low = m mod 2**32
       if low < b:
           t = (2**32 - b) mod b           # = 2**32 mod b
           while low < t:
               m = next32 * b
               low = m mod 2**32
       result = m >> 32

3. **An epoch's order** of n examples (Fisher-Yates, Durstenfeld's form):
   start from the identity ``order = [0, 1, ..., n-1]``; for i from n-1 down
   to 1, ``j = bounded(i + 1)`` and swap ``order[i]`` and ``order[j]``.
4. **A session** (``epoch_batches``): one generator seeded once; each of the E
   epochs shuffles the identity afresh with the same, continuing generator;
   its batches are consecutive slices of ``batch_size`` indices, the last one
   short when ``batch_size`` does not divide n.
5. **A uniform float in [0, 1)** (``uniforms``, for the masked language
   model's token masks): ``(next64 >> 11) * 2**-53``, exact in a double.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["SplitMix64", "epoch_batches", "shuffled", "stats_batches"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MASK32 = (1 << 32) - 1
SEED_LIMIT = 1 << 32


class SplitMix64:
    """The generator of the module docstring, seeded with an integer in [0, 2**32)."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed {seed} must lie in [0, 2**32)")
        self.state = seed

    def next64(self) -> int:
        self.state = (self.state + _GOLDEN) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def next32(self) -> int:
        return self.next64() >> 32

    def uniforms(self, count: int) -> np.ndarray:
        """The next ``count`` draws as float64 in [0, 1), computed at once; advances the state.

        Draw k (from 1) depends on ``state + k * 0x9E3779B97F4A7C15`` alone, so the
        whole block is one vectorised pass, equal to ``count`` calls of ``next64``.
        """
        if count < 0:
            raise ValueError(f"count {count} must not be negative")
        steps = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(self.state) + steps * np.uint64(_GOLDEN)  # uint64 arrays wrap mod 2**64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        self.state = (self.state + count * _GOLDEN) & _MASK64
        return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def below(self, bound: int) -> int:
        """An integer drawn uniformly from [0, bound), 1 <= bound <= 2**32."""
        if not 1 <= bound <= SEED_LIMIT:
            raise ValueError(f"bound {bound} must lie in [1, 2**32]")
        m = self.next32() * bound
        low = m & _MASK32
        if low < bound:
            threshold = (SEED_LIMIT - bound) % bound
            while low < threshold:
                m = self.next32() * bound
                low = m & _MASK32
        return m >> 32


def shuffled(num_examples: int, rng: SplitMix64) -> list[int]:
    """A permutation of range(num_examples) by Fisher-Yates with draws from ``rng``."""
    order = list(range(num_examples))
    below = rng.below
    for i in range(num_examples - 1, 0, -1):
        j = below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def epoch_batches(
    num_examples: int, epochs: int, batch_size: int, seed: int
) -> Iterator[np.ndarray]:
    """Index arrays (int64) of each local batch: a fresh shuffle per epoch, the last batch short.

    The order is the module docstring's, identical in ``web/shuffle.js``.
    """
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be at least 1")
    rng = SplitMix64(seed)
    for _ in range(epochs):
        order = np.array(shuffled(num_examples, rng), dtype=np.int64)
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def stats_batches(num_examples: int, batch_size: int = 500) -> Iterator[slice]:
    """Consecutive batches for the sBN statistics pass (data order, no shuffle)."""
    for start in range(0, num_examples, batch_size):
        yield slice(start, min(start + batch_size, num_examples))
