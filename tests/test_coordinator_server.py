"""The real `heterofl-edge coordinator serve` process, over HTTP on 127.0.0.1."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
from safetensors.torch import load, save


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "heterofl_edge",
            "coordinator",
            "serve",
            "--state-dir",
            str(tmp_path),
            "--mode",
            "a-e",
            "--policy",
            "dynamic",
            "--port",
            str(port),
            "--fraction",
            "1",
            "--rounds",
            "1",
            "--min-uploads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = f"http://127.0.0.1:{port}"
    base = f"{root}/v1"
    deadline = time.monotonic() + 60
    while True:  # bounded wait for the port to answer
        try:
            if requests.get(f"{base}/health", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"server did not start: {process.communicate()[1][-2000:]}")
        time.sleep(0.2)
    yield root
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


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
