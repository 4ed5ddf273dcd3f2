"""The browser device's training step against Python onnxruntime, in the same run.

A coordinator exports conv levels a, c and e and serves the device page. For
each level, one SGD step at batch 10 on real MNIST is timed (median of N after
warm-up steps) in Python onnxruntime with one thread, and in headless Chromium
(Debian's) on onnxruntime-web (wasm) with 1 and 2 threads, through the page's
own trainer (``web/trainer.js``). Ratios are browser / Python.

Run: ``python bench/bench_browser.py`` (needs ``make web`` and /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
STEPS = {"a": 10, "c": 30, "e": 60}
WARMUP = 3

BROWSER_TIMING = """
async ([level, steps, warmup, threads]) => {
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
    '/v1/demo-data?shard=0&clients=6000&train_examples=60000')).arrayBuffer()));
  const x = demo.tensors.get('x'), y = demo.tensors.get('y');
  const labels = [...Array(10).keys()];
  const data = { x: x.data, y: y.data, n: x.shape[0], shape: x.shape, labels };
  const size = (shape) => shape.reduce((a, b) => a * b, 1);
  const value = (_, i) => ((i * 7919) % 200 - 100) / 1000;
  const weights = new Map(manifest.parameters.map(
    (p) => [p.name, Float32Array.from({ length: size(p.shape) }, value)]));
  const times = [];
  for (let i = 0; i < warmup + steps; i++) {
    const start = performance.now();
    await trainer.train({ weights, data, labels, lr: 0.01, epochs: 1, batchSize: 10, seed: i });
    if (i >= warmup) times.push(performance.now() - start);
  }
  times.sort((a, b) => a - b);
  const median = times[Math.floor(times.length / 2)];
  return { median_ms: median, isolated: crossOriginIsolated, n: data.n };
}
"""


def python_step_ms(folder: Path, x: np.ndarray, y: np.ndarray, steps: int) -> float:
    level = OnnxLevel(folder, threads=1)
    rng = np.random.default_rng(0)
    weights = {
        p["name"]: rng.uniform(-0.1, 0.1, p["shape"]).astype(np.float32)
        for p in level.manifest["parameters"]
    }
    times = []
    for i in range(WARMUP + steps):
        start = time.perf_counter()
        level.train(weights, x, y, list(range(10)), 0.01, 1, 10, i)
        if i >= WARMUP:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


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
                f"{url}/v1/demo-data?shard=0&clients=6000&train_examples=60000", timeout=60
            ).content
        )
        x, y = demo["x"], demo["y"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            for level in levels:
                folder = args.work / "state" / "artifacts" / f"conv-{level}"
                python_ms = python_step_ms(folder, x, y, STEPS[level])
                row = {"level": level, "batch": len(y), "python_onnxruntime_1_thread_ms": python_ms}
                for threads in (1, 2):
                    page = browser.new_page()
                    page.goto(f"{url}/device/")
                    measured = page.evaluate(BROWSER_TIMING, [level, STEPS[level], WARMUP, threads])
                    page.close()
                    row[f"browser_{threads}_thread_ms"] = measured["median_ms"]
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
        "protocol": "one SGD step (momentum, weight decay, clipping, label mask) at batch 10 on "
        "real MNIST, median after 3 warm-up steps; Python onnxruntime with 1 intra-op thread; "
        "onnxruntime-web 1.30 wasm in headless Chromium through web/trainer.js",
        "levels": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
