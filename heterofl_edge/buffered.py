"""Buffered asynchronous aggregation (FedBuff) for mixed widths: the mathematics.

FedBuff (Nguyen et al., AISTATS 2022) lets clients train whenever they are
free, on the newest model they can get, and folds every K arriving updates
into the global model. Each upload is an *update*: the client's trained
weights minus the weights of the model version it started from. An update
that started ``tau`` versions ago (its staleness) is weighted by ``s(tau)``,
one of the forms FedBuff takes from FedAsync (Xie et al., 2019):

* ``constant``: ``s(tau) = 1``;
* ``polynomial:a``: ``s(tau) = (1 + tau) ** -a`` (FedBuff's default, a = 0.5);
* ``hinge:a,b``: ``s(tau) = 1`` for ``tau <= b``, else ``1 / (a * (tau - b) + 1)``.

With HeteroFL's widths every element is averaged over the clients whose slice
holds it, as ``heterofl_edge.aggregation`` does for whole rounds: per element,
a sum of ``s(tau) x update`` and the number of updates that hold it (rows of a
``labels`` dimension counted only over the clients holding the label, rolling
windows (FedRolex) at the offset each client trained). The buffer then moves
the model by

    new = current + eta * sum / count      where count > 0 (else the element stays)

with the server learning rate ``eta``. The count is of updates, not of their
weights (FedBuff divides by K): a stale update moves the elements it alone
holds by ``s(tau)`` of itself. Divided by the summed weights instead, the
weight of an element's only update cancels, and in a fleet whose wide levels
train slowly the elements only they hold took every stale update whole: in
``bench/bench_async.py`` the accuracy fell from 0.91 to 0.38 over 30 versions,
and with this count it reaches 0.95 and stays (bench/README.md). With K = every
client, no staleness (all updates started from the current version) and
``eta = 1`` this is the synchronous round: ``current + sum(trained - current) / n
= sum(trained) / n``, to float rounding (``tests/test_buffered.py`` states the bound).

Everything here is pure: tensors and numbers in, tensors out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch

from heterofl_edge.aggregation import accumulate, validate_update
from heterofl_edge.errors import ConfigError, UpdateError
from heterofl_edge.slicing import (
    DimKind,
    SlicingSpec,
    global_positions,
    take,
    trainable_names,
)

__all__ = [
    "Aggregation",
    "BufferedAggregator",
    "StalenessKind",
    "StalenessRule",
    "parse_staleness",
]

State = dict[str, torch.Tensor]


class Aggregation(StrEnum):
    """How updates become the global model."""

    sync = "sync"  # rounds: every selected client answers (or misses), then one average
    buffered = "buffered"  # FedBuff: every K arriving updates, weighted by staleness


class StalenessKind(StrEnum):
    constant = "constant"
    polynomial = "polynomial"
    hinge = "hinge"


@dataclass(frozen=True)
class StalenessRule:
    """The weight ``s(tau)`` of an update that started ``tau`` versions before the current one."""

    kind: StalenessKind = StalenessKind.polynomial
    a: float = 0.5
    b: float = 0.0

    def __post_init__(self) -> None:
        """Refuse parameters of no FedBuff form."""
        if not all(math.isfinite(v) and v >= 0 for v in (self.a, self.b)):
            raise ConfigError(
                f"staleness parameters must be finite and >= 0, got a={self.a}, b={self.b}",
                "e.g. --staleness polynomial:0.5 or hinge:10,4",
            )

    def weight(self, staleness: int) -> float:
        """``s(tau)`` for ``tau = staleness`` (0: the update started from the current version)."""
        if staleness < 0:
            raise UpdateError(f"staleness {staleness} is negative: an update from the future")
        if self.kind is StalenessKind.constant:
            return 1.0
        if self.kind is StalenessKind.polynomial:
            return float((1.0 + staleness) ** -self.a)
        if staleness <= self.b:
            return 1.0
        return 1.0 / (self.a * (staleness - self.b) + 1.0)

    def __str__(self) -> str:
        """The rule as ``--staleness`` takes it."""
        if self.kind is StalenessKind.constant:
            return "constant"
        if self.kind is StalenessKind.polynomial:
            return f"polynomial:{self.a:g}"
        return f"hinge:{self.a:g},{self.b:g}"


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?"  # a number >= 0, as TOML or a flag writes it
_FORMS = {
    StalenessKind.constant: re.compile(r"constant"),
    StalenessKind.polynomial: re.compile(rf"polynomial:({_NUMBER})"),
    StalenessKind.hinge: re.compile(rf"hinge:({_NUMBER}),({_NUMBER})"),
}


def parse_staleness(text: str | StalenessRule) -> StalenessRule:
    """``constant``, ``polynomial:a`` or ``hinge:a,b`` as a rule; ``ConfigError`` otherwise."""
    if isinstance(text, StalenessRule):
        return text
    cleaned = str(text).strip().lower().replace(" ", "")
    for kind, form in _FORMS.items():
        match = form.fullmatch(cleaned)
        if match is None:
            continue
        numbers = [float(g) for g in match.groups()]
        return StalenessRule(kind, *numbers) if numbers else StalenessRule(kind, 0.0, 0.0)
    raise ConfigError(
        f"unknown staleness rule {text!r}",
        "use constant, polynomial:a (weight (1+tau)^-a) or hinge:a,b "
        "(weight 1 up to b versions, then 1/(a(tau-b)+1))",
    )


class BufferedAggregator:
    """One buffer of updates, each weighted by its staleness, folded into the current model.

    ``add`` takes a client's trained sub-model and the global state of the
    version it started from (its update is the difference over its slice);
    ``finalize`` moves the current model by ``eta * sum / count`` per element
    (sum: of the weighted updates; count: of the updates that hold the element).
    Sums and counts are float64, so the fold order changes the result only by
    float64 rounding.
    """

    def __init__(
        self,
        current: Mapping[str, torch.Tensor],
        spec: SlicingSpec,
        global_rate: float = 1.0,
        server_lr: float = 1.0,
    ) -> None:
        if not (server_lr > 0 and math.isfinite(server_lr)):
            raise ConfigError(f"the server learning rate must be positive, got {server_lr}")
        self._spec = spec
        self._global_rate = global_rate
        self._server_lr = server_lr
        self._current = dict(current)
        self._names = trainable_names(spec)
        self._sums = {n: torch.zeros_like(current[n], dtype=torch.float64) for n in self._names}
        self._counts = {n: torch.zeros_like(current[n], dtype=torch.float64) for n in self._names}
        self.num_updates = 0
        self.weights: list[float] = []  # each added update's staleness weight, in order

    def add(
        self,
        trained: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        rate: float,
        weight: float = 1.0,
        labels: Iterable[int] | None = None,
        offset: int = 0,
        checked: bool = False,
    ) -> None:
        """Add one client's update: ``trained`` minus ``base``'s slice, weighted by ``weight``.

        ``base`` is the global state of the version the client started from;
        ``rate``, ``labels`` and ``offset`` are as in ``HeteroFLAggregator.add``
        (labels: the rows of a ``labels`` dimension it counts for; None: all).
        ``checked``: ``trained`` already passed ``validate_update``.
        """
        if rate > self._global_rate:
            raise UpdateError(
                f"rate {rate:g} exceeds the global model's rate {self._global_rate:g}"
            )
        if not (weight > 0 and math.isfinite(weight)):
            raise UpdateError(f"staleness weight must be positive, got {weight}")
        if not checked:
            validate_update(trained, self._spec, rate)
        label_index = (
            None if labels is None else torch.tensor(sorted(set(labels)), dtype=torch.long)
        )
        if label_index is not None and label_index.numel():
            sizes = [
                d.base for r in self._spec.values() for d in r.dims if d.kind is DimKind.labels
            ]
            low, high = int(label_index.min()), int(label_index.max())
            if sizes and (low < 0 or high >= min(sizes)):
                raise UpdateError(
                    f"labels must lie in 0..{min(sizes) - 1}, got {low}..{high}",
                    "report the labels present in the client's data",
                    code="bad_labels",
                )
        for name in self._names:
            rule = self._spec[name]
            positions = list(global_positions(rule, rate, self._global_rate, offset))
            update = trained[name].to(torch.float64) - take(base[name], tuple(positions)).to(
                torch.float64
            )
            for dim, d in enumerate(rule.dims):
                if d.kind is DimKind.labels and label_index is not None:
                    positions[dim] = label_index
                    update = update.index_select(dim, label_index)
            accumulate(self._sums[name], positions, weight * update)
            accumulate(self._counts[name], positions, torch.ones_like(update))
        self.num_updates += 1
        self.weights.append(weight)

    def finalize(self) -> State:
        """The new global state: ``current + eta * sum / count`` where count > 0.

        Tensors that are not trained (sBN statistics) and elements no update
        held keep the current value.
        """
        new_state = dict(self._current)
        for name in self._names:
            counts, old = self._counts[name], self._current[name]
            step = self._server_lr * self._sums[name] / counts.clamp(min=1e-300)
            moved = (old.to(torch.float64) + step).to(old.dtype)
            new_state[name] = torch.where(counts > 0, moved, old)
        return new_state
