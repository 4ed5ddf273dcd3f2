"""Benchmark: `simulate` on MNIST for modes e and a-e, the paper's settings, 10 rounds.

Writes bench/results/simulate.json with, per mode, the accuracy per round, wall
time, training samples per second and the ratio of a-e's throughput to e's
(the baseline measured in the same run).

    make bench        (or: .venv/bin/python bench/bench_simulate.py --rounds 10)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from heterofl_edge.data import load_mnist
from heterofl_edge.report import write_json
from heterofl_edge.simulation import SimulationConfig, run_simulation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--modes", default="e,a-e")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "simulate.json"
    )
    args = parser.parse_args()
    data = load_mnist(os.environ.get("HETEROFL_DATA_DIR"))
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": "paper MNIST: 100 clients, fraction 0.1, E=5, B=10, lr 0.01, iid, "
        "sBN statistics from all clients every round",
        "runs": {},
    }
    for mode in args.modes.split(","):
        config = SimulationConfig(mode=mode, rounds=args.rounds, seed=0)
        start = time.perf_counter()

        def report(record, mode=mode):  # type: ignore[no-untyped-def]
            print(
                f"{mode} round {record.round}: acc {record.global_accuracy:.4f} "
                f"({record.round_seconds:.1f} s)",
                flush=True,
            )

        result = run_simulation(config, data, on_round=report)
        wall = time.perf_counter() - start
        train_seconds = sum(r.train_seconds for r in result.rounds)
        samples = sum(r.train_samples for r in result.rounds)
        results["runs"][mode] = {
            "initial_accuracy": result.initial_accuracy,
            "accuracy_per_round": [r.global_accuracy for r in result.rounds],
            "final_accuracy": result.rounds[-1].global_accuracy,
            "wall_seconds": wall,
            "train_seconds": train_seconds,
            "train_samples": samples,
            "train_samples_per_second": samples / train_seconds,
            "levels_per_round": [r.levels for r in result.rounds],
        }
        print(
            json.dumps({mode: results["runs"][mode]["final_accuracy"], "wall_s": wall}), flush=True
        )
    runs = results["runs"]
    if "e" in runs and "a-e" in runs:
        results["ratios"] = {
            "a-e_over_e_samples_per_second": runs["a-e"]["train_samples_per_second"]
            / runs["e"]["train_samples_per_second"],
            "a-e_over_e_wall": runs["a-e"]["wall_seconds"] / runs["e"]["wall_seconds"],
        }
    write_json(args.out, results)
    print(json.dumps(results.get("ratios", {}), indent=2))


if __name__ == "__main__":
    main()
