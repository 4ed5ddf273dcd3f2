"""A phone can join: the browser device page in real headless Chromium beside Python devices.

One round on real MNIST: two Python onnxruntime devices (levels a and c) and one
browser device (level e, onnxruntime-web) with the coordinator's demo data. All
three uploads are accepted, and the browser's upload equals what the Python
client computes from the same weights, shard, seed and level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import requests
from safetensors.numpy import load
from test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, chromium_or_skip

from coordinator.demo_data import Normalise
from coordinator.process import start_coordinator, stop, wait_until_ready
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig
from device_sim.onnx_backend import OnnxLevel
from heterofl_edge.device_runtime import TrainingRequest

pytestmark = pytest.mark.slow

DEVICE_ASSETS = Path(__file__).resolve().parents[1] / "coordinator" / "static" / "device"
SPLIT = {"clients": 3, "split": "iid", "seed": 0, "train_examples": 300}


def assets_or_skip() -> None:
    if not (DEVICE_ASSETS / "assets.json").is_file():
        message = "the device page is not installed (make web)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_a_browser_device_trains_beside_python_devices(tmp_path, mnist_dir, artifact_cache):
    chromium_or_skip()
    assets_or_skip()
    from playwright.sync_api import sync_playwright
    from safetensors.torch import load_file

    from heterofl_edge.models import get_architecture
    from heterofl_edge.slicing import extract_submodel_state

    state = tmp_path / "state"
    artifact_cache(state, ("a", "c", "e"))
    process, url = start_coordinator(
        [
            "--state-dir", str(state), "--mode", "a1-c1-e1", "--policy", "fix",
            "--rounds", "1", "--fraction", "1", "--min-devices", "3", "--min-uploads", "3",
            "--local-epochs", "1", "--batch-size", "50", "--round-seconds", "300",
            "--demo-data", str(mnist_dir), "--data-dir", str(mnist_dir),
            "--test-examples", "1000", "--poll-seconds", "0.5",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    fleet = Fleet(
        FleetConfig(
            url,
            mnist_dir,
            SPLIT["clients"],
            "iid",
            0,
            SPLIT["train_examples"],
            [Capabilities()],
            tmp_path / "fleet",
            shards=(0, 1),
        )
    )
    query = "&".join(f"{k}={v}" for k, v in SPLIT.items())
    try:
        wait_until_ready(url)
        fleet.start()  # shards 0 and 1 register first: positions 0 (a) and 1 (c)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            page = browser.new_page(viewport={"width": 1000, "height": 1300})
            page.goto(f"{url}/device?data=demo&shard=2&{query}&autostart=1&fresh=1")
            page.wait_for_function(
                "window.heterofl && window.heterofl.state.statisticsUploads >= 1",
                timeout=300_000,
            )
            uploaded = page.evaluate("Array.from(window.heterofl.lastUploadBody('train'))")
            browser_state = page.evaluate("JSON.parse(JSON.stringify(window.heterofl.state))")
            rounds = fleet.follow(lambda record: None, timeout=300)
            page.wait_for_function("window.heterofl.state.phase === 'done'", timeout=60_000)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "device-page.png"), full_page=True)
            browser.close()
        shard = requests.get(f"{url}/v1/demo-data?shard=2&{query}", timeout=30).content
    finally:
        fleet.stop()
        stop(process)

    record = rounds[0]
    assert record["state"] == "finished" and record["uploads"] == 3
    by_level = {a["level"]: a for a in record["assignments"]}
    assert set(by_level) == {"a", "c", "e"}
    assert all(
        a["status"] == "uploaded" and a["statistics"] == "uploaded" for a in by_level.values()
    )
    assert browser_state["level"] == "e" and browser_state["lastUpload"]["round"] == 1

    # What the Python client uploads from the same start, shard, seed and level.
    arch = get_architecture("conv")
    initial = load_file(state / "checkpoints" / "round-0000-final.safetensors")
    weights = {k: v.numpy() for k, v in extract_submodel_state(initial, arch.spec, 0.0625).items()}
    level = OnnxLevel(state / "artifacts" / "conv-e")
    demo = load(shard)  # uint8 pixels; the device standardises them with the shard's rule
    header = json.loads(shard[8 : 8 + int.from_bytes(shard[:8], "little")])
    rule = json.loads(header["__metadata__"]["normalise"])
    x = Normalise(rule["scale"], tuple(rule["mean"]), tuple(rule["std"])).apply(demo["x"])
    labels = sorted(int(v) for v in np.unique(demo["y"]))
    expected = level.train(
        TrainingRequest(
            weights, x, demo["y"], labels, 0.01, 1, 50, browser_state["lastUpload"]["seed"]
        )
    )
    got = load(bytes(uploaded))
    assert set(got) == set(expected.weights)
    worst = max(float(np.abs(got[k] - expected.weights[k]).max()) for k in got)
    assert worst < 1e-5, worst
    metadata = json.loads(json.dumps(browser_state["lastUpload"]))
    assert metadata["steps"] == 2  # 100 examples in batches of 50: a short session


def test_a_browser_device_takes_part_in_buffered_versions(tmp_path, mnist_dir, artifact_cache):
    """Issue 32: the page against `--aggregation buffered`, beside a Python device.

    K = 2 with two devices: every version folds one update of each (the Python device at
    level a, the page at level e), whatever order they arrive in. The page trains on the
    newest version it is given, its update is acknowledged and folded, it answers the
    versions' sBN statistics queries and ends when the coordinator is done.
    """
    chromium_or_skip()
    assets_or_skip()
    from playwright.sync_api import sync_playwright

    state = tmp_path / "state"
    artifact_cache(state, ("a", "e"))
    split = {"clients": 2, "split": "iid", "seed": 0, "train_examples": 200}
    process, url = start_coordinator(
        [
            "--state-dir", str(state), "--mode", "a1-e1", "--policy", "fix",
            "--rounds", "3", "--fraction", "1", "--min-devices", "2",
            "--local-epochs", "1", "--batch-size", "50", "--statistics", "round",
            "--aggregation", "buffered", "--buffer-size", "2", "--staleness", "constant",
            "--demo-data", str(mnist_dir), "--data-dir", str(mnist_dir),
            "--test-examples", "1000", "--poll-seconds", "0.5",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    fleet = Fleet(
        FleetConfig(url, mnist_dir, 2, "iid", 0, 200, [Capabilities()], tmp_path / "fleet", (0,))
    )
    query = "&".join(f"{k}={v}" for k, v in split.items())
    try:
        wait_until_ready(url)
        fleet.start()  # shard 0 registers first: position 0, level a
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            page = browser.new_page(viewport={"width": 1000, "height": 1300})
            page.goto(f"{url}/device?data=demo&shard=1&{query}&autostart=1&fresh=1")
            versions = fleet.follow(lambda record: None, timeout=600)
            page.wait_for_function("window.heterofl.state.phase === 'done'", timeout=120_000)
            browser_state = page.evaluate("JSON.parse(JSON.stringify(window.heterofl.state))")
            browser.close()
    finally:
        fleet.stop()
        stop(process)
    assert [v["state"] for v in versions] == ["finished"] * 3, versions
    assert [v["metrics"]["uploads"] for v in versions] == [2, 2, 2]
    for version in versions:  # each version: one update of each device, at its level
        assert sorted(a["level"] for a in version["assignments"]) == ["a", "e"], version
    assert browser_state["level"] == "e"
    assert browser_state["uploads"] == 3  # one per version, each acknowledged and folded
    assert browser_state["statisticsUploads"] >= 1
    assert browser_state["lastUpload"]["round"] == 3
