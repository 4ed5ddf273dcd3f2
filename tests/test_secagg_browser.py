"""A browser device in a secure round: Chromium's device page beside two Python devices.

``coordinator serve --secure-aggregation`` on its defaults otherwise (mode
a-b-c-d-e, the profile policy, E = 5, B = 10, clip 1, threshold 0.5) with
``--demo-data``, one round, every device selected, and ``--data-dir`` to evaluate the
model after the round (on 1,000 test examples). The page registers with
``secure_aggregation: true``, answers the training and statistics instances'
stages in its worker, and uploads one uint32 tensor ``masked`` each time; the
coordinator unmasks the sums of all three. A browser whose masks did not cancel
against the Python devices' would leave noise uniform over at least [-1, 1] (the
clip; the fixed point decodes a sum's full 32-bit range to at least n x clip, and
an element's average divides by at most n) in every element it holds, and the
round's sBN statistics would be noise too: the model's change and its accuracy
after the round show that the browser's vectors were summed with the others'.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests
from safetensors.numpy import load
from test_browser_device import assets_or_skip
from test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, chromium_or_skip

from coordinator.process import start_coordinator, stop, wait_until_ready
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig

pytestmark = pytest.mark.slow

CLIENTS = 200  # MNIST in shards of 300 examples: the browser takes shard 1, Python 0 and 2

UPLOAD_HEADER = """
() => {
  const body = window.heterofl.lastUploadBody(KIND);
  if (body === null) return null;
  const length = Number(new DataView(body.buffer, body.byteOffset).getBigUint64(0, true));
  return JSON.parse(new TextDecoder().decode(body.subarray(8, 8 + length)));
}
"""


def test_a_browser_device_takes_part_in_a_secure_round(tmp_path, mnist_dir, artifact_cache):
    chromium_or_skip()
    assets_or_skip()
    from playwright.sync_api import sync_playwright

    state = tmp_path / "state"
    artifact_cache(state, ("a", "b", "c", "d", "e"))
    process, url = start_coordinator(
        [
            "--state-dir", str(state), "--demo-data", str(mnist_dir), "--min-devices", "3",
            "--rounds", "1", "--fraction", "1", "--secure-aggregation",
            "--data-dir", str(mnist_dir), "--test-examples", "1000",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    fleet = Fleet(
        FleetConfig(
            url, mnist_dir, CLIENTS, "iid", 0, None, [Capabilities()], tmp_path / "fleet", (0, 2)
        )
    )
    timings: list[float] = []
    try:
        wait_until_ready(url)
        before = load(requests.get(f"{url}/v1/model", timeout=60).content)
        fleet.start()  # two Python devices register; the round opens once the page has too
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            page = browser.new_page()
            profiles: list[dict] = []

            def registration(request) -> None:
                if request.method == "POST" and request.url.endswith("/v1/devices"):
                    profiles.append(request.post_data_json)

            page.on("request", registration)
            page.goto(f"{url}/device/?data=demo&shard=1&clients={CLIENTS}&autostart=1&fresh=1")
            page.wait_for_function("window.heterofl.state.phase === 'training'", timeout=240_000)
            deadline = time.monotonic() + 400
            watched_from = time.perf_counter()
            phase = "training"
            while phase not in ("done", "stopped") and time.monotonic() < deadline:
                started = time.perf_counter()
                phase = page.evaluate("window.heterofl.state.phase")
                timings.append(time.perf_counter() - started)
            watched_for = time.perf_counter() - watched_from
            browser_state = page.evaluate("JSON.parse(JSON.stringify(window.heterofl.state))")
            headers = {
                kind: page.evaluate(UPLOAD_HEADER.replace("KIND", f"'{kind}'"))
                for kind in ("train", "statistics")
            }
            browser.close()
        rounds = fleet.follow(lambda record: None, timeout=120)
        after = load(requests.get(f"{url}/v1/model", timeout=60).content)
        health = requests.get(f"{url}/v1/health", timeout=10).json()
    finally:
        fleet.stop()
        stop(process)

    messages = [m["text"] for m in browser_state["messages"]]
    assert browser_state["phase"] == "done" and browser_state["alert"] is None, messages[-10:]
    assert profiles and profiles[0]["secure_aggregation"] is True
    # advertise, share and unmask in each of the two instances (training, sBN statistics)
    assert browser_state["secaggAnswers"] == 6, messages
    assert browser_state["lastUpload"]["masked"] and browser_state["lastStatistics"]["masked"]
    # what went up: one uint32 tensor 'masked' and no metadata (no labels, metrics, counts)
    for kind, header in headers.items():
        assert header is not None, f"no {kind} upload: {messages[-10:]}"
        assert header.pop("__metadata__") == {}, kind
        assert list(header) == ["masked"] and header["masked"]["dtype"] == "U32", header

    record = rounds[0]
    assert record["state"] == "finished" and record["uploads"] == 3, record
    assignments = {a["device_id"]: a for a in record["assignments"]}
    mine = assignments[browser_state["deviceId"]]
    assert mine["status"] == "uploaded" and mine["statistics"] == "uploaded", mine
    assert all(a["status"] == "uploaded" for a in assignments.values()), assignments
    # the browser's level's slice is what its vector held
    assert headers["train"]["masked"]["shape"][0] > 0 and mine["level"] == browser_state["level"]

    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed, "the round left the model as it was"
    # Masks that did not cancel leave noise uniform over at least [-1, 1] (mean |x| >= 0.5)
    # in every element the browser holds, statistics included; one round of SGD moves a
    # weight by far less, and the model still classifies.
    moved = np.concatenate(
        [np.abs(after[n] - before[n]).reshape(-1) for n in changed if after[n].dtype.kind == "f"]
    )
    assert float(moved.mean()) < 0.05, float(moved.mean())
    evaluation = health["evaluation"]
    assert evaluation["round"] == 1 and evaluation["global_accuracy"] > 0.5, evaluation
    print(
        f"browser masking: {browser_state['lastUpload']['maskMs']} ms (training, level "
        f"{mine['level']}), {browser_state['lastStatistics']['maskMs']} ms (statistics); "
        f"mean |change| {float(moved.mean()):.2e}, accuracy {evaluation['global_accuracy']:.4f}"
    )
    # the page answered all along (the masking runs in its worker)
    assert max(timings) < watched_for / 10, (max(timings), watched_for)
