"""The whole system in one call: coordinator process, artifacts, fleet, report.

``run_demo`` starts ``heterofl-edge coordinator serve`` on a fresh state
folder, has it export each level's artifacts, starts a fleet of device
processes on MNIST, follows the rounds, writes ``results.json`` and
``learning_curve.png``, and stops every process it started.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from coordinator.process import start_coordinator, stop
from device_sim.fleet import DEFAULT_PROFILES, Fleet, FleetConfig
from heterofl_edge.assignment import parse_mode
from heterofl_edge.levels import rate_label

__all__ = ["DemoConfig", "describe_round", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    data_dir: Path
    out: Path = Path("runs/demo")
    clients: int = 6
    rounds: int = 3
    mode: str = "a1-c1-e1"  # Fix: a third of the devices at each of a, c and e
    split: str = "iid"
    train_examples: int | None = 6000
    local_epochs: int = 1
    round_seconds: float = 300.0
    seed: int = 0


def describe_round(record: dict[str, Any]) -> str:
    metrics = record["metrics"]
    per_level: dict[str, list[float]] = {}
    for a in record["assignments"]:
        if a["status"] == "uploaded":
            per_level.setdefault(a["level"], []).append(
                (a.get("metrics") or {}).get("loss", math.nan)
            )
    levels = "  ".join(
        f"{level}: {len(losses)} trained, loss {sum(losses) / len(losses):.3f}"
        for level, losses in sorted(per_level.items())
    )
    accuracy = metrics.get("global_accuracy")
    shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
    timed_out = metrics.get("timed_out", 0)
    return f"round {record['round']} {record['state']}: global accuracy {shown}  |  {levels}" + (
        f"  |  {timed_out} timed out" if timed_out else ""
    )


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
            mix.assignment.value,
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
            "--eval-data-dir",
            str(config.data_dir),
            "--seed",
            str(config.seed),
        ],
        config.out / "coordinator.log",
    )
    fleet = Fleet(
        FleetConfig(
            url,
            config.data_dir,
            config.clients,
            config.split,
            config.seed,
            config.train_examples,
            list(DEFAULT_PROFILES),
            config.out / "fleet",
        ),
        log=log,
    )
    try:
        for rate in mix.rates:
            log(f"exporting and verifying level {rate_label(rate)} artifacts (first request)")
            requests.get(
                f"{url}/v1/artifacts/conv/{rate_label(rate)}/manifest.json", timeout=600
            ).raise_for_status()
        fleet.start()
        rounds = fleet.follow(lambda record: log(describe_round(record)))
    finally:
        fleet.stop()
        stop(coordinator)
    return {
        "coordinator": url,
        "config": {k: str(v) for k, v in config.__dict__.items()},
        "rounds": rounds,
    }
