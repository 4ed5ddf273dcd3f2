"""The browser device's local session against Python onnxruntime, in the same run.

A coordinator exports conv levels and serves the device page. For each level,
a device's local session (600 real MNIST examples, batch 10, E 5 epochs as in
the paper's Table 6 for MNIST: 300 SGD steps in one ``train`` call, as a device
trains) is timed in headless Chromium (Debian's) on onnxruntime-web (wasm)
with 1 and 2 threads, through the page's own code, two ways: ``main`` runs
``web/trainer.js`` on the page's main thread (the page before the worker), and
``worker`` runs it where the page now does, in the module Web Worker
(``web/train_worker.js`` through ``web/remote_level.js``: the data posted once,
one progress message per step). Python onnxruntime runs the same epochs with
one thread. Reported per level and way: the browser's median step over the
session's last epoch (steady state), its mean step over the whole session
(warm-up and, for the worker, messages included) and its first step. Ratios
are browser / Python, steady state and whole session.

Why steady state: V8 runs WebAssembly first from its baseline compiler and tiers
hot functions up to optimised code while they run; at level e the first
70-100 steps are 2-4x slower than the last epoch's (the device's profile step
warms up for the same reason). Python onnxruntime has no warm-up beyond its
first step, so its figure is the mean step of whole epochs.

``--profile-ops LEVELS`` also profiles the same step graph operator by operator
(onnxruntime's own profiler: onnxruntime-web's in Chromium, onnxruntime's in
Python, one thread each, the median kernel time of every node over the last
profiled steps) and reports both per operator type, with their ratio: where a
level misses the target, this says which kernels are slower in wasm.

Run: ``python bench/bench_browser.py`` (needs ``make web`` and /usr/bin/chromium);
``--runners main`` or ``--runners worker`` times one way only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from safetensors.numpy import load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.demo_data import Normalise  # noqa: E402
from coordinator.process import start_coordinator, stop, wait_until_ready  # noqa: E402
from device_sim.onnx_backend import OnnxLevel  # noqa: E402
from heterofl_edge.device_runtime import TrainingRequest  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "browser.json"
DATA = Path(os.environ.get("HETEROFL_DATA_DIR", ROOT.parent / "shared" / "datasets" / "mnist"))
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
EXAMPLES = 600  # one client's shard: 60 steps of batch 10 per epoch
EPOCHS = 5  # a device's local session (Table 6, MNIST)

BROWSER_TIMING = """
async ([level, threads, epochs, runner]) => {
  const { parseSafetensors } = await import('/device/safetensors.js');
  const { demoData, materialise } = await import('/device/data.js');
  const manifest = await (await fetch(`/v1/artifacts/conv/${level}/manifest.json`)).json();
  const files = {};
  for (const program of ['train_step', 'statistics']) {
    const file = manifest.programs.onnx[program].file;
    const reply = await fetch(`/v1/artifacts/conv/${level}/${file}`);
    files[file] = new Uint8Array(await reply.arrayBuffer());
  }
  const demo = parseSafetensors(new Uint8Array(await (await fetch(
    '/v1/demo-data?shard=0&clients=100&train_examples=60000')).arrayBuffer()));
  const compact = demoData(demo.tensors, demo.metadata);  // uint8 pixels and their rule
  const labels = [...Array(10).keys()];
  const size = (shape) => shape.reduce((a, b) => a * b, 1);
  const value = (_, i) => ((i * 7919) % 200 - 100) / 1000;
  const weights = new Map(manifest.parameters.map(
    (p) => [p.name, Float32Array.from({ length: size(p.shape) }, value)]));
  let trainer, data, isolated = crossOriginIsolated, worker = null;
  if (runner === 'worker') {
    const { TrainerWorker } = await import('/device/remote_level.js');
    worker = new TrainerWorker(() => new Worker('/device/train_worker.js', { type: 'module' }));
    isolated = (await worker.init(threads)).isolated;
    trainer = await worker.level(level, manifest, files);
    data = compact;
    await worker.dataKey(data);  // posted (and standardised) before the clock starts
  } else {
    const ort = await import('/device/ort/ort.wasm.min.mjs');
    ort.env.wasm.numThreads = threads;
    const { OnnxLevel } = await import('/device/trainer.js');
    trainer = await OnnxLevel.create(ort, manifest, files);
    data = materialise(compact);
  }
  const arrivals = [], clock = [];  // main thread's arrival; the trainer's own clock
  const start = performance.now();
  await trainer.train({ weights, data, labels, lr: 0.01, epochs, batchSize: 10, seed: 0,
                        onStep: (p) => { const now = performance.now();
                                         arrivals.push(now); clock.push(p?.at ?? now); } });
  const end = performance.now();
  worker?.terminate();
  const steps = clock.map((s, i) => s - (i ? clock[i - 1] : start)).slice(1);
  const perEpoch = clock.length / epochs;
  const last = steps.slice(steps.length - perEpoch + 1).sort((a, b) => a - b);
  return { steady_ms: last[Math.floor(last.length / 2)], mean_ms: (end - start) / clock.length,
           first_ms: arrivals[0] - start, session_s: (end - start) / 1000,
           isolated, n: data.n, steps: clock.length };
}
"""


BROWSER_PROFILE = """
async ([level, steps]) => {
  const ort = await import('/device/ort/ort.wasm.min.mjs');
  ort.env.wasm.numThreads = 1;
  const manifest = await (await fetch(`/v1/artifacts/conv/${level}/manifest.json`)).json();
  const file = manifest.programs.onnx.train_step.file;
  const reply = await fetch(`/v1/artifacts/conv/${level}/${file}`);
  const bytes = new Uint8Array(await reply.arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ['wasm'], graphOptimizationLevel: 'all', enableProfiling: true });
  const size = (shape) => shape.reduce((a, b) => a * b, 1);
  const feeds = {};
  for (const p of manifest.parameters) {
    const n = size(p.shape);
    const value = Float32Array.from({ length: n }, (_, i) => ((i * 7919) % 200 - 100) / 1000);
    feeds[`param.${p.name}`] = new ort.Tensor('float32', value, p.shape);
    feeds[`momentum.${p.name}`] = new ort.Tensor('float32', new Float32Array(n), p.shape);
  }
  const sample = manifest.input.shape.slice(1);
  const classes = manifest.num_classes;
  const x = Float32Array.from({ length: 10 * size(sample) }, (_, i) => (i % 17) / 17);
  feeds.x = new ort.Tensor('float32', x, [10, ...sample]);
  const y = BigInt64Array.from({ length: 10 }, (_, i) => BigInt(i % classes));
  feeds.y = new ort.Tensor('int64', y, [10]);
  feeds.label_mask = new ort.Tensor('float32', new Float32Array(classes).fill(1), [classes]);
  feeds.lr = new ort.Tensor('float32', Float32Array.of(0.01), []);
  for (let i = 0; i < steps; i++) await session.run(feeds);
  session.endProfiling();  // onnxruntime-web writes the trace to the console
  return feeds.x.dims;
}
"""
PROFILE_STEPS = 60  # profiled steps per level; per node, the median of the last PROFILE_LAST
PROFILE_LAST = 20


def kernel_ms_by_node(events: list[dict[str, Any]]) -> dict[str, tuple[str, float]]:
    """(operator type, median ms of the last PROFILE_LAST runs) per node of a profile."""
    times: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            times.setdefault(event["name"], []).append(event["dur"] / 1000)
            kinds[event["name"]] = event["args"]["op_name"]
    return {name: (kinds[name], float(np.median(t[-PROFILE_LAST:]))) for name, t in times.items()}


def python_profile(folder: Path, work: Path) -> dict[str, tuple[str, float]]:
    """Python onnxruntime's profile of the same inputs as BROWSER_PROFILE, one thread."""
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "python_profile")
    session = ort.InferenceSession(
        str(folder / manifest["programs"]["onnx"]["train_step"]["file"]),
        options,
        providers=["CPUExecutionProvider"],
    )
    feeds: dict[str, np.ndarray] = {}
    for p in manifest["parameters"]:
        count = int(np.prod(p["shape"]))
        value = (np.arange(count) * 7919 % 200 - 100) / 1000
        feeds[f"param.{p['name']}"] = value.astype(np.float32).reshape(p["shape"])
        feeds[f"momentum.{p['name']}"] = np.zeros(p["shape"], np.float32)
    sample = manifest["input"]["shape"][1:]
    feeds["x"] = (np.arange(10 * int(np.prod(sample))) % 17 / 17).astype(np.float32)
    feeds["x"] = feeds["x"].reshape(10, *sample)
    feeds["y"] = np.arange(10, dtype=np.int64) % manifest["num_classes"]
    feeds["label_mask"] = np.ones(manifest["num_classes"], np.float32)
    feeds["lr"] = np.array(0.01, np.float32)
    for _ in range(PROFILE_STEPS):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    return kernel_ms_by_node(events)


def operator_table(
    browser: dict[str, tuple[str, float]], python: dict[str, tuple[str, float]]
) -> list[dict[str, Any]]:
    """Kernel ms per step by operator type, browser against Python, largest first."""
    rows: dict[str, dict[str, Any]] = {}
    for name, (kind, ms) in browser.items():
        row = rows.setdefault(kind, {"op": kind, "nodes": 0, "browser_ms": 0.0, "python_ms": 0.0})
        row["nodes"] += 1
        row["browser_ms"] += ms
        row["python_ms"] += python.get(name, (kind, 0.0))[1]
    table = sorted(rows.values(), key=lambda r: -r["browser_ms"])
    for row in table:
        row["ratio"] = row["browser_ms"] / row["python_ms"] if row["python_ms"] else None
    return table


def profile_level(page: Any, url: str, level: str, folder: Path, work: Path) -> dict[str, Any]:
    """Both profiles of level's step graph, compared by operator type."""
    lines: list[str] = []
    page.on("console", lambda message: lines.append(message.text))
    page.goto(f"{url}/device/")
    page.evaluate(BROWSER_PROFILE, [level, PROFILE_STEPS])
    events = []
    for text in lines:
        for line in text.splitlines():
            line = line.strip().rstrip(",")
            if line.startswith('{"cat"'):
                events.append(json.loads(line))
    browser = kernel_ms_by_node(events)
    python = python_profile(folder, work)
    if set(browser) != set(python):
        raise SystemExit(f"level {level}: the two profiles name different nodes")
    table = operator_table(browser, python)
    total_b = sum(r["browser_ms"] for r in table)
    total_p = sum(r["python_ms"] for r in table)
    return {
        "level": level,
        "nodes": len(browser),
        "kernel_ms_browser": total_b,
        "kernel_ms_python": total_p,
        "kernel_ratio": total_b / total_p,
        "by_operator": table,
    }


def python_step_ms(folder: Path, x: np.ndarray, y: np.ndarray) -> float:
    level = OnnxLevel(folder, threads=1)
    rng = np.random.default_rng(0)
    weights = {
        p["name"]: rng.uniform(-0.1, 0.1, p["shape"]).astype(np.float32)
        for p in level.manifest["parameters"]
    }
    level.train(
        TrainingRequest(weights, x[:10], y[:10], list(range(10)), 0.01, 1, 10, 0)
    )  # warm-up
    best = float("inf")
    for _ in range(3):  # mean step of a whole epoch; best of 3
        start = time.perf_counter()
        result = level.train(TrainingRequest(weights, x, y, list(range(10)), 0.01, 1, 10, 0))
        best = min(best, 1000 * (time.perf_counter() - start) / result.steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-browser")
    parser.add_argument("--levels", default="a,c,d,e")
    parser.add_argument("--runners", default="main,worker", help="main, worker or both")
    parser.add_argument("--threads", default="1,2", help="wasm threads to time")
    parser.add_argument(
        "--profile-ops", default="a,e", help="levels to profile by operator ('' for none)"
    )
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    levels = args.levels.split(",")
    runners = args.runners.split(",")
    if not set(runners) <= {"main", "worker"}:
        raise SystemExit(f"--runners takes main and worker, not {args.runners}")
    thread_counts = [int(t) for t in args.threads.split(",")]
    profiled = [level for level in args.profile_ops.split(",") if level]
    mode = "-".join(sorted(set(levels + profiled)))
    process, url = start_coordinator(
        [
            "--state-dir", str(args.work / "state"), "--mode", mode, "--policy", "dynamic",
            "--no-verify-artifacts", "--demo-data", str(DATA),
        ],
        args.work / "coordinator.log",
    )  # fmt: skip
    rows = []
    profiles: list[dict[str, Any]] = []
    try:
        wait_until_ready(url)
        shard = requests.get(
            f"{url}/v1/demo-data?shard=0&clients=100&train_examples=60000", timeout=60
        ).content
        demo = load(shard)
        header = json.loads(shard[8 : 8 + int.from_bytes(shard[:8], "little")])
        rule = json.loads(header["__metadata__"]["normalise"])
        x = Normalise(rule["scale"], tuple(rule["mean"]), tuple(rule["std"])).apply(demo["x"])
        y = demo["y"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, chromium_sandbox=False
            )
            for level in levels:
                folder = args.work / "state" / "artifacts" / f"conv-{level}"
                python_ms = python_step_ms(folder, x, y)
                row: dict[str, Any] = {
                    "level": level,
                    "batch": 10,
                    "python_onnxruntime_1_thread_ms": python_ms,
                    "python_session_s": python_ms * EPOCHS * EXAMPLES / 10 / 1000,
                    "browser": {},
                }
                for runner in runners:
                    for threads in thread_counts:
                        page = browser.new_page()
                        page.goto(f"{url}/device/")
                        measured = page.evaluate(BROWSER_TIMING, [level, threads, EPOCHS, runner])
                        page.close()
                        assert measured["n"] == EXAMPLES, measured
                        assert measured["steps"] == EPOCHS * EXAMPLES // 10, measured
                        measured["ratio_steady"] = measured["steady_ms"] / python_ms
                        measured["ratio_session"] = measured["mean_ms"] / python_ms
                        row["browser"][f"{runner}_{threads}_thread"] = measured
                rows.append(row)
                print(json.dumps(row))
            for level in profiled:
                page = browser.new_page()
                folder = args.work / "state" / "artifacts" / f"conv-{level}"
                profiles.append(profile_level(page, url, level, folder, args.work))
                page.close()
                print(json.dumps({k: v for k, v in profiles[-1].items() if k != "by_operator"}))
            version = browser.version
            browser.close()
    finally:
        stop(process)
    result = {
        "machine": f"{os.cpu_count()} cores",
        "chromium": version,
        "protocol": f"a local session of {EPOCHS} epochs over 600 real MNIST examples at batch "
        "10 (SGD steps with momentum, weight decay, clipping, label mask) in one train call; "
        "browser: web/trainer.js on onnxruntime-web 1.30 wasm in headless Chromium, on the "
        "page's main thread ('main') or in the page's module Web Worker ('worker'); median "
        "step of the last epoch (steady state), mean step of the whole session (session_s "
        "over steps, messages included) and the first step; Python onnxruntime with 1 "
        "intra-op thread: mean step of an epoch, best of 3",
        "levels": rows,
        "operator_profiles": {
            "protocol": f"onnxruntime's profiler, one thread, {PROFILE_STEPS} steps of batch 10 "
            f"from the same inputs; per node the median kernel time of the last {PROFILE_LAST}; "
            "summed by operator type (profiling adds a per-node cost to both)",
            "levels": profiles,
        },
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
