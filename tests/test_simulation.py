"""Short HeteroFL runs on the real MNIST."""

import json
import subprocess
import sys

import pytest

from heterofl_edge.simulation import SimulationConfig, Split, StatisticsClients, run_simulation
from heterofl_edge.training import LocalTrainingConfig

pytestmark = pytest.mark.slow


def test_simulate_cli_raises_accuracy_and_writes_json_and_png(tmp_path, mnist_dir):
    out_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "heterofl_edge",
            "simulate",
            "--data-dir",
            str(mnist_dir),
            "--mode",
            "b-e",
            "--split",
            "iid",
            "--rounds",
            "2",
            "--clients",
            "10",
            "--fraction",
            "0.5",
            "--local-epochs",
            "1",
            "--train-examples",
            "3000",
            "--test-examples",
            "2000",
            "--statistics",
            "round",
            "--seed",
            "3",
            "--out",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out_dir / "results.json").read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert sum(rounds[0]["levels"].values()) == 5 and set(rounds[0]["levels"]) <= {"b", "e"}
    assert report["initial_global_accuracy"] < 0.3
    assert rounds[-1]["global_accuracy"] > report["initial_global_accuracy"] + 0.3
    assert (out_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round   2/2" in result.stdout


def test_non_iid_run_reports_local_accuracy_and_is_reproducible(mnist):
    config = SimulationConfig(
        mode="a1-e1",
        split=Split.non_iid,
        rounds=1,
        num_clients=10,
        fraction=0.4,
        local=LocalTrainingConfig(epochs=1),
        train_examples=2000,
        test_examples=1000,
        statistics=StatisticsClients.round,
        seed=7,
    )
    first = run_simulation(config, mnist)
    second = run_simulation(config, mnist)
    record = first.rounds[0]
    assert record.local_accuracy is not None and 0.0 <= record.local_accuracy <= 1.0
    # Masked local accuracy: each client is scored on its own (at most two) labels.
    assert record.local_accuracy > record.global_accuracy
    assert record.levels == second.rounds[0].levels
    for name, tensor in first.global_state.items():
        assert (tensor == second.global_state[name]).all(), name
