"""Benchmark: secure aggregation over loopback HTTP, against a real ``coordinator serve``.

N protocol-level devices (threads in this process, one ``requests`` session
each) register, ask ``/v1/task`` and do what it says (a wait: again after its
``retry_after``: ``--poll-seconds``, 0.2 s here, shorter while a secure stage
a device answered waits for the others), training
nothing: a random update of their level's slice, sBN moments of zeros and ones;
with ``--secure-aggregation`` they answer the SecAgg+ stages with the real
client code (``SecAggClient``) and upload masked vectors. MNIST conv, Fix a-e in
equal parts, one round, statistics from the round's devices, no evaluation.
Per size and mode: the round's time by the coordinator's own clock (opened to
finished) and the HTTP body bytes per device, both directions.

The devices run as threads of ``--processes`` processes (4 by default; devices
are machines of their own, so one GIL for all of them would serialise their
crypto and encoding as no fleet does). All of it shares this machine's cores
with the coordinator (``device_cpu_seconds`` says how much device work there
was), so the secure round's time still holds work a real fleet does elsewhere.

    .venv/bin/python bench/bench_secagg_http.py            # 10, 50, 100 devices
    .venv/bin/python bench/bench_secagg_http.py --sizes 10
    .venv/bin/python bench/bench_secagg_http.py --processes 1   # every device in one process

Writes bench/results/secagg_http.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
from safetensors.numpy import load, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.process import start_coordinator, stop  # noqa: E402
from heterofl_edge.levels import rate_label  # noqa: E402
from heterofl_edge.secagg import (  # noqa: E402
    Advertisement,
    FixedPoint,
    LayoutPlan,
    SecAggClient,
    b64,
    statistics_layout,
    statistics_vector,
    training_vector,
    unb64,
)

RESULTS = ROOT / "bench" / "results" / "secagg_http.json"
DATA = Path(os.environ.get("HETEROFL_DATA_DIR", ROOT.parent / "shared" / "datasets" / "mnist"))
LEVELS = (1.0, 0.5, 0.25, 0.125, 0.0625)
PROFILE = {
    "step_ms": 1.0,
    "reference_rate": 0.0625,
    "memory_mb": 4096,
    "bandwidth_mbps": 1000,
    "num_examples": 600,
    "secure_aggregation": True,
}


class Device(threading.Thread):
    """One protocol-level device: bytes counted, crypto and encoding timed."""

    def __init__(self, url: str, seed: int, labels: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.labels = url, labels
        self.rng = np.random.default_rng(seed)
        self.session = requests.Session()
        self.up = self.down = 0
        self.cpu = 0.0
        self.secagg: dict[str, SecAggClient] = {}
        self.error: str | None = None

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        body = kwargs.get("data") or (
            json.dumps(kwargs["json"]).encode() if "json" in kwargs else b""
        )
        reply = self.session.request(method, self.url + path, timeout=120, **kwargs)
        self.up += len(body)
        self.down += len(reply.content)
        return reply

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # reported, not raised in a thread
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        reply = self.call("POST", "/v1/devices", json=PROFILE)
        reply.raise_for_status()
        self.session.headers["Authorization"] = f"Bearer {reply.json()['token']}"
        while True:
            task = self.call("GET", "/v1/task").json()
            if task["action"] == "done":
                return
            if task["action"] == "wait":
                time.sleep(float(task["retry_after"]))
                continue
            if task["action"] == "secagg":
                start = time.thread_time()
                body = self.answer(task)
                self.cpu += time.thread_time() - start
                self.call("POST", task["answer_url"], json=body)
                continue
            weights = load(self.call("GET", task["weights_url"]).content)
            start = time.thread_time()
            upload = self.result(task, weights)
            self.cpu += time.thread_time() - start
            self.call("POST", task["upload_url"], data=upload)

    def answer(self, task: dict[str, Any]) -> dict[str, Any]:
        context = task["context"]
        if task["stage"] == "advertise":
            client = self.secagg[context] = SecAggClient(context, task["index"])
            keys = client.advertise()
            return {
                "context": context,
                "stage": "advertise",
                "c_public": b64(keys.c_public),
                "s_public": b64(keys.s_public),
            }
        client = self.secagg[context]
        if task["stage"] == "share":
            neighbours = {
                p["index"]: Advertisement(unb64(p["c_public"]), unb64(p["s_public"]))
                for p in task["neighbours"]
            }
            shares = client.share_keys(neighbours, task["threshold"])
            return {
                "context": context,
                "stage": "share",
                "shares": {str(v): b64(x) for v, x in shares.items()},
            }
        values = client.unmask(task["dropped"], task["survivors"])
        return {
            "context": context,
            "stage": "unmask",
            "unmask": {str(v): str(x) for v, x in values.items()},
        }

    def result(self, task: dict[str, Any], weights: dict[str, np.ndarray]) -> bytes:
        secure = task.get("secure")
        if task["action"] == "train":
            trainable = {k: v for k, v in weights.items() if "running" not in k}
            trained = {
                k: (v + self.rng.normal(0, 0.01, v.shape)).astype(np.float32)
                for k, v in trainable.items()
            }
            if secure is None:
                metadata = {"num_samples": "600", "labels": json.dumps(self.labels)}
                return save(trained, metadata=metadata)
            plan = LayoutPlan.from_json(secure["plan"])
            update = {
                k: trained[k].astype(np.float64) - weights[k].astype(np.float64) for k in plan.names
            }
            fixed = FixedPoint(secure["scale"], secure["clip"])
            vector = training_vector(update, plan, task["rate"], fixed, self.labels)
            layout, layout_of = plan.layout(task["rate"]), plan.layout
        else:
            stats = {}
            for name, value in weights.items():
                if name.endswith("running_mean"):
                    layer = name.removesuffix(".running_mean")
                    stats[f"{layer}.count"] = np.array([600.0], np.float32)
                    stats[f"{layer}.mean"] = np.zeros(value.shape, np.float32)
                    stats[f"{layer}.var"] = np.ones(value.shape, np.float32)
            if secure is None:
                return save(stats)
            layers = [(n, c) for n, c in secure["layers"]]
            vector = statistics_vector(stats, layers, secure["statistics_scale"])
            layout = statistics_layout(layers)
            layout_of = lambda rate: layout  # noqa: E731 - every statistics vector is alike
        client = self.secagg[secure["context"]]
        peers = {int(v): layout_of(r) for v, r in secure["peers"].items()}
        ciphertexts = {int(v): unb64(x) for v, x in secure["ciphertexts"].items()}
        return save({"masked": client.mask(vector, layout, peers, ciphertexts)})


def measure(
    size: int, secure: bool, work: Path, processes: int, poll_seconds: float
) -> dict[str, Any]:
    state = work / f"state-{size}-{'secure' if secure else 'plain'}"
    shutil.rmtree(state, ignore_errors=True)
    per = size // len(LEVELS)
    mode = "-".join(f"{rate_label(r)}{per}" for r in LEVELS)
    args = [
        "--state-dir", str(state), "--mode", mode, "--policy", "fix", "--rounds", "1",
        "--fraction", "1", "--min-devices", str(size), "--min-uploads", str(size),
        "--statistics", "round", "--no-artifacts", "--poll-seconds", str(poll_seconds),
        "--connections-per-address", "1000", "--round-seconds", "600", "--stats-seconds", "600",
    ]  # fmt: skip
    if secure:
        args.append("--secure-aggregation")
    process, url = start_coordinator(args, work / f"coordinator-{size}-{secure}.log")
    context = multiprocessing.get_context("spawn")
    coordinator_cpu = process_cpu_seconds(process.pid)
    try:
        groups = [list(range(size))[k::processes] for k in range(processes)]
        with context.Pool(processes) as pool:
            reports = [
                r for part in pool.starmap(run_devices, [(url, g) for g in groups]) for r in part
            ]
        errors = [r["error"] for r in reports if r["error"]]
        if errors:
            raise RuntimeError(f"{len(errors)} devices failed: {errors[:3]}")
        coordinator_cpu = process_cpu_seconds(process.pid) - coordinator_cpu
        rounds = requests.get(f"{url}/v1/rounds", timeout=60).json()["rounds"]
    finally:
        stop(process)
    record = rounds[0]
    return {
        "state": record["state"],
        "round_seconds": record["finished_at"] - record["opened_at"],
        # registration to the end of the round: what the secure protocol costs the server
        "coordinator_cpu_seconds": coordinator_cpu,
        "bytes_up_per_device": sum(r["up"] for r in reports) / size,
        "bytes_down_per_device": sum(r["down"] for r in reports) / size,
        "device_cpu_seconds": sum(r["cpu"] for r in reports),
        "device_cpu_seconds_largest": max(r["cpu"] for r in reports),
    }


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_devices(url: str, indices: list[int]) -> list[dict[str, Any]]:
    """One process's devices, as threads (a pool worker); each device's counts."""
    devices = [Device(url, i, [(2 * i) % 10, (2 * i + 1) % 10]) for i in indices]
    for d in devices:
        d.start()
    for d in devices:
        d.join(timeout=900)
    return [{"up": d.up, "down": d.down, "cpu": d.cpu, "error": d.error} for d in devices]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-secagg-http")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="device processes (threads within each): 1 serialises every device's work",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=0.2,
        help="the coordinator's poll interval (its default is 2)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for size in args.sizes:
        plain = measure(size, False, args.work, args.processes, args.poll_seconds)
        secure = measure(size, True, args.work, args.processes, args.poll_seconds)
        bytes_plain = plain["bytes_up_per_device"] + plain["bytes_down_per_device"]
        bytes_secure = secure["bytes_up_per_device"] + secure["bytes_down_per_device"]
        entry = {
            "devices": size,
            "plain": plain,
            "secure": secure,
            "time_ratio": secure["round_seconds"] / plain["round_seconds"],
            "bytes_ratio": bytes_secure / bytes_plain,
            "coordinator_cpu_ratio": secure["coordinator_cpu_seconds"]
            / plain["coordinator_cpu_seconds"],
        }
        runs.append(entry)
        print(
            f"{size} devices: round {plain['round_seconds']:.2f} s plain, "
            f"{secure['round_seconds']:.2f} s secure ({entry['time_ratio']:.2f}x; devices' "
            f"secure work {secure['device_cpu_seconds']:.2f} s in all; coordinator CPU "
            f"{plain['coordinator_cpu_seconds']:.2f} -> {secure['coordinator_cpu_seconds']:.2f} s, "
            f"{entry['coordinator_cpu_ratio']:.2f}x); bytes per device "
            f"{bytes_plain / 1e6:.3f} -> {bytes_secure / 1e6:.3f} MB ({entry['bytes_ratio']:.3f}x)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "protocol": (
                    f"coordinator serve on 127.0.0.1 (--no-artifacts, --poll-seconds "
                    f"{args.poll_seconds:g}, "
                    "--statistics round), MNIST conv Fix a-e in equal parts, one round; "
                    f"protocol-level devices as threads of {args.processes} processes"
                ),
                "processes": args.processes,
                "poll_seconds": args.poll_seconds,
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                },
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
