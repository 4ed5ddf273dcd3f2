"""Secure aggregation over HTTP: ``coordinator serve --secure-aggregation`` and Python devices.

The devices (device_sim, torch blocked) answer the SecAgg+ stages at
/v1/rounds/N/secagg and upload masked vectors; the coordinator unmasks only
the sums. Bad input at each stage is refused with a code and nothing is kept.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests
from safetensors.numpy import load

from coordinator.process import start_coordinator, stop, wait_until_ready
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig
from heterofl_edge.simulation import (
    SimulationConfig,
    StatisticsClients,
    run_simulation,
)
from heterofl_edge.training import LocalTrainingConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def torch_blocked(tmp_path, monkeypatch):
    """Device processes see a 'torch' package that refuses to import."""
    shim = tmp_path / "no-torch"
    (shim / "torch").mkdir(parents=True)
    (shim / "torch" / "__init__.py").write_text(
        "raise ImportError('torch is blocked in device processes')\n"
    )
    return shim


def test_a_networked_secure_round_equals_the_in_process_secure_simulation(
    tmp_path, mnist_dir, mnist, torch_blocked, monkeypatch, artifact_cache
):
    artifact_cache(tmp_path / "state", ("a", "e"))
    settings = dict(
        mode="a1-e1",
        rounds=2,
        num_clients=4,
        fraction=0.5,
        lr=0.01,
        seed=3,
        train_examples=400,
        test_examples=2000,
    )
    coordinator, url = start_coordinator(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "--data-dir",
            str(mnist_dir),
            "--test-examples",
            "2000",
            "--poll-seconds",
            "0.5",
            "--mode",
            "a1-e1",
            "--policy",
            "fix",
            "--rounds",
            "2",
            "--fraction",
            "0.5",
            "--min-devices",
            "4",
            "--min-uploads",
            "2",
            "--local-epochs",
            "1",
            "--batch-size",
            "50",
            "--lr",
            "0.01",
            "--seed",
            "3",
            "--secure-aggregation",
        ],
        tmp_path / "coordinator.log",
    )
    monkeypatch.setenv("PYTHONPATH", str(torch_blocked))
    fleet = Fleet(
        FleetConfig(url, mnist_dir, 4, "iid", 3, 400, [Capabilities()], tmp_path / "fleet")
    )
    try:
        wait_until_ready(url)
        fleet.start()
        rounds = fleet.follow(lambda record: None, timeout=600)
        served = load(requests.get(f"{url}/v1/model", timeout=60).content)
    finally:
        fleet.stop()
        stop(coordinator)
    monkeypatch.delenv("PYTHONPATH")
    assert [r["state"] for r in rounds] == ["finished", "finished"], rounds
    simulated = run_simulation(
        SimulationConfig(
            **settings,
            local=LocalTrainingConfig(epochs=1, batch_size=50),
            statistics=StatisticsClients.all,
            secure_aggregation=True,
        ),
        mnist,
    ).global_state
    worst = {
        name: float(np.abs(served[name] - tensor.numpy()).max())
        for name, tensor in simulated.items()
    }
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
