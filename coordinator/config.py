"""Everything a coordinator run depends on: the federation spec and the fleet's service.

``CoordinatorConfig`` is a ``heterofl_edge.spec.FederationSpec`` (the run:
model, levels, rounds, schedule, statistics, ...) with what only a
coordinator has: a state folder, the quorum and deadlines of a fleet of real
devices, liveness, artifacts, admission and demo data. It is validated once,
in its constructor, without I/O; ``coordinator.bootstrap`` opens the state.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.admission import AdmissionConfig
from coordinator.policy import LevelTable
from coordinator.schemas import MODEL_NAME_PATTERN
from heterofl_edge.data.registry import resolve_dataset
from heterofl_edge.errors import ConfigError
from heterofl_edge.federation import Quorum
from heterofl_edge.models import get_architecture
from heterofl_edge.spec import FederationSpec, Policy

__all__ = ["CoordinatorConfig"]


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig(FederationSpec):
    state_dir: Path
    # Devices measure themselves: by default each gets the largest level its profile fits.
    policy: Policy | None = Policy.profile
    level_table: LevelTable = field(default_factory=LevelTable)
    # A round closes as soon as every selected device has answered or gone silent and
    # min_uploads arrived, or at the deadline; with fewer uploads it fails, the model stays.
    min_uploads: int = 1
    min_devices: int = 1  # round 1 opens once this many devices are live; later: the quorum
    round_seconds: float = 600.0
    stats_seconds: float = 120.0
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
    # Training data of the data set `data` served to browser devices as deterministic
    # shards (demo only).
    demo_data_dir: Path | None = None
    # Held-out data for evaluating the global model after each round (optional): the test
    # split of the data set `data` in data_dir (`test_examples` of it, as simulate scores).
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        """The spec's checks, and what a coordinator would otherwise fail on in every round."""
        super().__post_init__()
        for name, count in (
            ("--min-uploads", self.min_uploads),
            ("--min-devices", self.min_devices),
        ):
            if count < 1:
                raise ConfigError(f"{name} must be at least 1, got {count}")
        for name, seconds in (
            ("--round-seconds", self.round_seconds),
            ("--stats-seconds", self.stats_seconds),
            ("--device-timeout", self.device_timeout),
            ("--poll-seconds", self.poll_seconds),
        ):
            if not (seconds > 0 and not math.isnan(seconds)):
                raise ConfigError(f"{name} must be positive, got {seconds}")
        self.check_reachable(self.min_devices)  # the first round's pool, at least
        unknown = [f for f in self.artifact_formats if f not in ("onnx", "executorch")]
        if unknown or not self.artifact_formats:
            raise ConfigError(
                f"unknown artifact formats {list(self.artifact_formats)}",
                "use onnx or onnx,executorch",
            )
        arch = get_architecture(self.model)
        if not re.fullmatch(MODEL_NAME_PATTERN, arch.name):
            raise ConfigError(
                f"model name {arch.name!r} cannot appear in artifact URLs",
                "name the model with letters, digits and . _ - : (at most 200 characters)",
            )
        if self.data_dir is not None or self.demo_data_dir is not None:
            entry = resolve_dataset(self.data_name)
            if entry.task is not None and entry.task is not arch.task:
                raise ConfigError(
                    f"data set {entry.name!r} is for {entry.task.value}, model {arch.name!r} "
                    f"is a {arch.task.value} model",
                    "pick the model's kind of data set with --data",
                )

    @property
    def quorum(self) -> Quorum:
        """When rounds open and close (the round engine's settings beside the spec's)."""
        # A secure aggregation stage (keys, shares, unmasking) waits at most the statistics
        # deadline: devices answer it in milliseconds unless they are gone.
        return Quorum(
            self.min_devices,
            self.min_uploads,
            self.round_seconds,
            self.stats_seconds,
            self.stats_seconds,
        )

    @property
    def profiled(self) -> bool:
        """Whether devices are placed by their measured profile (else the mode's Fix/Dynamic)."""
        return self.policy is Policy.profile

    @property
    def policy_name(self) -> str:
        """The placement in words: profile, fix or dynamic (the mode's own, where unset)."""
        return self.policy.value if self.policy is not None else self.level_mix.assignment.value

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between a working device's heartbeats (stated in registration and tasks)."""
        if self.heartbeat_seconds is not None:
            return self.heartbeat_seconds
        return max(0.5, min(10.0, self.device_timeout / 6))
