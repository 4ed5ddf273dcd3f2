"""Choosing a device's level from its measured profile (pure functions).

A device reports how long one training step of a reference artifact takes on
it (``step_ms`` at ``reference_level``), its memory and its bandwidth. The
estimated time of one round at level L is

    compute = step_ms * flops(L) / flops(reference) * steps_per_round
    transfer = 2 * bytes(L) / bandwidth          (weights down, update up)

and the policy picks the largest level in play whose compute + transfer fits
the round-time budget and whose training memory (``memory_factor`` x the
level's parameter bytes, for weights, gradients, momentum and activations)
fits the device; a device that fits none gets the smallest level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from heterofl_edge.errors import ConfigError

__all__ = ["DeviceProfile", "LevelCost", "LevelTable", "choose_rate", "estimate_seconds"]


@dataclass(frozen=True)
class DeviceProfile:
    step_ms: float  # measured median training-step time of the reference artifact
    reference_rate: float  # the rate of that reference artifact
    memory_mb: float
    bandwidth_mbps: float  # megabits per second
    runtimes: tuple[str, ...] = ("onnx",)

    @classmethod
    def from_json(cls, data: object) -> DeviceProfile:
        """Parse a profile; ``ConfigError`` naming the bad field otherwise."""
        if not isinstance(data, Mapping):
            raise ConfigError("profile must be a JSON object", _PROFILE_HINT)
        values = {}
        for name in ("step_ms", "reference_rate", "memory_mb", "bandwidth_mbps"):
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(
                    f"profile field {name!r} must be a positive number", _PROFILE_HINT
                )
            values[name] = float(value)
        if values["reference_rate"] > 1:
            raise ConfigError("profile field 'reference_rate' must lie in (0, 1]", _PROFILE_HINT)
        runtimes = data.get("runtimes", ["onnx"])
        if not isinstance(runtimes, list) or not all(isinstance(r, str) for r in runtimes):
            raise ConfigError("profile field 'runtimes' must be a list of names", _PROFILE_HINT)
        return cls(runtimes=tuple(runtimes), **values)


_PROFILE_HINT = (
    'send {"step_ms": 12.5, "reference_rate": 0.0625, "memory_mb": 2048, '
    '"bandwidth_mbps": 20, "runtimes": ["onnx"]}'
)


@dataclass(frozen=True)
class LevelCost:
    rate: float
    flops: int
    parameter_bytes: int


@dataclass(frozen=True)
class LevelTable:
    """The policy's knobs; every field can be set from the coordinator's config."""

    round_budget_s: float = 300.0
    steps_per_round: int = 300  # E=5 epochs x 60 steps of B=10 (600 examples per client)
    memory_factor: float = 8.0


def estimate_seconds(
    profile: DeviceProfile, level: LevelCost, reference: LevelCost, table: LevelTable
) -> float:
    compute = profile.step_ms / 1000 * level.flops / reference.flops * table.steps_per_round
    transfer = 2 * level.parameter_bytes * 8 / (profile.bandwidth_mbps * 1e6)
    return compute + transfer


def choose_rate(profile: DeviceProfile, levels: Sequence[LevelCost], table: LevelTable) -> float:
    """The largest rate in ``levels`` that fits the budget and memory, else the smallest."""
    by_rate = {lv.rate: lv for lv in levels}
    reference = by_rate.get(profile.reference_rate)
    if reference is None:
        raise ConfigError(
            f"reference rate {profile.reference_rate:g} is not one of the levels in play",
            f"profile with one of: {', '.join(f'{r:g}' for r in sorted(by_rate))}",
        )
    for level in sorted(levels, key=lambda lv: lv.rate, reverse=True):
        fits_time = estimate_seconds(profile, level, reference, table) <= table.round_budget_s
        fits_memory = table.memory_factor * level.parameter_bytes <= profile.memory_mb * 2**20
        if fits_time and fits_memory:
            return level.rate
    return min(by_rate)
