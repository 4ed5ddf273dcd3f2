"""Computation complexity levels and width rates.

HeteroFL shrinks every hidden width of the global model by a rate r in (0, 1].
The paper's five levels a..e are the rates 1, 1/2, 1/4, 1/8 and 1/16; any other
rate in (0, 1] is accepted wherever a level is.
"""

from __future__ import annotations

import math
from enum import StrEnum

from heterofl_edge.errors import ConfigError

__all__ = ["Level", "parse_rate", "rate_label", "scaled_width"]


class Level(StrEnum):
    """The paper's named complexity levels; ``Level.d.rate == 0.125``."""

    a = "a"
    b = "b"
    c = "c"
    d = "d"
    e = "e"

    @property
    def rate(self) -> float:
        return _LEVEL_RATES[self.value]


_LEVEL_RATES = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}


def parse_rate(value: str | float | Level) -> float:
    """Return the width rate named by a level letter, a ``Level`` or a number.

    Raises ``ConfigError`` for anything that is not a level a..e or a rate in (0, 1].
    """
    if isinstance(value, Level):
        return value.rate
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _LEVEL_RATES:
            return _LEVEL_RATES[text]
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(
                f"unknown level {value!r}",
                "use one of a, b, c, d, e or a rate in (0, 1] such as 0.3",
            ) from None
    else:
        number = float(value)
    if not (math.isfinite(number) and 0.0 < number <= 1.0):
        raise ConfigError(
            f"rate {value!r} is outside (0, 1]",
            "a rate is the fraction of the global width a client trains, e.g. 0.25",
        )
    return number


def rate_label(rate: float) -> str:
    """The level letter for a paper rate, else the rate itself as text (``0.3``)."""
    for letter, level_rate in _LEVEL_RATES.items():
        if rate == level_rate:
            return letter
    return f"{rate:g}"


def scaled_width(width: int, rate: float) -> int:
    """Hidden size ``ceil(rate * width)`` as in the official code, at least 1.

    The product is rounded to 9 decimals first so that, e.g., 0.3 * 10 gives 3
    rather than 4 through floating-point noise.
    """
    return max(1, math.ceil(round(rate * width, 9)))
