"""Level assignment: which width each client trains (the paper's Fix and Dynamic).

A mode string names the levels in the mix, separated by ``-``:

* ``a2-b8``: **Fix**. Weights after the letters: 20% of the clients train level
  a, 80% level b, for the whole run (clients in index order, as in the
  official code; the rounding remainder gets the last level).
* ``a-b-c-d-e``: **Dynamic**. No weights: each active client draws a level
  uniformly at random every round (paper section 4).
* ``a-e`` is Dynamic over a and e; a single ``a`` is every client at level a.

A level is a letter a..e or a rate in (0, 1]; a weighted rate is written
``0.3x2``. ``assignment="fix"`` or ``"dynamic"`` overrides the rule above
(weights default to 1), e.g. a Dynamic draw with weights ``a1-e3``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from heterofl_edge.errors import ConfigError
from heterofl_edge.levels import parse_rate, rate_label

__all__ = ["Assignment", "LevelMix", "parse_mode"]


class Assignment(StrEnum):
    fix = "fix"
    dynamic = "dynamic"


_TOKEN = re.compile(
    r"^(?:(?P<letter>[a-e])(?P<lweight>\d+)?|(?P<rate>\d*\.?\d+)(?:x(?P<rweight>\d+))?)$"
)

_MODE_HINT = (
    "write levels a..e joined by '-', with weights for Fix ('a2-b8') "
    "or without for Dynamic ('a-b-c-d-e'); a rate may replace a letter ('0.3x2')"
)


@dataclass(frozen=True)
class LevelMix:
    """Rates with their weights, and whether clients keep their level (Fix) or redraw it."""

    rates: tuple[float, ...]
    weights: tuple[int, ...]
    assignment: Assignment

    @property
    def global_rate(self) -> float:
        """The global model's width: the largest rate in the mix."""
        return max(self.rates)

    @property
    def name(self) -> str:
        if self.assignment is Assignment.dynamic and len(set(self.weights)) == 1:
            return "-".join(rate_label(r) for r in self.rates)
        return "-".join(
            f"{rate_label(r)}{w}" if rate_label(r).isalpha() else f"{r:g}x{w}"
            for r, w in zip(self.rates, self.weights, strict=True)
        )

    def fixed_rates(self, num_clients: int) -> list[float]:
        """Each client's rate under Fix: blocks in mode order, remainder at the last level."""
        total = sum(self.weights)
        rates: list[float] = []
        for rate, weight in zip(self.rates, self.weights, strict=True):
            rates += [rate] * (num_clients * weight // total)
        rates += [self.rates[-1]] * (num_clients - len(rates))
        return rates

    def draw_rates(self, num_clients: int, rng: np.random.Generator) -> list[float]:
        """Independent draws for ``num_clients`` clients under Dynamic."""
        p = np.array(self.weights, dtype=float) / sum(self.weights)
        picks = rng.choice(len(self.rates), size=num_clients, p=p)
        return [self.rates[i] for i in picks]

    def rates_for(
        self, client_ids: Sequence[int], num_clients: int, rng: np.random.Generator
    ) -> list[float]:
        """The rates of ``client_ids`` this round (Fix: their fixed rate; Dynamic: a draw)."""
        if self.assignment is Assignment.fix:
            fixed = self.fixed_rates(num_clients)
            return [fixed[c] for c in client_ids]
        return self.draw_rates(len(client_ids), rng)


def parse_mode(text: str, assignment: Assignment | str | None = None) -> LevelMix:
    """Parse a mode string such as ``a2-b8`` or ``a-b-c-d-e`` (see the module doc)."""
    tokens = text.strip().lower().split("-") if text and text.strip() else []
    if not tokens:
        raise ConfigError("empty mode", _MODE_HINT)
    rates, weights = [], []
    for token in tokens:
        match = _TOKEN.match(token)
        if not match:
            raise ConfigError(f"bad level {token!r} in mode {text!r}", _MODE_HINT)
        level = match["letter"] or match["rate"]
        rates.append(parse_rate(level))
        weight = match["lweight"] or match["rweight"]
        weights.append(None if weight is None else int(weight))
    if len(set(rates)) != len(rates):
        raise ConfigError(f"mode {text!r} names a level twice", _MODE_HINT)
    given = [w for w in weights if w is not None]
    if given and len(given) != len(weights):
        raise ConfigError(f"mode {text!r} gives weights to some levels only", _MODE_HINT)
    if any(w == 0 for w in given):
        raise ConfigError(f"mode {text!r} has a zero weight", "weights are positive integers")
    if assignment is None:
        chosen = Assignment.fix if given or len(rates) == 1 else Assignment.dynamic
    else:
        try:
            chosen = Assignment(assignment)
        except ValueError:
            raise ConfigError(f"unknown assignment {assignment!r}", "use fix or dynamic") from None
    return LevelMix(tuple(rates), tuple(w or 1 for w in weights), chosen)
