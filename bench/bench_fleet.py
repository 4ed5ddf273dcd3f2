"""Benchmark: the networked system against the in-process simulation, same work.

Six device processes (Fix a1-c1-e1: two each at levels a, c and e; 600 MNIST
examples each; E=1, B=10) run 2 rounds against a coordinator process, then the
in-process simulation runs the same rounds. Reported: wall time per round of
each and their ratio (protocol overhead, with the caveat that device processes
train in parallel on this machine's cores while the simulation trains one
client after another), and bytes each device sent and received per round
against the raw float32 parameter bytes of its level.

    .venv/bin/python bench/bench_fleet.py
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from coordinator.process import start_coordinator, stop
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig
from heterofl_edge.complexity import measure_complexity
from heterofl_edge.data import load_mnist
from heterofl_edge.levels import parse_rate
from heterofl_edge.models import get_architecture
from heterofl_edge.report import write_json
from heterofl_edge.simulation import SimulationConfig, StatisticsClients, run_simulation
from heterofl_edge.training import LocalTrainingConfig

CLIENTS, ROUNDS, EXAMPLES, MODE = 6, 2, 3600, "a1-c1-e1"


def main() -> None:
    data_dir = Path(os.environ["HETEROFL_DATA_DIR"])
    arch = get_architecture("conv")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        coordinator, url = start_coordinator(
            [
                "--state-dir",
                str(work / "state"),
                "--mode",
                MODE,
                "--policy",
                "fix",
                "--rounds",
                str(ROUNDS),
                "--fraction",
                "1",
                "--min-devices",
                str(CLIENTS),
                "--min-uploads",
                str(CLIENTS),
                "--local-epochs",
                "1",
                "--stats-seconds",
                "600",
                "--round-seconds",
                "3600",
            ],
            work / "coordinator.log",
        )
        fleet = Fleet(
            FleetConfig(
                url, data_dir, CLIENTS, "iid", 0, EXAMPLES, [Capabilities()], work / "fleet"
            )
        )
        try:
            import requests

            for level in ("a", "c", "e"):
                requests.get(
                    f"{url}/v1/artifacts/conv/{level}/manifest.json", timeout=900
                ).raise_for_status()
            fleet.start()
            rounds = fleet.follow(
                lambda record: print("networked round", record["round"], flush=True)
            )
        finally:
            fleet.stop()
            stop(coordinator)
        traffic = []
        pattern = re.compile(
            r"round (\d+): trained level (\w+), loss \S+, bytes down (\d+) up (\d+)"
        )
        for log in fleet.logs:
            for match in pattern.finditer(log.read_text()):
                level = match[2]
                raw = 4 * measure_complexity(arch, parse_rate(level)).parameters
                down, up = int(match[3]), int(match[4])
                traffic.append(
                    {
                        "round": int(match[1]),
                        "level": level,
                        "bytes_down": down,
                        "bytes_up": up,
                        "raw_parameter_bytes": raw,
                        "down_over_raw": down / raw,
                        "up_over_raw": up / raw,
                    }
                )
    networked = [(r["finished_at"] - r["opened_at"]) for r in rounds]
    simulated = run_simulation(
        SimulationConfig(
            mode=MODE,
            rounds=ROUNDS,
            num_clients=CLIENTS,
            fraction=1.0,
            train_examples=EXAMPLES,
            local=LocalTrainingConfig(epochs=1),
            statistics=StatisticsClients.round,
        ),
        load_mnist(data_dir),
    )
    in_process = [r.round_seconds for r in simulated.rounds]
    report = {
        "setup": f"{CLIENTS} devices, {MODE} (Fix), {EXAMPLES // CLIENTS} examples each, "
        f"E=1, B=10, {ROUNDS} rounds, cpu_count={os.cpu_count()}",
        "networked_round_seconds": networked,
        "in_process_round_seconds": in_process,
        "networked_over_in_process": [n / s for n, s in zip(networked, in_process, strict=True)],
        "networked_global_accuracy": [r["metrics"].get("global_accuracy") for r in rounds],
        "in_process_global_accuracy": [r.global_accuracy for r in simulated.rounds],
        "traffic_per_device_round": traffic,
    }
    write_json(Path(__file__).parent / "results" / "fleet.json", report)
    print(
        json.dumps({k: v for k, v in report.items() if k != "traffic_per_device_round"}, indent=2)
    )


if __name__ == "__main__":
    main()
