"""Everything a coordinator run depends on, as one commented dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from coordinator.policy import LevelTable
from heterofl_edge.training import LocalTrainingConfig

__all__ = ["CoordinatorConfig", "LevelPolicy"]


class LevelPolicy(StrEnum):
    profile = "profile"  # the largest level whose estimated round time fits the budget
    fix = "fix"  # the paper's Fix: proportions from --mode, by registration order
    dynamic = "dynamic"  # the paper's Dynamic: a fresh draw from --mode every round


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    model: str = "conv"
    # Levels in play (paper notation); the global model has the largest one's width.
    mode: str = "a-b-c-d-e"
    policy: LevelPolicy = LevelPolicy.profile
    level_table: LevelTable = field(default_factory=LevelTable)
    rounds: int = 10
    fraction: float = 0.1
    # A round is finalised at the deadline if at least min_uploads arrived, or as soon
    # as every selected device has answered; with fewer, it is recorded as failed.
    min_uploads: int = 1
    min_devices: int = 1  # a round opens once this many devices are registered
    round_seconds: float = 600.0
    stats_seconds: float = 120.0
    statistics_query: bool = True  # ask devices for sBN statistics after each round
    lr: float = 0.01
    milestones: tuple[int, ...] = ()
    lr_factor: float = 0.1
    local: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    seed: int = 0
    max_upload_bytes: int = 64 * 1024 * 1024
    artifact_formats: tuple[str, ...] = ("onnx",)
    artifact_verify: bool = True
    # Held-out MNIST for evaluating the global model after each round (optional).
    eval_data_dir: Path | None = None
    eval_examples: int | None = None
