"""The browser device's training step against Python onnxruntime, in the same run.

A coordinator exports conv levels a, c and e and serves the device page. For
each level, a device's local epoch (600 real MNIST examples, batch 10: 60 SGD
steps in one ``train`` call, as a device trains) is timed step by step in Python
onnxruntime with one thread, and in headless Chromium (Debian's) on
onnxruntime-web (wasm) with 1 and 2 threads, through the page's own trainer
(``web/trainer.js``). Reported per level: the median step after the first 10
(steady state) and the first step. Ratios are browser / Python, steady state.

Why steady state: V8 runs WebAssembly first from its baseline compiler and tiers
hot functions up to optimised code while they run; the first steps of a page
are several times slower than the rest of an epoch (the device's profile step
warms up for the same reason). A local session is E epochs of such steps.

Run: ``python bench/bench_browser.py`` (needs ``make web`` and /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import requests
from safetensors.numpy import load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.process import start_coordinator, stop, wait_until_ready  # noqa: E402
from device_sim.onnx_backend import OnnxLevel  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "browser.json"
DATA = Path(os.environ.get("HETEROFL_DATA_DIR", ROOT.parent / "shared" / "datasets" / "mnist"))
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
EXAMPLES = 600  # one client's shard: 60 steps of batch 10 per epoch
STEADY_FROM = 10  # steps before this one are V8's warm-up

BROWSER_TIMING = """
async ([level, threads, steadyFrom]) => {
  const ort = await import('/device/ort/ort.wasm.min.mjs');
  ort.env.wasm.numThreads = threads;
  const { OnnxLevel } = await import('/device/trainer.js');
  const { parseSafetensors } = await import('/device/safetensors.js');
  const manifest = await (await fetch(`/v1/artifacts/conv/${level}/manifest.json`)).json();
  const files = {};
  for (const program of ['train_step', 'statistics']) {
    const file = manifest.programs.onnx[program].file;
    const reply = await fetch(`/v1/artifacts/conv/${level}/${file}`);
    files[file] = new Uint8Array(await reply.arrayBuffer());
  }
  const trainer = await OnnxLevel.create(ort, manifest, files);
  const demo = parseSafetensors(new Uint8Array(await (await fetch(
    '/v1/demo-data?shard=0&clients=100&train_examples=60000')).arrayBuffer()));
  const x = demo.tensors.get('x'), y = demo.tensors.get('y');
  const labels = [...Array(10).keys()];
  const data = { x: x.data, y: y.data, n: x.shape[0], shape: x.shape, labels };
  const size = (shape) => shape.reduce((a, b) => a * b, 1);
  const value = (_, i) => ((i * 7919) % 200 - 100) / 1000;
  const weights = new Map(manifest.parameters.map(
    (p) => [p.name, Float32Array.from({ length: size(p.shape) }, value)]));
  const stamps = [];
  const start = performance.now();
  await trainer.train({ weights, data, labels, lr: 0.01, epochs: 1, batchSize: 10, seed: 0,
                        onStep: () => { stamps.push(performance.now()); } });
  const steps = stamps.map((s, i) => s - (i ? stamps[i - 1] : start));
  const steady = steps.slice(steadyFrom).sort((a, b) => a - b);
  return { median_ms: steady[Math.floor(steady.length / 2)], first_ms: steps[0],
           isolated: crossOriginIsolated, n: data.n, steps: steps.length };
}
"""


def python_step_ms(folder: Path, x: np.ndarray, y: np.ndarray) -> float:
    level = OnnxLevel(folder, threads=1)
    rng = np.random.default_rng(0)
    weights = {
        p["name"]: rng.uniform(-0.1, 0.1, p["shape"]).astype(np.float32)
        for p in level.manifest["parameters"]
    }
    level.train(weights, x[:10], y[:10], list(range(10)), 0.01, 1, 10, 0)  # arena warm-up
    best = float("inf")
    for _ in range(3):  # mean step of a whole epoch; best of 3
        start = time.perf_counter()
        result = level.train(weights, x, y, list(range(10)), 0.01, 1, 10, 0)
        best = min(best, 1000 * (time.perf_counter() - start) / result.steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-browser")
    parser.add_argument("--levels", default="a,c,e")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    levels = args.levels.split(",")
    process, url = start_coordinator(
        [
            "--state-dir", str(args.work / "state"), "--mode", "a-c-e", "--policy", "dynamic",
            "--no-verify-artifacts", "--demo-data", str(DATA),
        ],
        args.work / "coordinator.log",
    )  # fmt: skip
    rows = []
    try:
        wait_until_ready(url)
        demo = load(
            requests.get(
                f"{url}/v1/demo-data?shard=0&clients=100&train_examples=60000", timeout=60
            ).content
        )
        x, y = demo["x"], demo["y"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            for level in levels:
                folder = args.work / "state" / "artifacts" / f"conv-{level}"
                python_ms = python_step_ms(folder, x, y)
                row = {"level": level, "batch": 10, "python_onnxruntime_1_thread_ms": python_ms}
                for threads in (1, 2):
                    page = browser.new_page()
                    page.goto(f"{url}/device/")
                    measured = page.evaluate(BROWSER_TIMING, [level, threads, STEADY_FROM])
                    page.close()
                    assert measured["n"] == EXAMPLES, measured
                    row[f"browser_{threads}_thread_ms"] = measured["median_ms"]
                    row[f"browser_{threads}_thread_first_step_ms"] = measured["first_ms"]
                    row[f"ratio_{threads}_thread"] = measured["median_ms"] / python_ms
                    row["cross_origin_isolated"] = measured["isolated"]
                rows.append(row)
                print(json.dumps(row))
            version = browser.version
            browser.close()
    finally:
        stop(process)
    result = {
        "machine": f"{os.cpu_count()} cores",
        "chromium": version,
        "protocol": "a local epoch of 600 real MNIST examples at batch 10 (60 SGD steps with "
        "momentum, weight decay, clipping, label mask) in one train call; browser: median step "
        f"from step {STEADY_FROM + 1} on, and the first step; Python onnxruntime with 1 intra-op "
        "thread: mean step of the epoch, best of 3; onnxruntime-web 1.30 wasm in headless "
        "Chromium through web/trainer.js",
        "levels": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
