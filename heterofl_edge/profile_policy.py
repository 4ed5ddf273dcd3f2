"""Placing devices at levels from what they measured, and moving them as they perform.

A device reports how long one training step of a reference artifact takes on
it (``step_ms`` at ``reference_rate``), its memory, its bandwidth and, if it
knows, how many examples it trains on. The estimated time of one round at
level L is

    compute = step_ms * flops(L) / flops(reference) * steps
    transfer = 2 * bytes(L) / bandwidth          (weights down, update up)

where ``steps = epochs * ceil(examples / batch)``. At registration a device
gets the largest level in play whose estimate fits ``budget_fraction`` of the
round deadline among those whose memory fits the device; a device that fits
none in time gets the smallest that fits its memory.

Memory is a hard limit under every policy. A level's training memory is
estimated from its parameter bytes P and its activations per example A as

    memory = session_mb + memory_factor * P + activation_factor * A * batch

(on top of what the device's process holds before it loads a level,
``base_memory_mb`` in its profile), and a device also needs the global level's
sBN statistics pass (forward only, batches of 10) to fit. ``memory_cap`` is
the largest level that fits; a device that fits none is refused at
registration. The Fix and Dynamic draws are capped per device
(``MemoryCappedLevels``), and re-leveling never moves a device above its cap.
The constants bound the peak resident memory measured on x86-64 and emulated
arm64 for the conv model with onnxruntime and ExecuTorch
(``bench/results/arm64.txt``), with a margin.

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
    "MemoryCappedLevels",
    "ProfileLevels",
    "choose_rate",
    "estimate_seconds",
    "level_costs",
    "memory_cap",
    "memory_needed_mb",
    "relevel",
    "steps_per_round",
    "training_memory_mb",
]


@dataclass(frozen=True)
class DeviceProfile:
    step_ms: float  # measured median training-step time of the reference artifact
    reference_rate: float  # the rate of that reference artifact
    memory_mb: float
    bandwidth_mbps: float  # megabits per second
    runtimes: tuple[str, ...] = ("onnx",)
    num_examples: int | None = None
    base_memory_mb: float = 0.0  # what the device's process holds before loading a level

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceProfile:
        """From a profile already checked by ``heterofl_edge.protocol.DeviceProfile``."""
        return cls(
            float(data["step_ms"]),
            float(data["reference_rate"]),
            float(data["memory_mb"]),
            float(data["bandwidth_mbps"]),
            tuple(data.get("runtimes") or ("onnx",)),
            data.get("num_examples"),
            float(data.get("base_memory_mb") or 0.0),
        )


@dataclass(frozen=True)
class LevelCost:
    rate: float
    flops: int
    parameter_bytes: int
    activation_bytes: int = 0  # outputs of every layer for one example, training forward


@dataclass(frozen=True)
class LevelTable:
    """The policy's knobs."""

    budget_fraction: float = (
        0.5  # a level fits if its estimate is within this share of the deadline
    )
    steps_per_round: int = 300  # when a device does not say how many examples it has
    # Training memory of a level, in MB: session_mb + memory_factor x its parameter MB +
    # activation_factor x its activation MB per example x the batch. Measured peaks (conv,
    # onnxruntime, x86-64, batch 10, over the process before any level): a 140 MB, b 50,
    # c 29, d 20; this gives 147, 64, 36, 25. Over the base a device reports (its process
    # once the reference level has trained) ExecuTorch adds 103 MB at a on x86-64 and 90
    # under emulated arm64, onnxruntime 99 there (bench/results/arm64.txt).
    session_mb: float = 16.0
    memory_factor: float = 12.0
    activation_factor: float = 4.0
    statistics_batch: int = 10  # examples per statistics batch on a memory-limited device
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


def training_memory_mb(level: LevelCost, table: LevelTable, batch_size: int) -> float:
    """The estimated memory (MB) that training ``level`` adds to a device's process."""
    return (
        table.session_mb
        + table.memory_factor * level.parameter_bytes / 2**20
        + table.activation_factor * level.activation_bytes * batch_size / 2**20
    )


def memory_needed_mb(
    level: LevelCost, global_level: LevelCost, table: LevelTable, batch_size: int
) -> float:
    """What a device at ``level`` needs beyond its process: training it, or the statistics.

    The statistics pass runs the global level forward, ``statistics_batch``
    examples at a time: no gradients, no momentum, and each layer's output
    freed once the next is computed, a quarter of training's factors
    (measured, conv a on onnxruntime: 33 MB; this gives 49).
    """
    forward = LevelTable(
        session_mb=table.session_mb,
        memory_factor=table.memory_factor / 4,
        activation_factor=table.activation_factor / 4,
    )
    statistics = training_memory_mb(global_level, forward, table.statistics_batch)
    return max(training_memory_mb(level, table, batch_size), statistics)


def memory_cap(
    profile: DeviceProfile, levels: Sequence[LevelCost], table: LevelTable, batch_size: int
) -> float | None:
    """The largest rate in ``levels`` whose memory fits the device, or None if none does."""
    top = max(levels, key=lambda lv: lv.rate)
    room = profile.memory_mb - profile.base_memory_mb
    fitting = [lv.rate for lv in levels if memory_needed_mb(lv, top, table, batch_size) <= room]
    return max(fitting) if fitting else None


def choose_rate(
    profile: DeviceProfile,
    levels: Sequence[LevelCost],
    table: LevelTable,
    deadline_seconds: float,
    epochs: int,
    batch_size: int,
) -> float:
    """The largest rate that fits the time budget and memory, else the smallest in memory.

    ``ConfigError`` (``insufficient_memory``) when no level fits the device's memory.
    """
    by_rate = {lv.rate: lv for lv in levels}
    reference = by_rate.get(profile.reference_rate)
    if reference is None:
        raise ConfigError(
            f"reference rate {profile.reference_rate:g} is not one of the levels in play",
            f"profile with one of: {', '.join(f'{r:g}' for r in sorted(by_rate))}",
            code="bad_profile",
        )
    cap = memory_cap(profile, levels, table, batch_size)
    if cap is None:
        raise ConfigError(
            f"a memory of {profile.memory_mb:g} MB fits no level in play",
            "give the device more memory",
            code="insufficient_memory",
        )
    steps = steps_per_round(profile, table, epochs, batch_size)
    budget = table.budget_fraction * deadline_seconds
    fitting = sorted((lv for lv in levels if lv.rate <= cap), key=lambda lv: -lv.rate)
    for level in fitting:
        if estimate_seconds(profile, level, reference, steps) <= budget:
            return level.rate
    return fitting[-1].rate


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
    cap_of: Callable[[str], float] | None = None  # the largest rate a device's memory trains

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
            if self.cap_of is not None:
                new_rate = min(new_rate, self.cap_of(outcome.client))
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


@dataclass
class MemoryCappedLevels:
    """The engine's ``LevelPolicy`` for Fix and Dynamic: the draw, capped by each device's memory.

    A device is given the level the paper's rule draws for it, or the largest
    level its memory trains if the draw is larger (``cap_of``). Capping keeps
    every device in every round (refusing small devices would exclude exactly
    the ones HeteroFL is for, and selecting only devices that fit would bias
    which data trains the large levels); the cost is that the levels' shares
    drift below the mode's where memory is short. Devices that fit every
    level are untouched, so such a run is the paper's.
    """

    cap_of: Callable[[str], float]

    def rates(self, plan: RoundPlan, chosen: Sequence[Client]) -> list[float]:
        return [
            min(task.rate, self.cap_of(client.id))
            for task, client in zip(plan.tasks, chosen, strict=True)
        ]

    def observe(self, round_number: int, outcomes: Sequence[Outcome]) -> None:
        return None
