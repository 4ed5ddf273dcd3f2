"""The real `heterofl-edge coordinator serve` process, over HTTP on 127.0.0.1."""

import json

import pytest
import requests
import torch
from safetensors.torch import load, save

from coordinator.process import start_coordinator, stop


@pytest.fixture
def server(tmp_path):
    process, root = start_coordinator(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "--mode",
            "a-e",
            "--policy",
            "dynamic",
            "--fraction",
            "1",
            "--rounds",
            "1",
            "--min-uploads",
            "1",
        ],
        tmp_path / "coordinator.log",
    )
    yield root
    stop(process)
    assert process.returncode in (0, 130), (tmp_path / "coordinator.log").read_text()[-2000:]


def test_a_device_round_over_real_http(server):
    api = f"{server}/v1"
    registered = requests.post(
        f"{api}/devices",
        json={
            "step_ms": 3,
            "reference_rate": 0.0625,
            "memory_mb": 1024,
            "bandwidth_mbps": 10,
        },
        timeout=10,
    )
    assert registered.status_code == 201
    headers = {"Authorization": f"Bearer {registered.json()['token']}"}
    task = requests.get(f"{api}/task", headers=headers, timeout=10).json()
    assert task["action"] == "train" and task["level"] in ("a", "e")
    weights = requests.get(f"{server}{task['weights_url']}", headers=headers, timeout=30)
    assert weights.headers["Content-Type"] == "application/vnd.safetensors"
    tensors = {
        k: v
        for k, v in load(weights.content).items()
        if not k.endswith(("running_mean", "running_var"))
    }
    trained = {k: v + 0.5 for k, v in tensors.items()}
    body = save(trained, {"num_samples": "32", "labels": json.dumps(list(range(10)))})
    reply = requests.post(f"{server}{task['upload_url']}", data=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    model = load(requests.get(f"{api}/model", timeout=30).content)
    width = tensors["blocks.0.conv.bias"].shape[0]
    assert torch.equal(model["blocks.0.conv.bias"][:width], trained["blocks.0.conv.bias"])
    assert requests.get(f"{api}/rounds/1/weights", timeout=10).status_code == 401
    assert requests.get(f"{api}/openapi.json", timeout=10).json()["info"]["version"] == "1"
