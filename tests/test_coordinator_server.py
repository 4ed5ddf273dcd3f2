"""The real `heterofl-edge coordinator serve` process, over HTTP on 127.0.0.1."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
from safetensors.torch import load, save

from coordinator.process import free_port, start_coordinator, stop


def next_task(api, headers, timeout=900.0):
    """Poll /v1/task as a device does (retry_after apart) until it is not 'wait'.

    No assumption about how long the coordinator's own work takes (evaluating
    10,000 test images on a busy machine can take minutes): a device waits as
    long as it is told to, and ``timeout`` is only a safety net for a hung run.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = requests.get(f"{api}/task", headers=headers, timeout=30).json()
        if task["action"] != "wait":
            return task
        time.sleep(min(task["retry_after"], 0.2))
    raise AssertionError("no task within the timeout")


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
            "--no-artifacts",
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
    task = next_task(api, headers)
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
    stats_task = next_task(api, headers)
    assert stats_task["action"] == "statistics" and stats_task["expected_count"] == 32
    stats = {}
    for i, width in enumerate((64, 128, 256, 512)):
        stats[f"blocks.{i}.norm.count"] = torch.tensor(32.0)
        stats[f"blocks.{i}.norm.mean"] = torch.zeros(width)
        stats[f"blocks.{i}.norm.var"] = torch.ones(width)
    reply = requests.post(
        f"{server}{stats_task['upload_url']}", data=save(stats), headers=headers, timeout=30
    )
    assert reply.status_code == 200, reply.text
    assert next_task(api, headers)["action"] == "done"
    model = load(requests.get(f"{api}/model", timeout=30).content)
    width = tensors["blocks.0.conv.bias"].shape[0]
    assert torch.equal(model["blocks.0.conv.bias"][:width], trained["blocks.0.conv.bias"])
    assert requests.get(f"{api}/rounds/1/weights", timeout=10).status_code == 401
    assert requests.get(f"{api}/openapi.json", timeout=10).json()["info"]["version"] == "1"


def protocol_server(tmp_path, *extra):
    return start_coordinator(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "--mode",
            "a1-e1",
            "--policy",
            "fix",
            "--fraction",
            "1",
            "--rounds",
            "1",
            "--min-devices",
            "2",
            "--min-uploads",
            "2",
            "--no-artifacts",
            *extra,
        ],
        tmp_path / "coordinator.log",
    )


def test_a_request_that_stops_arriving_is_answered_408(tmp_path):
    process, url = protocol_server(tmp_path, "--body-timeout", "2")
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as stalled:
            stalled.sendall(
                b"POST /v1/devices HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"step'
            )
            started = time.monotonic()
            reply = b""
            while chunk := stalled.recv(4096):  # the server answers, then closes
                reply += chunk
            waited = time.monotonic() - started
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(body)["code"] == "request_timeout"
        assert waited < 30  # bounded: 2 s of silence plus the sweep interval
        assert requests.get(f"{url}/v1/health", timeout=10).ok  # and nothing else was held
    finally:
        stop(process)


def test_an_acknowledged_upload_survives_kill_9(tmp_path):
    process, url = protocol_server(tmp_path)
    api = f"{url}/v1"
    profile = {"step_ms": 3, "reference_rate": 0.0625, "memory_mb": 1024, "bandwidth_mbps": 10}
    try:
        tokens = [
            requests.post(f"{api}/devices", json=profile, timeout=10).json()["token"]
            for _ in range(2)
        ]
        headers = {"Authorization": f"Bearer {tokens[0]}"}
        task = next_task(api, headers)
        weights = load(
            requests.get(f"{url}{task['weights_url']}", headers=headers, timeout=30).content
        )
        trained = {k: v for k, v in weights.items() if not k.endswith(("mean", "var"))}
        body = save(trained, {"num_samples": "10"})
        reply = requests.post(f"{url}{task['upload_url']}", data=body, headers=headers, timeout=30)
        assert reply.status_code == 200
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    process, url = protocol_server(tmp_path)
    try:
        history = requests.get(f"{url}/v1/rounds", timeout=10).json()["rounds"]
        assert history[0]["uploads"] == 1
        again = requests.post(f"{url}{task['upload_url']}", data=body, headers=headers, timeout=30)
        assert again.status_code == 409 and again.json()["code"] == "duplicate_upload"
    finally:
        stop(process)


def test_https_with_a_self_signed_certificate(tmp_path):
    """--tls-cert/--tls-key: a phone on the LAN gets a secure context (wasm threads, hashes)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = free_port()
    log = tmp_path / "coordinator.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "heterofl_edge", "coordinator", "serve",
                "--state-dir", str(tmp_path / "state"), "--mode", "e", "--no-artifacts",
                "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                reply = requests.get(f"https://127.0.0.1:{port}/v1/health", verify=cert, timeout=5)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert reply.ok and reply.json()["model"] == "conv"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{port}/v1/health", timeout=5)  # not trusted
        assert "https://127.0.0.1" in log.read_text()
    finally:
        stop(process)
