"""A phone on the defaults: the device page at phone size in real Chromium beside a Python device.

The coordinator runs on its defaults (mode a-b-c-d-e, the profile policy, 30 s
device timeout, 600 s rounds, E = 5, B = 10) with only ``--demo-data`` and
``--min-devices 2``, plus what makes it test-sized: one round, both devices
selected (``--fraction 1``: the default 0.1 picks one of two) and the
artifacts from the session's cache. The page runs at 390x844 with touch and a
phone's user agent and is driven as a person would: choose demo shard 1 of 200
(300 examples, 150 steps), download it, start. The browser's upload is
accepted and the round finishes; while the browser computes sBN statistics in
its worker, ``page.evaluate`` answers in under a second, and otherwise never after
more than a tenth of the time watched. Screenshots of the
device page mid-training and of the live page go to the test artifacts folder
(copied to docs/ for the README).
"""

from __future__ import annotations

import json
import time

import pytest
from test_browser_device import assets_or_skip
from test_dashboard_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, chromium_or_skip

from coordinator.process import start_coordinator, stop, wait_until_ready
from device_sim.device import Capabilities
from device_sim.fleet import Fleet, FleetConfig

pytestmark = pytest.mark.slow

PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
    "user_agent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
}
CLIENTS = 200  # MNIST in shards of 300 examples
ABOVE_THE_FOLD = ["#phase", "#progress", "#progress-text", "#level", "#round", "#accuracy", "#stop"]


def test_a_phone_trains_beside_a_python_device_on_the_defaults(tmp_path, mnist_dir, artifact_cache):
    chromium_or_skip()
    assets_or_skip()
    from playwright.sync_api import sync_playwright

    state = tmp_path / "state"
    artifact_cache(state, ("a", "b", "c", "d", "e"))
    process, url = start_coordinator(
        [
            "--state-dir", str(state), "--demo-data", str(mnist_dir), "--min-devices", "2",
            "--rounds", "1", "--fraction", "1",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    fleet = Fleet(
        FleetConfig(
            url, mnist_dir, CLIENTS, "iid", 0, None, [Capabilities()], tmp_path / "fleet", (0,)
        )
    )
    timings: list[tuple[str, float]] = []
    try:
        wait_until_ready(url)
        fleet.start()  # shard 0 registers; the round opens once the phone has too
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            phone = browser.new_context(**PHONE)
            enrolment = check_a_refused_enrollment(phone, url)
            page = phone.new_page()
            page.goto(f"{url}/device/?fresh=1")
            page.wait_for_function("!document.getElementById('use-demo').disabled")
            assert "0 of 100" in page.inner_text("#use-demo")  # the default: 1/100 of MNIST
            page.fill("#demo-clients", str(CLIENTS))
            page.fill("#demo-shard", "1")
            page.wait_for_function(
                "document.getElementById('use-demo').textContent.includes('1 of 200')"
                " && !document.getElementById('use-demo').disabled"
            )
            assert "300 examples" in page.inner_text("#demo-size")  # the size before download
            assert page.is_disabled("#start")  # nothing to train on yet
            page.tap("#use-demo")
            page.wait_for_function("window.heterofl.state.data !== null")
            assert page.inner_text("#phase").startswith("Ready: 300 examples")
            page.tap("#start")
            page.wait_for_function(
                "window.heterofl.state.phase === 'training' && window.heterofl.state.step >= 10",
                timeout=240_000,
            )
            assert page.is_disabled("#use-demo") and page.is_disabled("#start")
            assert page.get_attribute("#data-section", "open") is None  # folded away
            for selector in ABOVE_THE_FOLD:
                box = page.locator(selector).bounding_box()
                assert box is not None and box["y"] + box["height"] <= 844, selector
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "phone-device.png"))

            # Time the page's answers from training to the end, noting what it was doing.
            deadline = time.monotonic() + 300
            watched_from = time.perf_counter()
            phase = "training"
            while phase != "done" and time.monotonic() < deadline:
                started = time.perf_counter()
                phase = page.evaluate(
                    "(() => { const s = window.heterofl.state;"
                    " return s.phase === 'statistics' && s.statsBatches !== null"
                    " && s.statsBatch < s.statsBatches ? 'computing statistics' : s.phase; })()"
                )
                timings.append((phase, time.perf_counter() - started))
            watched_for = time.perf_counter() - watched_from
            browser_state = page.evaluate("JSON.parse(JSON.stringify(window.heterofl.state))")
            rounds = fleet.follow(lambda record: None, timeout=120)

            live = phone.new_page()
            live.goto(f"{url}/")
            live.wait_for_function("document.body.dataset.updated !== undefined")
            widths = live.evaluate(
                "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
            )
            marked = live.eval_on_selector_all(
                "#devices tr",
                "rows => rows.map(r =>"
                " [r.dataset.device, r.dataset.browser, r.dataset.trainedLevel])",
            )
            live.screenshot(path=str(ARTIFACTS / "phone-live.png"), full_page=True)
            stop_check = page.evaluate(STOP_WITHIN_A_STEP)
            browser.close()
    finally:
        fleet.stop()
        stop(process)

    # Stop terminates the worker mid-session: the call fails at once, no step reports after.
    assert stop_check["error"] == "AbortError" and stop_check["steps"] == 20, stop_check
    assert stop_check["stopped_ms"] < stop_check["step_ms"], stop_check
    assert enrolment == ["link-token"]  # sent once with the registration, never retried
    # The page answers all along: in under a second in the middle of the statistics pass (a
    # main thread busy with it answers only once it is over), and otherwise never after a wait
    # that is more than a small part of the time watched (a frozen page answers once, at the
    # end): encoding and sending the upload run on the main thread and took 1.07 s once on a
    # loaded CI machine, so that bound is relative.
    computing = [seconds for phase, seconds in timings if phase == "computing statistics"]
    assert computing, f"no answer came while the browser computed statistics: {timings[-20:]}"
    assert max(computing) < 1.0, max(computing)  # the bound, while the worker computes
    longest_wait = max(seconds for _, seconds in timings)
    assert longest_wait < watched_for / 10, (longest_wait, watched_for)

    record = rounds[0]
    assert record["state"] == "finished" and record["uploads"] == 2
    assignments = {a["device_id"]: a for a in record["assignments"]}
    phone_task = assignments[browser_state["deviceId"]]
    assert phone_task["status"] == "uploaded" and phone_task["statistics"] == "uploaded"
    assert browser_state["lastUpload"]["round"] == 1
    assert browser_state["lastUpload"]["steps"] == 150  # E = 5 over 300 examples, B = 10
    assert browser_state["alert"] is None and browser_state["phase"] == "done"

    assert widths[0] <= widths[1] == 390  # no horizontal scrolling on the phone
    shown = {device: (flag, trained) for device, flag, trained in marked}
    assert shown[browser_state["deviceId"]] == ("true", phone_task["level"])
    python_id = next(d for d in assignments if d != browser_state["deviceId"])
    assert shown[python_id] == ("false", assignments[python_id]["level"])


STOP_WITHIN_A_STEP = """
async () => {
  const { TrainerWorker } = await import('/device/remote_level.js');
  const { parseSafetensors } = await import('/device/safetensors.js');
  const { demoData } = await import('/device/data.js');
  const controller = new AbortController();
  const worker = new TrainerWorker(
    () => new Worker('/device/train_worker.js', { type: 'module' }), { signal: controller.signal });
  await worker.init(1);
  const url = '/v1/artifacts/conv/a/manifest.json';
  const manifest = await (await fetch(url)).json();
  const files = {};
  for (const program of ['train_step', 'statistics']) {
    const file = manifest.programs.onnx[program].file;
    files[file] = new Uint8Array(await (await fetch(`/v1/artifacts/conv/a/${file}`)).arrayBuffer());
  }
  const level = await worker.level(url, manifest, files);
  const shard = parseSafetensors(new Uint8Array(
    await (await fetch('/v1/demo-data?clients=200')).arrayBuffer()));
  const data = demoData(shard.tensors, shard.metadata);
  const weights = new Map(manifest.parameters.map(
    (p) => [p.name, new Float32Array(p.shape.reduce((a, b) => a * b, 1))]));
  let steps = 0, last = null, stoppedAt = null;
  const gaps = [];
  const training = level.train({
    weights, data, labels: data.labels, lr: 0.01, epochs: 5, batchSize: 10, seed: 0,
    signal: controller.signal,
    onStep: () => {
      steps += 1;
      const now = performance.now();
      if (last !== null) gaps.push(now - last);
      last = now;
      if (steps === 20) {
        stoppedAt = performance.now();
        controller.abort(new DOMException('stopped by the user', 'AbortError'));
      }
    },
  });
  let error = null;
  try { await training; } catch (err) { error = err.name; }
  gaps.sort((a, b) => a - b);
  return { steps, error, stopped_ms: performance.now() - stoppedAt,
           step_ms: gaps[gaps.length >> 1], dead: worker.dead !== null };
}
"""


def check_a_refused_enrollment(phone, url: str) -> list[str]:
    """#enroll=TOKEN goes with the registration; a refusal (simulated) stops the page."""
    page = phone.new_page()
    sent: list[str] = []

    def refuse(route, request) -> None:
        if request.method != "POST":
            route.continue_()
            return
        sent.append(json.loads(request.post_data or "{}").get("enrollment_token"))
        body = {"code": "bad_enrollment_token", "message": "not this coordinator's", "hint": ""}
        route.fulfill(status=401, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/devices", refuse)
    page.goto(f"{url}/device/?data=demo&autostart=1&fresh=1#enroll=link-token")
    page.wait_for_function("window.heterofl.state.phase === 'stopped'", timeout=120_000)
    assert page.evaluate("location.hash") == ""  # the token left the address bar
    assert "device link printed at its start-up" in page.inner_text("#alert")
    assert not page.is_disabled("#start")  # stopped, not stuck: the person can try again
    page.evaluate("localStorage.removeItem('heterofl-edge.enroll')")  # the real run has no link
    page.close()
    return sent


def test_bad_input_on_the_phone_gets_a_clear_message_and_starts_nothing(tmp_path, mnist_dir):
    """An out-of-range or oversized shard, no demo data, and plain HTTP from another address."""
    chromium_or_skip()
    assets_or_skip()
    import requests
    from playwright.sync_api import sync_playwright

    with_demo, demo_url = start_coordinator(
        ["--state-dir", str(tmp_path / "demo"), "--no-artifacts", "--demo-data", str(mnist_dir)],
        tmp_path / "demo.log",
    )
    without, plain_url = start_coordinator(
        ["--state-dir", str(tmp_path / "plain"), "--no-artifacts"], tmp_path / "plain.log"
    )
    port = plain_url.rsplit(":", 1)[1]
    requested: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                # phone.test is this machine under a name that is not localhost: plain HTTP
                # there is not a secure context, as for a phone on the LAN.
                args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP phone.test 127.0.0.1"],
                chromium_sandbox=False,
            )
            phone = browser.new_context(**PHONE)
            page = phone.new_page()
            page.goto(f"{demo_url}/device/?fresh=1")
            page.wait_for_function("!document.getElementById('use-demo').disabled")
            page.fill("#demo-clients", "200")
            page.fill("#demo-shard", "200")
            page.wait_for_function(
                "document.getElementById('demo-size').textContent.includes('whole number')"
            )
            assert page.inner_text("#demo-size") == "the shard must be a whole number from 0 to 199"
            assert page.is_disabled("#use-demo")
            page.fill("#demo-clients", "2")  # 30,000 examples a shard: over the cap
            page.fill("#demo-shard", "1")
            page.wait_for_function(
                "document.getElementById('demo-size').textContent.includes('refuses')"
            )
            refusal = page.inner_text("#demo-size")
            assert "at most 10000" in refusal and "clients=6" in refusal
            assert page.is_disabled("#use-demo") and page.is_disabled("#start")
            assert page.evaluate("window.heterofl.state.data") is None

            page = phone.new_page()
            page.goto(f"{plain_url}/device/?data=demo&autostart=1&fresh=1")
            page.wait_for_selector("#alert:not([hidden])")
            assert "serves none" in page.inner_text("#alert")
            assert page.is_hidden("#demo-choice") and page.is_disabled("#start")

            page = phone.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"http://phone.test:{port}/device/?data=demo&autostart=1&fresh=1")
            page.wait_for_selector("#alert:not([hidden])")
            assert page.evaluate("window.isSecureContext") is False
            alert = page.inner_text("#alert")
            assert "not a secure context" in alert and "--tls-cert" in alert
            assert f"https://phone.test:{port}/device/" in alert
            for control in ("#start", "#use-demo", "#use-files", "#images-file"):
                assert page.is_disabled(control), control
            box = page.locator("#alert").bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390  # fits
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "phone-insecure.png"))
            browser.close()
        devices = requests.get(f"{plain_url}/v1/devices", timeout=10).json()
    finally:
        stop(with_demo)
        stop(without)
    assert not [u for u in requested if "/v1/" in u]  # nothing asked of the coordinator
    assert devices["total"] == 0
