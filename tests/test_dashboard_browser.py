"""The live coordinator page in real headless Chromium (Debian's, driven by Playwright).

While a short run goes on, the page must show what ``/v1`` says: the same
devices, levels and round state, and one chart point per evaluated round.
"""

from __future__ import annotations

import json
import math
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
            # Bytes per device-round: a training session's download plus upload (round 2's
            # device fetched its weights; nothing came up yet).
            shown_bytes = dict(
                page.eval_on_selector_all(
                    "#rounds td[data-bytes]",
                    "tds => tds.map(td => "
                    "[td.parentElement.dataset.round, Number(td.dataset.bytes)])",
                )
            )
            expected_bytes = {}
            for r in rounds:
                train = [r["transfer"][d].get("train", {}) for d in ("down", "up")]
                mean = [
                    sum(e["bytes"] for e in t.values())
                    / max(1, sum(e["payloads"] for e in t.values()))
                    for t in train
                ]
                expected_bytes[str(r["round"])] = math.floor(sum(mean) + 0.5)  # Math.round
            assert shown_bytes == expected_bytes and shown_bytes["1"] > shown_bytes["2"] > 0
            evaluated = [r for r in rounds if r["metrics"].get("evaluation")]
            points = page.get_attribute("#curve", "data-points")
            assert points == str(len(evaluated)) == "1"
            levels = page.eval_on_selector_all(".level", "els => els.map(e => e.dataset.level)")
            assert sorted(levels) == ["c", "e"]
            summary = page.inner_text("#summary")
            assert "2/2 devices live" in summary and "round 2 (training)" in summary
            trained = page.eval_on_selector_all(
                "#devices tr", "rows => rows.map(r => [r.dataset.device, r.dataset.trainedLevel])"
            )
            assert sorted(trained) == sorted([d["device_id"], d["trained_level"]] for d in devices)
            assert {d["trained_level"] for d in devices} == {"c", "e"}  # round 1's uploads
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # At phone size: no sideways scrolling, legible chart labels, the one point labelled.
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(f"{url}/", wait_until="load")
            phone.wait_for_function("document.body.dataset.updated !== undefined")
            widths = phone.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            assert widths[0] <= widths[1] == 390
            label_px = phone.eval_on_selector_all(
                "#curve text",
                "els => els.map(e => parseFloat(getComputedStyle(e).fontSize)"
                " * e.ownerSVGElement.getScreenCTM().a)",
            )
            assert min(label_px) >= 11, label_px
            value = phone.text_content("#curve text.value")
            accuracy = evaluated[0]["metrics"]["evaluation"]["global_accuracy"]
            assert value == f"round 1: {100 * accuracy:.1f}%"
            cards = phone.eval_on_selector_all(
                "#devices td", "tds => tds.map(td => getComputedStyle(td).display)"
            )
            assert set(cards) == {"flex"}  # each row a card of label: value lines
            browser.close()
    finally:
        stop(process)


SIMULATED_TOKEN = "op-secret"


def simulated_devices(offset: int, limit: int, total: int = 150) -> dict:
    """A /v1/devices page of ``total`` made-up devices (every third one a browser)."""
    devices = []
    for position in range(offset, min(offset + limit, total)):
        runtimes = ["onnx-web"] if position % 3 == 0 else ["onnx"]
        devices.append(
            {
                "device_id": f"device-{position:03d}",
                "position": position,
                "state": "online",
                "level": "e",
                "trained_level": "d" if position % 2 else None,
                "profile": {
                    "step_ms": 5.0, "reference_rate": 0.0625, "memory_mb": 2048,
                    "bandwidth_mbps": 10.0, "runtimes": runtimes, "num_examples": 600,
                },
                "registered_at": 0.0, "last_seen": 0.0, "bytes_in": 0, "bytes_out": 0,
            }
        )  # fmt: skip
    return {
        "policy": "profile", "levels": {"e": 1.0}, "devices": devices,
        "total": total, "offset": offset, "limit": limit,
    }  # fmt: skip


@pytest.mark.slow
def test_the_live_page_pages_through_devices_and_sends_the_operator_token(tmp_path):
    """Against a coordinator whose operator check and device list are simulated (page.route)."""
    chromium_or_skip()
    from urllib.parse import parse_qs, urlparse

    from playwright.sync_api import sync_playwright

    process, url = start_coordinator(
        ["--state-dir", str(tmp_path / "state"), "--no-artifacts"], tmp_path / "coordinator.log"
    )
    seen: list[tuple[str, str | None]] = []

    def guarded(route, request) -> None:
        auth = request.headers.get("authorization")
        seen.append((urlparse(request.url).path, auth))
        if auth != f"Bearer {SIMULATED_TOKEN}":
            route.fulfill(
                status=401,
                content_type="application/json",
                body=json.dumps(
                    {"code": "operator_token_required", "message": "who are you", "hint": ""}
                ),
            )
        elif urlparse(request.url).path == "/v1/devices":
            query = parse_qs(urlparse(request.url).query)
            page_of = simulated_devices(int(query["offset"][0]), int(query["limit"][0]))
            route.fulfill(status=200, content_type="application/json", body=json.dumps(page_of))
        else:
            route.continue_()

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            stranger = browser.new_page()
            stranger.route("**/v1/devices*", guarded)
            stranger.route("**/v1/rounds*", guarded)
            stranger.goto(f"{url}/")
            stranger.wait_for_selector("#access:not([hidden])")
            assert "live-page link printed at the coordinator's start-up" in stranger.inner_text(
                "#access"
            )

            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            page.route("**/v1/devices*", guarded)
            page.route("**/v1/rounds*", guarded)
            page.goto(f"{url}/#operator={SIMULATED_TOKEN}")
            page.wait_for_function("document.querySelectorAll('#devices tr').length === 100")
            assert page.evaluate("location.hash") == ""  # the token left the address bar
            assert (
                page.evaluate("sessionStorage.getItem('heterofl-edge.operator')") == SIMULATED_TOKEN
            )
            assert page.is_hidden("#access")
            assert page.inner_text("#device-count") == "(1\u2013100 of 150)"
            assert page.is_disabled("#devices-previous")
            browsers = page.eval_on_selector_all(
                "#devices tr[data-browser=true]", "rows => rows.map(r => r.dataset.device)"
            )
            assert browsers == [f"device-{p:03d}" for p in range(0, 100, 3)]
            assert page.locator("#devices tr[data-browser=true] .badge").first.inner_text() == (
                "browser"
            )
            page.click("#devices-next")
            page.wait_for_function("document.querySelectorAll('#devices tr').length === 50")
            assert page.inner_text("#device-count") == "(101\u2013150 of 150)"
            assert page.is_disabled("#devices-next")
            page.reload()  # the kept token serves the tab after the fragment is gone
            page.wait_for_function("document.querySelectorAll('#devices tr').length === 100")
            browser.close()
    finally:
        stop(process)
    guarded_paths = {path for path, _ in seen}
    assert guarded_paths == {"/v1/devices", "/v1/rounds"}
    assert {auth for path, auth in seen if auth} == {f"Bearer {SIMULATED_TOKEN}"}
