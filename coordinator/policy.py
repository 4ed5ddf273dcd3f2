"""Placing devices at levels from what they measured: ``heterofl_edge.profile_policy``.

The policy is pure (profiles, costs and timings in, levels out); it lives in the
core so that ``simulate`` can place simulated devices by the same step-time model.
This module keeps the coordinator's imports where they were.
"""

from heterofl_edge.profile_policy import (
    DeviceProfile,
    LevelCost,
    LevelTable,
    ProfileLevels,
    choose_rate,
    estimate_seconds,
    relevel,
    steps_per_round,
)

__all__ = [
    "DeviceProfile",
    "LevelCost",
    "LevelTable",
    "ProfileLevels",
    "choose_rate",
    "estimate_seconds",
    "relevel",
    "steps_per_round",
]
