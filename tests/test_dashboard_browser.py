"""The live coordinator page in real headless Chromium (Debian's, driven by Playwright).

While a short run goes on, the page must show what ``/v1`` says: the same
devices, levels and round state, and one chart point per evaluated round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from safetensors.numpy import load, save

from coordinator.process import start_coordinator, stop

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("HETEROFL_TEST_ARTIFACTS", "runs/test-artifacts"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_or_skip() -> None:
    if not CHROMIUM.exists():
        message = "Debian's chromium is not installed (make browser installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def next_task(api: str, token: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = requests.get(
            f"{api}/task", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).json()
        if task["action"] != "wait":
            return task
        time.sleep(0.2)
    raise AssertionError("no task in time")


def do_task(url: str, token: str, task: dict) -> None:
    """Answer a task as a protocol-level device (no training: shifted weights, unit moments)."""
    headers = {"Authorization": f"Bearer {token}"}
    weights = load(requests.get(url + task["weights_url"], headers=headers, timeout=30).content)
    if task["action"] == "train":
        tensors = {k: v + 0.01 for k, v in weights.items() if not k.endswith(("_mean", "_var"))}
        metadata = {"num_samples": "100", "metrics": json.dumps({"loss": 1.0})}
        body = save(tensors, metadata=metadata)
    else:
        moments = {}
        for name, value in weights.items():
            if name.endswith(".running_mean"):
                layer = name.removesuffix(".running_mean")
                moments[f"{layer}.count"] = np.array(100.0, np.float32)
                moments[f"{layer}.mean"] = np.zeros_like(value)
                moments[f"{layer}.var"] = np.ones_like(value)
        body = save(moments)
    reply = requests.post(url + task["upload_url"], data=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text


@pytest.mark.slow
def test_the_live_page_shows_what_the_api_says(tmp_path, mnist_dir):
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    process, url = start_coordinator(
        [
            "--state-dir", str(tmp_path / "state"), "--mode", "c1-e1", "--policy", "fix",
            "--rounds", "3", "--fraction", "1", "--min-devices", "2", "--min-uploads", "2",
            "--no-artifacts", "--data-dir", str(mnist_dir), "--test-examples", "2000",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    api = f"{url}/v1"
    profile = {"step_ms": 1, "reference_rate": 0.25, "memory_mb": 1024, "bandwidth_mbps": 10}
    try:
        tokens = [
            requests.post(f"{api}/devices", json=profile, timeout=10).json()["token"]
            for _ in range(2)
        ]
        for _ in range(2):  # two phases of round 1: training, then statistics
            for token in tokens:
                do_task(url, token, next_task(api, token))
        for token in tokens:  # round 2 is open; one device has started training
            assert next_task(api, token)["round"] == 2
        task = next_task(api, tokens[0])
        requests.get(
            url + task["weights_url"], headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=30
        )

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(f"{url}/", wait_until="load")
            page.wait_for_function("document.body.dataset.updated !== undefined", timeout=30_000)
            devices = requests.get(f"{api}/devices", timeout=10).json()["devices"]
            rounds = requests.get(f"{api}/rounds", timeout=10).json()["rounds"]
            shown_devices = page.eval_on_selector_all(
                "#devices tr",
                "rows => rows.map(r => [r.dataset.device, r.dataset.state, r.dataset.level])",
            )
            assert sorted(shown_devices) == sorted(
                [d["device_id"], d["state"], d["level"] or ""] for d in devices
            )
            assert {row[1] for row in shown_devices} == {"training", "selected"}
            shown_rounds = page.eval_on_selector_all(
                "#rounds tr", "rows => rows.map(r => [Number(r.dataset.round), r.dataset.state])"
            )
            assert sorted(shown_rounds) == sorted([r["round"], r["state"]] for r in rounds)
            assert dict(shown_rounds) == {1: "finished", 2: "training"}
            evaluated = [r for r in rounds if r["metrics"].get("evaluation")]
            points = page.get_attribute("#curve", "data-points")
            assert points == str(len(evaluated)) == "1"
            levels = page.eval_on_selector_all(".level", "els => els.map(e => e.dataset.level)")
            assert sorted(levels) == ["c", "e"]
            summary = page.inner_text("#summary")
            assert "2/2 devices live" in summary and "round 2 (training)" in summary
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        stop(process)
