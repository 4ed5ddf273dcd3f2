"""Load on a real ``coordinator serve`` process: many protocol-level devices, no training.

Part 1 (``fleet``): N devices (threads, one keep-alive HTTP connection each) register,
poll for tasks, download their weights, upload valid random weights for their
level and answer the sBN statistics query, for 3 rounds; an observer polls
``GET /v1/rounds`` like a dashboard. Reported per endpoint: p50/p95/p99/max
latency, overall and inside the windows in which a round closes (from the
close of its training phase to the end of its evaluation, by the coordinator's
own timestamps); errors by status and kind; the coordinator's peak RSS.

Part 2 (``uploads``): uploads per second at level e. K devices register and
fetch their round-1 weights; then T threads upload all K results as fast as the
coordinator acknowledges them. Every acknowledged upload is durable
(group commit, ``synchronous=FULL``); the run then kills the coordinator with
SIGKILL, restarts it on the same folder and counts the uploads it kept.

Everything stays on 127.0.0.1. Run: ``python bench/bench_load.py [--quick]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.process import start_coordinator, stop  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "load.json"
DATA = Path(os.environ.get("HETEROFL_DATA_DIR", ROOT.parent / "shared" / "datasets" / "mnist"))
PROFILE = {"step_ms": 1.0, "reference_rate": 1.0, "memory_mb": 4096, "bandwidth_mbps": 1000}
# Every simulated device connects from 127.0.0.1, as every client does behind a reverse proxy:
# the per-address cap (64 by default) would refuse the 65th device's connection.
SAME_ADDRESS = ["--connections-per-address", "1000"]


_STARTED: list[Any] = []  # coordinator processes, stopped when the bench ends however it ends


def launch(args: list[str], log: Path) -> tuple[Any, str]:
    process, url = start_coordinator(args, log)
    _STARTED.append(process)
    return process, url


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: list[tuple[str, float, float, int]] = []  # endpoint, start, seconds, status
        self.errors: Counter[str] = Counter()

    def add(self, endpoint: str, start: float, seconds: float, status: int) -> None:
        with self.lock:
            self.samples.append((endpoint, start, seconds, status))
            if status >= 500:
                self.errors[f"HTTP {status}"] += 1

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1


class Connection:
    """One device's keep-alive connection; every request is timed and recorded."""

    def __init__(self, port: int, recorder: Recorder, timeout: float = 30.0) -> None:
        self.port = port
        self.recorder = recorder
        self.timeout = timeout
        self.token: str | None = None
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, endpoint: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if body is not None and endpoint == "POST /v1/devices":
            headers["Content-Type"] = "application/json"
        start = time.time()
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=self.timeout
                )
            try:
                self._conn.request(method, path, body=body, headers=headers)
                reply = self._conn.getresponse()
                data = reply.read()
                self.recorder.add(endpoint, start, time.time() - start, reply.status)
                return reply.status, data
            except TimeoutError:
                self.recorder.error("timeout")
                self._close()
                return 0, b""
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self._close()  # a keep-alive connection the server closed: once more
                if attempt:
                    self.recorder.error("connection reset")
                    return 0, b""
            except OSError as exc:
                self.recorder.error(type(exc).__name__)
                self._close()
                return 0, b""
        return 0, b""

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


def random_update(weights: dict[str, np.ndarray], rng: np.random.Generator) -> bytes:
    tensors = {
        k: rng.normal(0, 0.05, v.shape).astype(np.float32)
        for k, v in weights.items()
        if not k.endswith(("running_mean", "running_var"))
    }
    metadata = {
        "num_samples": "600",
        "labels": json.dumps(list(range(10))),
        "metrics": json.dumps({"loss": 0.5, "accuracy": 0.9}),
    }
    return save(tensors, metadata=metadata)


def statistics_upload(weights: dict[str, np.ndarray]) -> bytes:
    stats = {}
    for name, value in weights.items():
        if name.endswith("running_mean"):
            layer = name.removesuffix(".running_mean")
            stats[f"{layer}.count"] = np.array(600.0, np.float32)
            stats[f"{layer}.mean"] = np.zeros(value.shape, np.float32)
            stats[f"{layer}.var"] = np.ones(value.shape, np.float32)
    return save(stats)


def device_loop(
    port: int, recorder: Recorder, stop_at: float, seed: int, ready: threading.Barrier | None
) -> None:
    conn = Connection(port, recorder)
    rng = np.random.default_rng(seed)
    status, data = conn.request(
        "POST", "/v1/devices", "POST /v1/devices", json.dumps(PROFILE).encode()
    )
    if status != 201:
        return
    conn.token = json.loads(data)["token"]
    if ready is not None:
        ready.wait()
    bodies: dict[str, bytes] = {}
    while time.time() < stop_at:
        status, data = conn.request("GET", "/v1/task", "GET /v1/task")
        if status != 200:
            time.sleep(1.0)
            continue
        task = json.loads(data)
        if task["action"] == "done":
            return
        if task["action"] == "wait":
            time.sleep(task["retry_after"])
            continue
        status, data = conn.request("GET", task["weights_url"], "GET /v1/rounds/N/weights")
        if status != 200:
            continue
        if task["action"] == "train":
            key = f"update-{task['level']}"
            if key not in bodies:
                bodies[key] = random_update(load(data), rng)
            conn.request("POST", task["upload_url"], "POST /v1/rounds/N/update", bodies[key])
        else:
            key = f"statistics-{task['level']}"
            if key not in bodies:
                bodies[key] = statistics_upload(load(data))
            conn.request("POST", task["upload_url"], "POST /v1/rounds/N/statistics", bodies[key])


def observer_loop(port: int, recorder: Recorder, stop_at: float, done: threading.Event) -> None:
    conn = Connection(port, recorder)
    while time.time() < stop_at and not done.is_set():
        conn.request("GET", "/v1/rounds", "GET /v1/rounds")
        conn.request("GET", "/v1/health", "GET /v1/health")
        time.sleep(0.5)


def percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ms = np.array(values) * 1000
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "max_ms": round(float(ms.max()), 1),
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fleet_run(devices: int, fraction: float, rounds: int, work: Path) -> dict[str, Any]:
    state = work / f"fleet-{devices}"
    shutil.rmtree(state, ignore_errors=True)  # a fresh coordinator, never a resumed one
    process, url = launch(
        [
            "--state-dir", str(state), "--mode", "a", "--policy", "fix",
            "--rounds", str(rounds), "--fraction", str(fraction),
            "--min-devices", str(devices), "--min-uploads", "1",
            "--round-seconds", "300", "--stats-seconds", "120", "--local-epochs", "1",
            "--data-dir", str(DATA), "--no-artifacts", "--poll-seconds", "1",
            *SAME_ADDRESS,
        ],
        work / f"coordinator-{devices}.log",
    )  # fmt: skip
    port = int(url.rsplit(":", 1)[1])
    recorder = Recorder()
    stop_at = time.time() + 900
    done = threading.Event()
    started = time.time()
    threads = [
        threading.Thread(target=device_loop, args=(port, recorder, stop_at, i, None), daemon=True)
        for i in range(devices)
    ]
    observer = threading.Thread(target=observer_loop, args=(port, recorder, stop_at, done))
    for t in threads:
        t.start()
    observer.start()
    for t in threads:
        t.join(timeout=max(1.0, stop_at - time.time()))
    done.set()
    observer.join()
    conn = Connection(port, Recorder())
    history = json.loads(conn.request("GET", "/v1/rounds", "x")[1])["rounds"]
    rss = peak_rss_mb(process.pid)
    stop(process)
    windows = [(r["closed_at"], r["finished_at"]) for r in history if r["finished_at"]]
    by_endpoint: dict[str, list[float]] = defaultdict(list)
    closing: dict[str, list[float]] = defaultdict(list)
    for endpoint, start, seconds, _ in recorder.samples:
        by_endpoint[endpoint].append(seconds)
        if any(a <= start <= b for a, b in windows):
            closing[endpoint].append(seconds)
    statuses = Counter(status for _, _, _, status in recorder.samples)
    return {
        "devices": devices,
        "fraction": fraction,
        "rounds": [
            {
                "round": r["round"],
                "state": r["state"],
                "uploads": r["uploads"],
                "close_seconds": round(r["finished_at"] - r["closed_at"], 2),
                "seconds": r["metrics"].get("seconds"),
            }
            for r in history
        ],
        "wall_seconds": round(time.time() - started, 1),
        "latency": {k: percentiles(v) for k, v in sorted(by_endpoint.items())},
        "latency_during_round_close": {k: percentiles(v) for k, v in sorted(closing.items())},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(recorder.errors),
        "peak_rss_mb": round(rss, 1),
    }


def upload_run(devices: int, threads: int, work: Path) -> dict[str, Any]:
    state = work / "uploads"
    shutil.rmtree(state, ignore_errors=True)
    args = [
        "--state-dir", str(state), "--mode", "e", "--policy", "fix", "--rounds", "1",
        "--fraction", "1", "--min-devices", str(devices), "--round-seconds", "3600",
        "--no-artifacts", "--threads", "16", *SAME_ADDRESS,
    ]  # fmt: skip
    process, url = launch(args, work / "coordinator-uploads.log")
    port = int(url.rsplit(":", 1)[1])
    recorder = Recorder()
    conns = [Connection(port, recorder) for _ in range(devices)]
    for conn in conns:
        status, data = conn.request(
            "POST", "/v1/devices", "POST /v1/devices", json.dumps(PROFILE).encode()
        )
        if status != 201:
            raise SystemExit(f"registration answered {status}: {data[:200]!r}")
        conn.token = json.loads(data)["token"]
        conn.close()  # K idle keep-alive connections would count against the server's limit
    bodies: list[tuple[Connection, str, bytes]] = []
    rng = np.random.default_rng(0)
    for conn in conns:
        while True:
            task = json.loads(conn.request("GET", "/v1/task", "GET /v1/task")[1])
            if task["action"] == "train":
                break
            time.sleep(0.2)
        weights = load(conn.request("GET", task["weights_url"], "weights")[1])
        conn.close()
        bodies.append((conn, task["upload_url"], random_update(weights, rng)))
    acknowledged: list[int] = []
    lock = threading.Lock()
    cursor = iter(range(len(bodies)))

    def worker() -> None:
        own = Connection(port, recorder)
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            conn, path, body = bodies[index]
            own.token = conn.token
            status, _ = own.request("POST", path, "POST /v1/rounds/N/update", body)
            if status == 200:
                with lock:
                    acknowledged.append(index)

    start = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    seconds = time.perf_counter() - start
    os.kill(process.pid, signal.SIGKILL)  # acknowledged means durable: kill -9, restart, count
    process.wait()
    process, url = launch(args, work / "coordinator-uploads-restart.log")
    conn = Connection(int(url.rsplit(":", 1)[1]), Recorder())
    history = json.loads(conn.request("GET", "/v1/rounds", "x")[1])["rounds"]
    stop(process)
    kept = history[0]["uploads"] if history else 0
    upload_latency = percentiles(
        [s for e, _, s, _ in recorder.samples if e.startswith("POST /v1/rounds")]
    )
    return {
        "devices": devices,
        "upload_threads": threads,
        "upload_bytes": len(bodies[0][2]),
        "acknowledged": len(acknowledged),
        "seconds": round(seconds, 2),
        "uploads_per_second": round(len(acknowledged) / seconds, 1),
        "kept_after_kill_9": kept,
        "upload_latency": upload_latency,
        "errors": dict(recorder.errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small runs, results not saved")
    parser.add_argument("--fleets", default="50,200")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--upload-devices", type=int, default=1000)
    parser.add_argument(
        "--only", choices=("fleets", "uploads"), help="run one part, keep the other's results"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-load")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    fleets = [10] if args.quick else [int(n) for n in args.fleets.split(",")]
    results: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores",
        "protocol": "conv level a for the fleets (Fix, mode a), level e for the upload rate; "
        "coordinator serve with default server settings (16 threads, 1,000 connections) but "
        "--connections-per-address 1000 (every device is on 127.0.0.1), "
        "torch 1 thread; evaluation on the 10,000 MNIST test images after each round",
        "fleet": [],
    }
    if args.only and RESULTS.exists() and not args.quick:
        # Re-measure one part; the other keeps its committed figures.
        results = {**json.loads(RESULTS.read_text()), **{k: results[k] for k in ("machine",)}}
    if args.only in (None, "fleets"):
        results["fleet"] = []
        for n in fleets:
            run = fleet_run(n, args.fraction, 3, args.work)
            results["fleet"].append(run)
            print(json.dumps(run, indent=1))
    if args.only in (None, "uploads"):
        upload = upload_run(100 if args.quick else args.upload_devices, 32, args.work)
        results["uploads"] = upload
        print(json.dumps(upload, indent=1))
    if not args.quick:
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    try:
        main()
    finally:
        for started in _STARTED:
            if started.poll() is None:
                stop(started)
