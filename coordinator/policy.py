"""Placing devices at levels from what they measured: ``heterofl_edge.profile_policy``.

The policy is pure (profiles, costs and timings in, levels out); it lives in the
core so that ``simulate`` can place simulated devices by the same step-time model.
This module keeps the coordinator's imports where they were.
"""

from heterofl_edge.profile_policy import (
    DeviceProfile,
    LevelCost,
    LevelTable,
    MemoryCappedLevels,
    ProfileLevels,
    choose_rate,
    estimate_seconds,
    level_costs,
    memory_cap,
    memory_needed_mb,
    relevel,
    steps_per_round,
    training_memory_mb,
)

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
