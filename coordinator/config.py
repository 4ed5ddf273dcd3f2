"""Everything a coordinator run depends on, as one commented dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from coordinator.admission import AdmissionConfig
from coordinator.policy import LevelTable
from heterofl_edge.engine import StatisticsClients
from heterofl_edge.training import LocalTrainingConfig

__all__ = ["CoordinatorConfig", "LevelPolicy"]


class LevelPolicy(StrEnum):
    profile = "profile"  # each device at the largest level its measured profile fits; re-leveled
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
    # A round closes as soon as every selected device has answered or gone silent and
    # min_uploads arrived, or at the deadline; with fewer uploads it fails, the model stays.
    min_uploads: int = 1
    min_devices: int = 1  # round 1 opens once this many devices are live; later: the quorum
    round_seconds: float = 600.0
    stats_seconds: float = 120.0
    statistics: StatisticsClients = StatisticsClients.round  # who reports sBN statistics
    lr: float = 0.01
    milestones: tuple[int, ...] = ()
    lr_factor: float = 0.1
    local: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    seed: int = 0
    # Who may register and read the operator's views, and how fast registrations come.
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    max_upload_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 64 * 1024  # registration and other JSON bodies
    artifact_formats: tuple[str, ...] = ("onnx",)
    artifact_verify: bool = True
    build_artifacts: bool = True  # export every level at start-up (tests without devices skip it)
    # Liveness: a device is offline after this long without a request. Waiting devices
    # poll every poll_seconds; working devices send a heartbeat every heartbeat_interval
    # (heartbeat_seconds, or by default a sixth of the timeout: five beats may be lost).
    device_timeout: float = 30.0
    poll_seconds: float = 2.0
    heartbeat_seconds: float | None = None
    # Training data of the data set eval_data served to browser devices as deterministic
    # shards (demo only).
    demo_data_dir: Path | None = None
    # Held-out data for evaluating the global model after each round (optional): the test
    # split of the data set eval_data (a registry name) in eval_data_dir.
    eval_data_dir: Path | None = None
    eval_data: str = "mnist"
    eval_examples: int | None = None

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between a working device's heartbeats (stated in registration and tasks)."""
        if self.heartbeat_seconds is not None:
            return self.heartbeat_seconds
        return max(0.5, min(10.0, self.device_timeout / 6))
