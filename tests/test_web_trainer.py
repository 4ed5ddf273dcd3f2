"""The browser's trainer (web/trainer.js on onnxruntime-web's wasm, run in node) against
device_sim's OnnxLevel on Python onnxruntime: same artifact, weights, data and seed."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from device_sim.onnx_backend import OnnxLevel
from heterofl_edge.device_runtime import TrainingRequest

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None or not (WEB / "node_modules" / "onnxruntime-web").is_dir():
        message = "node or web/node_modules missing: run 'make web'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_browser_trainer_matches_python_onnxruntime(node, artifact_cache, tmp_path):
    artifact_cache(tmp_path, ("e",))  # conv e as the coordinator's tests use it
    conv_e = tmp_path / "artifacts" / "conv-e"
    level = OnnxLevel(conv_e)
    rng = np.random.default_rng(0)
    weights = {
        p["name"]: (rng.standard_normal(p["shape"]) * 0.1).astype(np.float32)
        for p in level.manifest["parameters"]
    }
    labels = [0, 2, 3, 5, 7, 9]  # the mask leaves four labels out
    x = rng.standard_normal((37, 1, 28, 28)).astype(np.float32)
    y = rng.choice(labels, 37).astype(np.int64)
    task = {"lr": 0.05, "epochs": 2, "batch_size": 8, "seed": 2**32 - 5, "labels": labels}
    inputs, outputs = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    inputs.write_bytes(
        save({**weights, "x": x, "y": y}, metadata={k: json.dumps(v) for k, v in task.items()})
    )
    subprocess.run(
        [node, str(WEB / "tools" / "run_level.mjs"), str(conv_e), str(inputs), str(outputs)],
        check=True,
        timeout=300,
    )

    expected = level.train(TrainingRequest(weights, x, y, labels, 0.05, 2, 8, task["seed"]))
    stats = level.statistics(expected.weights, x)
    raw = outputs.read_bytes()
    got = load(raw)
    metrics = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]

    assert json.loads(metrics["steps"]) == expected.steps == 10  # 5 batches (last short) x 2
    assert json.loads(metrics["accuracy"]) == expected.accuracy
    assert json.loads(metrics["loss"]) == pytest.approx(expected.loss, abs=1e-6)
    for name, value in expected.weights.items():
        np.testing.assert_allclose(got[f"trained.{name}"], value, rtol=0, atol=1e-6)
        assert not np.array_equal(value, weights[name])  # it did train
    assert {k.removeprefix("stats.") for k in got if k.startswith("stats.")} == set(stats)
    for name, value in stats.items():
        assert got[f"stats.{name}"].shape == value.shape
        np.testing.assert_allclose(got[f"stats.{name}"], value, rtol=0, atol=1e-5)
