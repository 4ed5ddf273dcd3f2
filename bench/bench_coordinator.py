"""Benchmark: coordinator uploads per second and aggregation throughput.

K devices (K = 10 and 100) at mixed conv levels a..e (Fix a1-b1-c1-d1-e1) each
upload one update through the HTTP API (Flask's test client: decode,
validate, write to disk, aggregate, commit). Against it, in the same run, a
numpy lower bound: summing the same float32 bytes into one accumulator. Also
the coordinator process's resident memory as K grows (the aggregator is
O(model): it should not grow with K).

    .venv/bin/python bench/bench_coordinator.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from heterofl_edge.models import get_architecture
from heterofl_edge.report import write_json
from heterofl_edge.slicing import shapes_at, trainable_names
from heterofl_edge.spec import Policy

ARCH = get_architecture("conv")
PROFILE = {"step_ms": 5.0, "reference_rate": 0.0625, "memory_mb": 4096, "bandwidth_mbps": 50}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(k: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = CoordinatorConfig(
            state_dir=Path(tmp),
            mode="a1-b1-c1-d1-e1",
            policy=Policy.fix,
            rounds=1,
            fraction=1.0,
            min_devices=k,
            min_uploads=k,
            statistics_query=False,
            round_seconds=1e9,
        )
        client = create_app(config).test_client()
        tokens = [client.post("/v1/devices", json=PROFILE).json["token"] for _ in range(k)]
        bodies, raw_bytes, arrays = [], 0, []
        for token in tokens:
            task = client.get("/v1/task", headers={"Authorization": f"Bearer {token}"}).json
            shapes = shapes_at(ARCH.spec, task["rate"])
            tensors = {n: torch.randn(shapes[n]) for n in trainable_names(ARCH.spec)}
            raw_bytes += sum(t.numel() * 4 for t in tensors.values())
            arrays.append([t.numpy() for t in tensors.values()])
            bodies.append(
                (
                    token,
                    save(tensors, {"num_samples": "600", "labels": json.dumps(list(range(10)))}),
                )
            )
        memory_before = rss_mb()
        start = time.perf_counter()
        for token, body in bodies:
            reply = client.post(
                "/v1/rounds/1/update", data=body, headers={"Authorization": f"Bearer {token}"}
            )
            assert reply.status_code == 200, reply.json
        elapsed = time.perf_counter() - start
        memory_after = rss_mb()
        state = client.get("/v1/rounds").json["rounds"][0]["state"]
        assert state == "finished", state

    # numpy lower bound: add every uploaded element into a float64 accumulator of its shape.
    start = time.perf_counter()
    sums: dict[tuple, np.ndarray] = {}
    for tensors in arrays:
        for array in tensors:
            key = array.shape
            if key not in sums:
                sums[key] = np.zeros(key, np.float64)
            sums[key] += array
    numpy_seconds = time.perf_counter() - start
    return {
        "uploads": k,
        "uploaded_megabytes": raw_bytes / 1e6,
        "seconds": elapsed,
        "uploads_per_second": k / elapsed,
        "aggregation_megabytes_per_second": raw_bytes / 1e6 / elapsed,
        "numpy_sum_megabytes_per_second": raw_bytes / 1e6 / numpy_seconds,
        "ratio_to_numpy_bound": (raw_bytes / elapsed) / (raw_bytes / numpy_seconds),
        "rss_mb_before_uploads": memory_before,
        "rss_mb_after_uploads": memory_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", default="10,100")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "coordinator.json"
    )
    args = parser.parse_args()
    results = {"runs": [run(int(k)) for k in args.ks.split(",")]}
    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
