"""Placing devices at levels from what they measured, and moving them as they perform.

A device reports how long one training step of a reference artifact takes on
it (``step_ms`` at ``reference_rate``), its memory, its bandwidth and, if it
knows, how many examples it trains on. The estimated time of one round at
level L is

    compute = step_ms * flops(L) / flops(reference) * steps
    transfer = 2 * bytes(L) / bandwidth          (weights down, update up)

where ``steps = epochs * ceil(examples / batch)``. At registration a device
gets the largest level in play whose estimate fits ``budget_fraction`` of the
round deadline and whose training memory (``memory_factor`` x the level's
parameter bytes) fits the device; a device that fits none gets the smallest.

After every round (``ProfileLevels.observe``) a device that missed the
deadline, or finished later than ``slow_fraction`` of it, moves down one
level; a device whose time, scaled to the next level up, stays below
``fast_fraction`` of the deadline for ``fast_rounds`` rounds in a row moves
up one. The gap between the two fractions and the streak are the hysteresis
that keeps a device from oscillating. Everything here is pure: the coordinator
places registered devices with it, and ``simulate --simulated-time`` places and
times its simulated devices by the same model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from heterofl_edge.engine import Client, Outcome
from heterofl_edge.errors import ConfigError
from heterofl_edge.strategy import RoundPlan

if TYPE_CHECKING:
    from heterofl_edge.models import Architecture

__all__ = [
    "DeviceProfile",
    "LevelCost",
    "LevelTable",
    "ProfileLevels",
    "choose_rate",
    "estimate_seconds",
    "level_costs",
    "relevel",
    "steps_per_round",
]


@dataclass(frozen=True)
class DeviceProfile:
    step_ms: float  # measured median training-step time of the reference artifact
    reference_rate: float  # the rate of that reference artifact
    memory_mb: float
    bandwidth_mbps: float  # megabits per second
    runtimes: tuple[str, ...] = ("onnx",)
    num_examples: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceProfile:
        """From a profile already checked by ``coordinator.schemas.DeviceProfileIn``."""
        return cls(
            float(data["step_ms"]),
            float(data["reference_rate"]),
            float(data["memory_mb"]),
            float(data["bandwidth_mbps"]),
            tuple(data.get("runtimes") or ("onnx",)),
            data.get("num_examples"),
        )


@dataclass(frozen=True)
class LevelCost:
    rate: float
    flops: int
    parameter_bytes: int


@dataclass(frozen=True)
class LevelTable:
    """The policy's knobs."""

    budget_fraction: float = (
        0.5  # a level fits if its estimate is within this share of the deadline
    )
    steps_per_round: int = 300  # when a device does not say how many examples it has
    memory_factor: float = 8.0
    slow_fraction: float = 0.8  # finishing later than this share of the deadline: one level down
    fast_fraction: float = 0.5  # projected time one level up within this share ...
    fast_rounds: int = 2  # ... for this many rounds in a row: one level up


def level_costs(arch: Architecture, rates: Sequence[float]) -> list[LevelCost]:
    """FLOPs and parameter bytes of ``arch`` at each rate (the model behind the estimates)."""
    from heterofl_edge.complexity import measure_complexity

    costs = []
    for rate in rates:
        measured = measure_complexity(arch, rate)
        costs.append(LevelCost(rate, measured.flops, 4 * measured.parameters))
    return costs


def steps_per_round(profile: DeviceProfile, table: LevelTable, epochs: int, batch_size: int) -> int:
    """Local steps of one session: E x ceil(examples / B), or the table's guess without a count."""
    if profile.num_examples is None:
        return table.steps_per_round
    return epochs * math.ceil(profile.num_examples / batch_size)


def estimate_seconds(
    profile: DeviceProfile, level: LevelCost, reference: LevelCost, steps: int
) -> float:
    compute = profile.step_ms / 1000 * level.flops / reference.flops * steps
    transfer = 2 * level.parameter_bytes * 8 / (profile.bandwidth_mbps * 1e6)
    return compute + transfer


def choose_rate(
    profile: DeviceProfile,
    levels: Sequence[LevelCost],
    table: LevelTable,
    deadline_seconds: float,
    epochs: int,
    batch_size: int,
) -> float:
    """The largest rate in ``levels`` that fits the budget and memory, else the smallest."""
    by_rate = {lv.rate: lv for lv in levels}
    reference = by_rate.get(profile.reference_rate)
    if reference is None:
        raise ConfigError(
            f"reference rate {profile.reference_rate:g} is not one of the levels in play",
            f"profile with one of: {', '.join(f'{r:g}' for r in sorted(by_rate))}",
            code="bad_profile",
        )
    steps = steps_per_round(profile, table, epochs, batch_size)
    budget = table.budget_fraction * deadline_seconds
    for level in sorted(levels, key=lambda lv: lv.rate, reverse=True):
        fits_time = estimate_seconds(profile, level, reference, steps) <= budget
        fits_memory = table.memory_factor * level.parameter_bytes <= profile.memory_mb * 2**20
        if fits_time and fits_memory:
            return level.rate
    return min(by_rate)


def relevel(
    rate: float,
    seconds: float | None,
    deadline_seconds: float,
    streak: int,
    levels: Sequence[LevelCost],
    table: LevelTable,
) -> tuple[float, int]:
    """A device's next rate and fast-round streak after one round at ``rate``.

    ``seconds`` is how long it took (None: it missed the deadline).
    """
    ladder = sorted(levels, key=lambda lv: lv.rate)
    rates = [lv.rate for lv in ladder]
    if rate not in rates:
        return rate, 0
    index = rates.index(rate)
    if seconds is None or seconds > table.slow_fraction * deadline_seconds:
        return rates[max(0, index - 1)], 0
    if index + 1 >= len(ladder):
        return rate, 0
    projected = seconds * ladder[index + 1].flops / ladder[index].flops
    if projected > table.fast_fraction * deadline_seconds:
        return rate, 0
    if streak + 1 >= table.fast_rounds:
        return rates[index + 1], 0
    return rate, streak + 1


@dataclass
class ProfileLevels:
    """The engine's ``LevelPolicy`` for measured devices: each keeps its own level."""

    levels: Sequence[LevelCost]
    table: LevelTable
    rate_of: Callable[[str], float]  # a device's current level (from the registry)
    on_change: Callable[[dict[str, float]], None]  # persist re-leveled devices
    streaks: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # re-leveling, per round

    def rates(self, plan: RoundPlan, chosen: Sequence[Client]) -> list[float]:
        return [self.rate_of(c.id) for c in chosen]

    def observe(self, round_number: int, outcomes: Sequence[Outcome]) -> None:
        changed: dict[str, float] = {}
        for outcome in outcomes:
            if not math.isfinite(outcome.deadline_seconds):
                continue
            new_rate, streak = relevel(
                outcome.rate,
                outcome.seconds,
                outcome.deadline_seconds,
                self.streaks.get(outcome.client, 0),
                self.levels,
                self.table,
            )
            self.streaks[outcome.client] = streak
            if new_rate != outcome.rate:
                changed[outcome.client] = new_rate
        if changed:
            self.history.append({"round": round_number, "moved": changed})
            self.on_change(changed)

    def state(self) -> str:
        return json.dumps({"streaks": self.streaks})

    def restore(self, text: str | None) -> None:
        if text:
            self.streaks = {str(k): int(v) for k, v in json.loads(text)["streaks"].items()}
