"""Stops and crashes of the real coordinator process, and a fleet that rides them out.

* SIGTERM (or SIGINT) at any moment ends ``coordinator serve`` cleanly: exit 0
  (130 for SIGINT), nothing half-written, and a restart on the same state
  folder finishes the run with the model an uninterrupted run gets.
* ``kill -9`` of the coordinator during its start-up export and during a round
  does not take the fleet down: ``heterofl-edge devices simulate`` and its
  devices wait for the restart, every round finishes, and the model is the
  uninterrupted run's.

"The uninterrupted run's model" is the in-process simulation's with the same
settings (tests/test_fleet.py shows the two agree for an undisturbed networked
run); a stop or crash that lost or double-counted an upload, or resumed a round
from the wrong checkpoint, would show as a difference far above the 1e-4 allowed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from safetensors.torch import load

from coordinator.process import free_port, start_coordinator
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig
from heterofl_edge.simulation import SimulationConfig, StatisticsClients, run_simulation
from heterofl_edge.training import LocalTrainingConfig

pytestmark = pytest.mark.slow

SEED, EXAMPLES, DEVICES = 3, 200, 2
SERVE = [
    "--mode", "a1-e1", "--policy", "fix", "--rounds", "2", "--fraction", "1",
    "--min-devices", "2", "--min-uploads", "2", "--local-epochs", "1", "--batch-size", "50",
    "--lr", "0.01", "--seed", str(SEED), "--poll-seconds", "0.5", "--no-verify-artifacts",
]  # fmt: skip


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the coordinator's log holds ``text`` (the event the test acts on)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None:
            pytest.fail(f"the coordinator exited ({process.returncode}): {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in {timeout:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def stop_with(process: subprocess.Popen[bytes], signum: int, log: Path) -> None:
    """Send ``signum``; the coordinator must end by itself, cleanly."""
    process.send_signal(signum)
    code = process.wait(timeout=120)
    text = log.read_text(errors="replace")
    assert code == (130 if signum == signal.SIGINT else 0), (code, text[-2000:])
    assert "coordinator stopped" in text and "Traceback" not in text, text[-2000:]
    assert "terminate called" not in text


def simulated_model(mnist):
    return run_simulation(
        SimulationConfig(
            mode="a1-e1",
            rounds=2,
            num_clients=DEVICES,
            fraction=1.0,
            lr=0.01,
            seed=SEED,
            train_examples=EXAMPLES,
            test_examples=100,
            local=LocalTrainingConfig(epochs=1, batch_size=50),
            statistics=StatisticsClients.all,  # serve's default: every live device
        ),
        mnist,
    ).global_state


def assert_same_model(served, simulated):
    worst = {name: float((served[name] - t).abs().max()) for name, t in simulated.items()}
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_stops_during_export_and_evaluation_are_clean_and_the_run_completes(
    tmp_path, mnist_dir, mnist, artifact_cache
):
    state = tmp_path / "state"
    artifact_cache(state, ("a",))  # level e is exported by the coordinator: stopped 5 times
    args = [*SERVE, "--state-dir", str(state), "--data-dir", str(mnist_dir)]
    port = free_port()
    starts = iter(range(100))

    def start():
        log = tmp_path / f"coordinator-{next(starts)}.log"
        process, url = start_coordinator(args, log, port=port)
        return process, url, log

    for attempt in range(5):
        process, _, log = start()
        wait_for_line(log, "exporting level e", process, timeout=120)
        stop_with(process, signal.SIGINT if attempt == 2 else signal.SIGTERM, log)
        assert not list((state / "artifacts").glob(".conv-e.*"))  # no half-written export
        assert not (state / "artifacts" / "conv-e").exists()

    process, url, log = start()
    fleet = Fleet(
        FleetConfig(url, mnist_dir, DEVICES, "iid", SEED, EXAMPLES, [Capabilities()], tmp_path)
    )
    try:
        fleet.start()
        for _ in range(5):  # round 1's evaluation (10,000 test images), stopped 5 times
            wait_for_line(log, "round 1: evaluating the global model", process, timeout=300)
            stop_with(process, signal.SIGTERM, log)
            assert "round 1: evaluation interrupted by the stop" in log.read_text()
            process, url, log = start()
        rounds = fleet.follow(lambda record: None, timeout=600)
        served = load(requests.get(f"{url}/v1/model", timeout=60).content)
        stop_with(process, signal.SIGTERM, log)
    finally:
        fleet.stop()
        if process.poll() is None:
            process.kill()
    assert [r["state"] for r in rounds] == ["finished", "finished"]
    assert [r["uploads"] for r in rounds] == [2, 2]
    assert_same_model(served, simulated_model(mnist))


def test_the_fleet_command_rides_out_coordinator_kills(tmp_path, mnist_dir, mnist, artifact_cache):
    state = tmp_path / "state"
    artifact_cache(state, ("a",))  # level e is exported at start-up: killed during it
    args = [*SERVE, "--state-dir", str(state)]
    port = free_port()
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps([{"cpu_slowdown": 1}]))
    log = tmp_path / "coordinator-0.log"
    process, url = start_coordinator(args, log, port=port)
    fleet_log = (tmp_path / "fleet.log").open("wb")
    fleet = subprocess.Popen(
        [
            sys.executable, "-m", "heterofl_edge", "devices", "simulate",
            "--coordinator", url, "--data-dir", str(mnist_dir), "--n", str(DEVICES),
            "--train-examples", str(EXAMPLES), "--seed", str(SEED),
            "--profiles", str(profiles), "--work-dir", str(tmp_path / "fleet"),
        ],
        stdout=fleet_log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_line(log, "exporting level e", process, timeout=120)
        process.kill()  # SIGKILL during the start-up export
        process.wait()
        log = tmp_path / "coordinator-1.log"
        process, url = start_coordinator(args, log, port=port)
        wait_for_line(log, "round 1 opened", process, timeout=600)
        process.kill()  # SIGKILL while the devices train round 1
        process.wait()
        log = tmp_path / "coordinator-2.log"
        process, url = start_coordinator(args, log, port=port)
        assert fleet.wait(timeout=600) == 0, (tmp_path / "fleet.log").read_text()[-3000:]
        health = requests.get(f"{url}/v1/health", timeout=30).json()
        served = load(requests.get(f"{url}/v1/model", timeout=60).content)
        rounds = requests.get(f"{url}/v1/rounds", timeout=30).json()["rounds"]
    finally:
        for child in (fleet, process):
            if child.poll() is None:
                child.kill()
                child.wait()
        fleet_log.close()
    said = (tmp_path / "fleet.log").read_text()
    assert "coordinator unreachable" in said and "coordinator back" in said
    assert "Traceback" not in said
    for device_log in (tmp_path / "fleet").glob("device-*.log"):
        text = device_log.read_text()
        assert "coordinator says done" in text and "Traceback" not in text, text[-1500:]
    assert health["done"] and [r["state"] for r in rounds] == ["finished", "finished"]
    assert_same_model(served, simulated_model(mnist))
