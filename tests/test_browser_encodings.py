"""The browser device in compressed transport: fp16 weights down, an int8 update up.

One round on real MNIST in headless Chromium beside a Python device: the
coordinator sends level e's weights as fp16 and asks for int8 updates at e.
The page's upload (web/encoding.js) passes the coordinator's intake, and the
weights it stands for equal what the Python client trains from the same start,
shard and seed, within float32 noise and one int8 step of each row.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from safetensors import deserialize
from safetensors.numpy import load
from test_browser_device import SPLIT, assets_or_skip
from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, chromium_or_skip

from coordinator.demo_data import Normalise
from coordinator.process import start_coordinator, stop, wait_until_ready
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig
from device_sim.onnx_backend import OnnxLevel
from heterofl_edge.device_runtime import TrainingRequest
from heterofl_edge.encoding import Encoding, apply_update, decode_payload, encode_payload

pytestmark = pytest.mark.slow


def test_a_browser_device_decodes_fp16_and_uploads_an_int8_update(
    tmp_path, mnist_dir, artifact_cache
):
    chromium_or_skip()
    assets_or_skip()
    from playwright.sync_api import sync_playwright
    from safetensors.torch import load_file

    from heterofl_edge.models import get_architecture
    from heterofl_edge.slicing import extract_submodel_state

    state = tmp_path / "state"
    artifact_cache(state, ("a", "e"))
    split = {**SPLIT, "clients": 2, "train_examples": 200}
    process, url = start_coordinator(
        [
            "--state-dir", str(state), "--mode", "a1-e1", "--policy", "fix",
            "--rounds", "1", "--fraction", "1", "--min-devices", "2", "--min-uploads", "2",
            "--local-epochs", "1", "--batch-size", "50", "--round-seconds", "300",
            "--demo-data", str(mnist_dir), "--data-dir", str(mnist_dir),
            "--test-examples", "1000", "--poll-seconds", "0.5",
            "--download-encoding", "fp32,e=fp16", "--upload-encoding", "fp32,e=int8",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    fleet = Fleet(
        FleetConfig(
            url, mnist_dir, 2, "iid", 0, 200, [Capabilities()], tmp_path / "fleet", shards=(0,)
        )
    )
    query = "&".join(f"{k}={v}" for k, v in split.items())
    try:
        wait_until_ready(url)
        fleet.start()  # shard 0 registers first: position 0 (a); the page is position 1 (e)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            page = browser.new_page()
            page.goto(f"{url}/device?data=demo&shard=1&{query}&autostart=1&fresh=1")
            page.wait_for_function(
                "window.heterofl && window.heterofl.state.statisticsUploads >= 1",
                timeout=300_000,
            )
            uploaded = bytes(page.evaluate("Array.from(window.heterofl.lastUploadBody('train'))"))
            browser_state = page.evaluate("JSON.parse(JSON.stringify(window.heterofl.state))")
            rounds = fleet.follow(lambda record: None, timeout=300)
            browser.close()
        shard = requests.get(f"{url}/v1/demo-data?shard=1&{query}", timeout=30).content
    finally:
        fleet.stop()
        stop(process)

    record = rounds[0]
    assert record["state"] == "finished" and record["uploads"] == 2
    carried = {
        a["level"]: (a["download_encoding"], a["upload_encoding"]) for a in record["assignments"]
    }
    assert carried == {"a": ("fp32", "fp32"), "e": ("fp16", "int8")}
    assert browser_state["level"] == "e" and browser_state["lastUpload"]["encoding"] == "int8"
    assert {info["dtype"] for _, info in deserialize(uploaded)} == {"I8"}
    sent = decode_payload(uploaded)
    assert sent.encoding is Encoding.int8

    # What the page started from (level e of the initial model, through fp16) and what the
    # Python client trains from there with the same shard and seed.
    arch = get_architecture("conv")
    initial = load_file(state / "checkpoints" / "round-0000-final.safetensors")
    sliced = {k: v.numpy() for k, v in extract_submodel_state(initial, arch.spec, 0.0625).items()}
    received = decode_payload(encode_payload(sliced, Encoding.fp16)).arrays
    level = OnnxLevel(state / "artifacts" / "conv-e")
    demo = load(shard)
    header = json.loads(shard[8 : 8 + int.from_bytes(shard[:8], "little")])
    rule = json.loads(header["__metadata__"]["normalise"])
    x = Normalise(rule["scale"], tuple(rule["mean"]), tuple(rule["std"])).apply(demo["x"])
    labels = sorted(int(v) for v in np.unique(demo["y"]))
    expected = level.train(
        TrainingRequest(
            received, x, demo["y"], labels, 0.01, 1, 50, browser_state["lastUpload"]["seed"]
        )
    )
    weights = apply_update({n: received[n] for n in sent.arrays}, sent.arrays)
    assert set(weights) == set(expected.weights)
    for name, value in weights.items():
        update = expected.weights[name] - received[name]
        rows = update.reshape(update.shape[0] if update.ndim >= 2 else 1, -1)
        step = np.abs(rows).max(axis=1, keepdims=True) / 127  # one int8 step per row
        error = np.abs((value - expected.weights[name]).reshape(rows.shape))
        assert (error <= step * 1.01 + 1e-5).all(), name
