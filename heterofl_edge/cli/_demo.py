"""``heterofl-edge demo``'s orchestration: coordinator process, artifacts, fleet, report.

It composes the coordinator and the device fleet, which only the command line
does. ``run_demo`` starts ``heterofl-edge coordinator serve`` on a fresh state
folder, has it export each level's artifacts, starts a fleet of device
processes on MNIST, follows the rounds, writes ``results.json`` and
``learning_curve.png``, and stops every process it started.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.process import start_coordinator, stop, wait_until_ready
from device_sim.device import Capabilities
from device_sim.fleet import DEFAULT_PROFILES, Fleet, FleetConfig, describe_round
from heterofl_edge.assignment import parse_mode
from heterofl_edge.levels import rate_label

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    data_dir: Path
    out: Path = Path("runs/demo")
    clients: int = 6
    rounds: int = 3
    mode: str = "a-b-c-d-e"  # the levels in play; the profile policy places each device
    policy: str = "profile"
    split: str = "iid"
    train_examples: int | None = 6000
    local_epochs: int = 1
    # The training deadline; a level fits a device when its estimated time is within half
    # of it. 40 s puts a fast device at a, a 3x slower one at b, a 10x slower one at c.
    round_seconds: float = 40.0
    seed: int = 0


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    mix = parse_mode(config.mode)
    state = config.out / "state"
    shutil.rmtree(state, ignore_errors=True)
    coordinator, url = start_coordinator(
        [
            "--state-dir",
            str(state),
            "--mode",
            config.mode,
            "--policy",
            config.policy,
            "--rounds",
            str(config.rounds),
            "--fraction",
            "1",
            "--min-devices",
            str(config.clients),
            "--min-uploads",
            str(max(1, config.clients // 2)),
            "--round-seconds",
            str(config.round_seconds),
            "--stats-seconds",
            "120",
            "--local-epochs",
            str(config.local_epochs),
            "--data-dir",
            str(config.data_dir),
            "--seed",
            str(config.seed),
        ],
        config.out / "coordinator.log",
    )
    fleet_profiles = list(DEFAULT_PROFILES)
    fleet = Fleet(
        FleetConfig(
            url,
            config.data_dir,
            config.clients,
            config.split,
            config.seed,
            config.train_examples,
            fleet_profiles,
            config.out / "fleet",
        ),
        log=log,
    )
    try:
        levels = ", ".join(rate_label(r) for r in mix.rates)
        log(f"the coordinator exports and verifies the artifacts of levels {levels}")
        wait_until_ready(url)
        fleet.start()
        speeds = [_speed(c) for c in fleet_profiles]
        names = {
            device_id: f"{speeds[i % len(speeds)]}-{i}"
            for i, device_id in enumerate(fleet.device_ids)
        }
        rounds = fleet.follow(lambda record: log(describe_round(record, names)))
    finally:
        fleet.stop()
        stop(coordinator)
    return {
        "coordinator": url,
        "config": {k: str(v) for k, v in config.__dict__.items()},
        "devices": names,
        "rounds": rounds,
    }


def _speed(capabilities: Capabilities) -> str:
    if capabilities.cpu_slowdown <= 1:
        return "fast"
    return "medium" if capabilities.cpu_slowdown <= 3 else "slow"
