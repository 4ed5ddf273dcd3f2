"""The networked system on the real MNIST: coordinator process + device processes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from image_helpers import write_mnist_as_images
from safetensors.torch import load

from coordinator.process import start_coordinator, stop, wait_until_ready
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig
from heterofl_edge.simulation import (
    Execution,
    SimulationConfig,
    StatisticsClients,
    Submodel,
    run_simulation,
)
from heterofl_edge.training import LocalTrainingConfig

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp"


@pytest.fixture
def torch_blocked(tmp_path, monkeypatch):
    """Device processes see a 'torch' package that refuses to import."""
    shim = tmp_path / "no-torch"
    (shim / "torch").mkdir(parents=True)
    (shim / "torch" / "__init__.py").write_text(
        "raise ImportError('torch is blocked in device processes')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(shim))
    return shim


def serve(tmp_path, mnist_dir, *args):
    """Start ``coordinator serve``; its artifacts must already be in the state folder.

    Devices poll every 0.5 s (not 2 s) and the global model is evaluated on 2,000 test images
    (not 10,000): each round's phases then follow one another without idle seconds.
    """
    return start_coordinator(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "--data-dir",
            str(mnist_dir),
            "--test-examples",
            "2000",
            "--poll-seconds",
            "0.5",
            *args,
        ],
        tmp_path / "coordinator.log",
    )


def run_to_the_end(coordinator, url, fleet):
    """Start the fleet once the coordinator is ready, follow every round, stop both.

    Returns the round records and the global model the coordinator serves at the end.
    """
    try:
        wait_until_ready(url)
        fleet.start()
        rounds = fleet.follow(lambda record: None, timeout=600)
        served = load(requests.get(f"{url}/v1/model", timeout=60).content)
    finally:
        fleet.stop()
        stop(coordinator)
    return rounds, served


def test_six_devices_three_levels_survive_a_killed_device(
    tmp_path, mnist_dir, torch_blocked, monkeypatch, artifact_cache
):
    artifact_cache(tmp_path / "state", ("a", "c", "e"))
    # The coordinator itself needs torch: start it before devices inherit the blocking path.
    monkeypatch.delenv("PYTHONPATH")
    coordinator, url = serve(
        tmp_path,
        mnist_dir,
        "--mode",
        "a1-c1-e1",
        "--policy",
        "fix",
        "--rounds",
        "2",
        "--fraction",
        "1",
        "--min-devices",
        "6",
        "--min-uploads",
        "3",
        "--round-seconds",
        "300",
        "--device-timeout",
        "15",  # the killed device is given up after 15 s of silence, not at the deadline
        "--local-epochs",
        "1",
    )
    monkeypatch.setenv("PYTHONPATH", str(torch_blocked))
    fleet = Fleet(
        FleetConfig(url, mnist_dir, 6, "iid", 0, 3000, [Capabilities()], tmp_path / "fleet")
    )
    try:
        wait_until_ready(url)
        fleet.start()
        fleet.kill(0)  # device 0 (level a) dies in the middle of round 1
        rounds = fleet.follow(lambda record: None, timeout=600)
    finally:
        fleet.stop()
        stop(coordinator)
    assert [r["state"] for r in rounds] == ["finished", "finished"]
    first = rounds[0]
    assert first["metrics"]["uploads"] == 5 and first["metrics"]["timed_out"] == 1
    assert {a["level"] for a in first["assignments"] if a["status"] == "uploaded"} == {
        "a",
        "c",
        "e",
    }
    assert rounds[-1]["metrics"]["evaluation"]["global_accuracy"] > 0.6  # chance is 0.1
    for log in fleet.logs[1:]:
        text = log.read_text()
        assert "coordinator says done" in text, text[-800:]
        assert "blocked" not in text and "Traceback" not in text


@pytest.mark.parametrize("submodel", ["static", "rolling"])
def test_networked_rounds_equal_the_in_process_simulation(
    tmp_path, mnist_dir, mnist, torch_blocked, monkeypatch, artifact_cache, submodel
):
    """HeteroFL's static slices, and FedRolex's rolling windows (round 2's start one later)."""
    artifact_cache(tmp_path / "state", ("a", "e"))
    # 100 examples per device in batches of 50: 2 local steps per round. Long local runs with
    # batch-10 BatchNorm on real MNIST amplify float32 noise chaotically (eager float32 itself
    # drifts 1e-2 from float64 over 50 steps at lr 0.05; ONNX and eager differ by 2e-7 after one
    # step and 1e-4 after 20), which would hide what this test checks: that artifacts, wire
    # format, seeds and aggregation agree. A wrong batch order, lr, mask or level shows as >1e-3.
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
    monkeypatch.delenv("PYTHONPATH")
    coordinator, url = serve(
        tmp_path,
        mnist_dir,
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
        "--submodel",
        submodel,
    )
    monkeypatch.setenv("PYTHONPATH", str(torch_blocked))
    fleet = Fleet(
        FleetConfig(url, mnist_dir, 4, "iid", 3, 400, [Capabilities()], tmp_path / "fleet")
    )
    rounds, networked = run_to_the_end(coordinator, url, fleet)
    assert [r["state"] for r in rounds] == ["finished", "finished"]

    simulated = run_simulation(
        SimulationConfig(
            **settings,
            local=LocalTrainingConfig(epochs=1, batch_size=50),
            statistics=StatisticsClients.all,  # serve's default: every live device
            submodel=Submodel(submodel),
        ),
        mnist,
    ).global_state
    worst = {
        name: float((networked[name] - tensor).abs().max()) for name, tensor in simulated.items()
    }
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_onnx_and_executorch_devices_train_in_the_same_round(tmp_path, mnist_dir, artifact_cache):
    artifact_cache(tmp_path / "state", ("e",), global_rate=0.0625, formats=("onnx", "executorch"))
    coordinator, url = serve(
        tmp_path,
        mnist_dir,
        "--mode",
        "e",
        "--policy",
        "fix",
        "--rounds",
        "1",
        "--fraction",
        "1",
        "--min-devices",
        "2",
        "--min-uploads",
        "2",
        "--local-epochs",
        "1",
        "--formats",
        "onnx,executorch",
    )
    profiles = [Capabilities(runtime="onnx"), Capabilities(runtime="executorch")]
    fleet = Fleet(FleetConfig(url, mnist_dir, 2, "iid", 0, 400, profiles, tmp_path / "fleet"))
    rounds, _ = run_to_the_end(coordinator, url, fleet)
    record = rounds[0]
    assert record["state"] == "finished" and record["metrics"]["uploads"] == 2
    assert {a["statistics"] for a in record["assignments"]} == {"uploaded"}
    assert record["metrics"]["evaluation"]["global_accuracy"] > 0.2  # one round of e, 400 examples
    executorch_log = fleet.logs[1].read_text()
    assert "round 1: trained level e" in executorch_log and "sent sBN statistics" in executorch_log
    assert (
        tmp_path / "fleet" / "cache" / "device-1" / "conv-e" / "executorch" / "train.pte"
    ).is_file()


def test_resnet18_trains_one_round_through_the_coordinator_on_an_image_folder(
    tmp_path, mnist_dir, torch_blocked, monkeypatch, artifact_cache
):
    """A model other than conv, on a user's image folder: coordinator, devices without torch."""
    digits = tmp_path / "digits"
    write_mnist_as_images(mnist_dir, digits, train=200, test=100)
    artifact_cache(tmp_path / "state", ("e",), global_rate=0.0625, model="resnet18")
    monkeypatch.delenv("PYTHONPATH")
    coordinator, url = serve(
        tmp_path,
        digits,
        "--model",
        "resnet18",
        "--data",
        "imagefolder",
        "--mode",
        "e",
        "--policy",
        "fix",
        "--rounds",
        "1",
        "--fraction",
        "1",
        "--min-devices",
        "2",
        "--min-uploads",
        "2",
        "--local-epochs",
        "1",
    )
    monkeypatch.setenv("PYTHONPATH", str(torch_blocked))
    fleet = Fleet(
        FleetConfig(
            url,
            digits,
            2,
            "iid",
            0,
            None,
            [Capabilities()],
            tmp_path / "fleet",
            device_options=("--data", "imagefolder"),
        )
    )
    rounds, served = run_to_the_end(coordinator, url, fleet)
    record = rounds[0]
    assert record["state"] == "finished" and record["metrics"]["uploads"] == 2
    assert {a["statistics"] for a in record["assignments"]} == {"uploaded"}
    evaluation = record["metrics"]["evaluation"]
    assert evaluation["test_examples"] == 100  # the image folder's test split
    assert math.isfinite(evaluation["global_loss"]) and 0 <= evaluation["global_accuracy"] <= 1
    assert tuple(served["conv1.weight"].shape) == (4, 3, 3, 3)  # resnet18 at e: 64 / 16 channels
    for log in fleet.logs:
        text = log.read_text()
        assert "round 1: trained level e" in text and "sent sBN statistics" in text, text[-800:]
        assert "Traceback" not in text


def _transformer_without_dropout() -> str:
    """The transformer as devices train it (the exported programs have no dropout)."""
    from dataclasses import replace

    from heterofl_edge.models import get_architecture, list_models, register_architecture
    from heterofl_edge.models.transformer import MaskedLanguageTransformer

    name = "transformer-without-dropout"
    if name not in list_models():
        register_architecture(
            replace(
                get_architecture("transformer"),
                name=name,
                factory=lambda w, s: MaskedLanguageTransformer(w, s, dropout=0.0),
            )
        )
    return name


def test_the_transformer_trains_through_the_coordinator_as_in_the_simulation(
    tmp_path, wikitext2_dir, wikitext2, torch_blocked, monkeypatch, artifact_cache
):
    """Devices without torch train the masked language model on WikiText-2's text; the
    global model equals the in-process simulation's (same masks, batches and labels)."""
    artifact_cache(tmp_path / "state", ("e",), global_rate=0.0625, model="transformer")
    monkeypatch.delenv("PYTHONPATH")
    coordinator, url = start_coordinator(
        [
            "--state-dir", str(tmp_path / "state"),
            "--model", "transformer", "--data", "wikitext2",
            "--data-dir", str(wikitext2_dir), "--test-examples", "100",
            "--poll-seconds", "0.5",
            "--mode", "e", "--policy", "fix", "--rounds", "1", "--fraction", "1",
            "--min-devices", "2", "--min-uploads", "2",
            "--local-epochs", "1", "--batch-size", "10", "--lr", "0.1", "--seed", "3",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(torch_blocked))
    fleet = Fleet(
        FleetConfig(
            url,
            wikitext2_dir,
            2,
            "iid",
            3,
            40,
            [Capabilities()],
            tmp_path / "fleet",
            device_options=("--data", "wikitext2"),
        )
    )
    rounds, networked = run_to_the_end(coordinator, url, fleet)
    record = rounds[0]
    assert record["state"] == "finished" and record["metrics"]["uploads"] == 2
    evaluation = record["metrics"]["evaluation"]
    assert math.isfinite(evaluation["global_perplexity"]), evaluation
    for log in fleet.logs:
        text = log.read_text()
        assert "round 1: trained level e" in text and "Traceback" not in text, text[-800:]

    simulated = run_simulation(
        SimulationConfig(
            model=_transformer_without_dropout(),
            data="wikitext2",
            mode="e",
            rounds=1,
            num_clients=2,
            fraction=1.0,
            lr=0.1,
            seed=3,
            train_examples=40,
            test_examples=100,
            local=LocalTrainingConfig(epochs=1, batch_size=10),
        ),
        wikitext2,
        execution=Execution(workers=1),  # in this process, where the copy is registered
    )
    worst = {
        name: float((networked[name] - tensor).abs().max())
        for name, tensor in simulated.global_state.items()
    }
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert simulated.rounds[-1].global_perplexity == pytest.approx(
        evaluation["global_perplexity"], rel=1e-4
    )


def test_the_example_project_trains_through_a_coordinator_with_two_devices(
    tmp_path, torch_blocked, monkeypatch
):
    """examples/tiny_mlp (a model and a data set the package does not know, named by
    module:factory) through a coordinator; its devices read exported arrays, without torch."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from tiny_mlp.data import write_blobs

    write_blobs(tmp_path / "blobs", train=400, test=200)
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))
    exported = subprocess.run(
        [
            sys.executable, "-m", "heterofl_edge", "data", "export",
            "--data", "tiny_mlp.data:load", "--data-dir", str(tmp_path / "blobs"),
            "--out", str(tmp_path / "arrays"),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "400 training examples of shape (16,) in 4 classes" in exported.stdout
    coordinator, url = serve(
        tmp_path,
        tmp_path / "blobs",
        "--model", "tiny_mlp.model:build", "--data", "tiny_mlp.data:load",
        "--mode", "a1-e1", "--policy", "fix", "--rounds", "2", "--fraction", "1",
        "--min-devices", "2", "--min-uploads", "2",
        "--local-epochs", "2", "--batch-size", "20", "--lr", "0.05",
    )  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(torch_blocked))
    fleet = Fleet(
        FleetConfig(
            url,
            tmp_path / "arrays",
            2,
            "iid",
            0,
            None,
            [Capabilities()],
            tmp_path / "fleet",
            device_options=("--data", "arrays"),
        )
    )
    rounds, _ = run_to_the_end(coordinator, url, fleet)
    assert [r["state"] for r in rounds] == ["finished", "finished"]
    assert {a["level"] for a in rounds[0]["assignments"]} == {"a", "e"}
    evaluation = rounds[-1]["metrics"]["evaluation"]
    assert evaluation["test_examples"] == 200
    assert evaluation["global_accuracy"] > 0.5, evaluation  # chance: 0.25
    for log in fleet.logs:
        text = log.read_text()
        assert "coordinator says done" in text and "Traceback" not in text, text[-800:]
