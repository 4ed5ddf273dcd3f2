"""Jittered exponential back-off: how long a device waits before asking an absent coordinator.

"Full jitter" (Brooker, *Exponential Backoff And Jitter*, AWS Architecture
Blog, 2015): the n-th wait is drawn uniformly from ``[floor, min(cap, base x
2^n)]``, so a fleet that lost its coordinator at the same moment does not come
back in lock-step, and the expected wait doubles until the cap. The floor
(``base``) keeps a device out of a hot loop however the draws fall. The random
source is injected, so that tests (and a seeded device) see the same waits
every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Waits of a retry streak: ``next()`` for each failure, ``reset()`` after a success."""

    base: float = 0.25  # seconds: the first ceiling, and every wait's floor
    cap: float = 10.0  # seconds: no wait is longer
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0  # failures in the current streak

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"back-off needs 0 < base <= cap, got {self.base} and {self.cap}")

    def ceiling(self) -> float:
        """The longest the next wait can be: ``base x 2^attempts``, at most ``cap``."""
        return min(self.cap, self.base * 2.0 ** min(self.attempts, 64))

    def next(self) -> float:
        """The next wait in seconds, within ``[base, ceiling()]``; counts one more failure."""
        wait = max(self.base, self.rng.uniform(0.0, self.ceiling()))
        self.attempts += 1
        return wait

    def reset(self) -> None:
        """A request went through: the next streak starts from ``base`` again."""
        self.attempts = 0
