"""Benchmark: global accuracy against epsilon for client-level DP on MNIST (conv, a-e, IID).

The paper's MNIST protocol (100 clients, 10 a round, E = 5, B = 10, lr 0.01),
20 rounds without DP and with three noise multipliers at one clip norm, the
same seed throughout (paired: the same clients, levels and batches every
round). Per run: global accuracy and epsilon (at delta 1e-5, Google's
dp-accounting, fixed-size sampling without replacement) after every round.
To fit the 2-core machine: sBN statistics from the round's clients
(``--statistics round``; the release is accounted) and 2,000 test images.

    .venv/bin/python bench/bench_dp.py                       # about 40 minutes here
    .venv/bin/python bench/bench_dp.py --rounds 2 --noise 1  # a quick look
    .venv/bin/python bench/bench_dp.py --baseline-from bench/results/compression.json
        # the run without DP from bench_compression's fp32 run (same protocol and seed)

Writes bench/results/dp.json and dp.png (accuracy per round, and final accuracy
against epsilon).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from heterofl_edge.data import load_mnist
from heterofl_edge.engine import StatisticsClients
from heterofl_edge.report import write_json
from heterofl_edge.simulation import Execution, RoundRecord, SimulationConfig, run_simulation

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
RESULTS = Path(__file__).resolve().parent / "results"


def run(noise: float | None, clip: float, rounds: int, data: Any, workers: int) -> dict[str, Any]:
    config = SimulationConfig(
        mode="a-e",
        rounds=rounds,
        statistics=StatisticsClients.round,
        test_examples=2000,
        seed=0,
        dp_clip=None if noise is None else clip,
        dp_noise_multiplier=noise,
    )
    used = {
        "model": config.model,
        "data": config.data_name,
        "mode": config.mode,
        "split": config.split.value,
        "num_clients": config.num_clients,
        "fraction": config.fraction,
        "local_epochs": config.local_training.epochs,
        "batch_size": config.local_training.batch_size,
        "lr": config.learning_rate,
        "statistics": config.statistics.value,
        "test_examples": config.test_examples,
        "seed": config.seed,
    }
    assert used == PROTOCOL, used  # the protocol a baseline from elsewhere is checked against
    curve: list[dict[str, Any]] = []

    def record(entry: RoundRecord) -> None:
        epsilon = None if entry.privacy is None else entry.privacy["epsilon"]
        curve.append({"round": entry.round, "accuracy": entry.global_accuracy, "epsilon": epsilon})
        shown = "no DP" if noise is None else f"z {noise:g}"
        eps = "" if epsilon is None else f", epsilon {epsilon:.4g}"
        print(f"{shown} round {entry.round}: accuracy {entry.global_accuracy:.4f}{eps}", flush=True)

    start = time.perf_counter()
    result = run_simulation(config, data, on_round=record, execution=Execution(workers=workers))
    return {
        "noise_multiplier": noise,
        "clip": None if noise is None else clip,
        "rounds": curve,
        "final_accuracy": result.rounds[-1].global_accuracy,
        "final_epsilon": curve[-1]["epsilon"],
        "seconds": time.perf_counter() - start,
    }


# The settings ``run`` uses, as bench_compression.py records its protocol.
PROTOCOL = {
    "model": "conv",
    "data": "mnist",
    "mode": "a-e",
    "split": "iid",
    "num_clients": 100,
    "fraction": 0.1,
    "local_epochs": 5,
    "batch_size": 10,
    "lr": 0.01,
    "statistics": "round",
    "test_examples": 2000,
    "seed": 0,
}


def baseline_from(path: Path, rounds: int) -> dict[str, Any]:
    """The run without DP, read from ``bench_compression.py``'s fp32 run of the same protocol.

    A simulation with a fixed seed is deterministic, so that run is this one's
    baseline (its first rounds were checked equal here, 0.9560 and 0.9710): the
    protocol it recorded must match ``PROTOCOL`` and ``rounds``, or this stops.
    """
    recorded = json.loads(path.read_text())["conv"]
    protocol = recorded["protocol"]
    differ = {
        k: (protocol.get(k), v)
        for k, v in {**PROTOCOL, "rounds": rounds}.items()
        if protocol.get(k) != v
    }
    if differ:
        raise SystemExit(f"{path}: its protocol differs from this benchmark's: {differ}")
    fp32 = recorded["runs"]["fp32"]
    curve = [
        {"round": number, "accuracy": accuracy, "epsilon": None}
        for number, accuracy in enumerate(fp32["per_round"], start=1)
    ]
    return {
        "noise_multiplier": None,
        "clip": None,
        "rounds": curve,
        "final_accuracy": curve[-1]["accuracy"],
        "final_epsilon": None,
        "seconds": fp32["wall_seconds"],
        "from": f"{path.name}: bench_compression.py's fp32 run, the same protocol and seed",
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for entry in runs:
        label = (
            "no DP" if entry["noise_multiplier"] is None else f"z = {entry['noise_multiplier']:g}"
        )
        left.plot(
            [r["round"] for r in entry["rounds"]],
            [100 * r["accuracy"] for r in entry["rounds"]],
            marker="o",
            label=label,
        )
    left.set_xlabel("round")
    left.set_ylabel("global accuracy (%)")
    left.set_title("MNIST conv a-e, 100 clients, 10 a round")
    left.legend()
    private = [e for e in runs if e["noise_multiplier"] is not None]
    right.semilogx(
        [e["final_epsilon"] for e in private],
        [100 * e["final_accuracy"] for e in private],
        marker="o",
    )
    for entry in private:
        right.annotate(
            f"z = {entry['noise_multiplier']:g}",
            (entry["final_epsilon"], 100 * entry["final_accuracy"]),
        )
    baseline = next((e for e in runs if e["noise_multiplier"] is None), None)
    if baseline is not None:
        right.axhline(100 * baseline["final_accuracy"], linestyle="--", color="grey", label="no DP")
        right.legend()
    right.set_xlabel("epsilon at delta 1e-5 after the last round (log)")
    right.set_ylabel("global accuracy (%)")
    right.set_title("accuracy against privacy spent")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("HETEROFL_DATA_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clip", type=float, default=3.0)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without DP")
    parser.add_argument(
        "--baseline-from",
        type=Path,
        help="take the run without DP from bench_compression.py's results (its fp32 run, "
        "checked to be this protocol) instead of running it again",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "dp.json")
    args = parser.parse_args()
    data = load_mnist(args.data_dir)
    noises: list[float | None] = ([] if args.no_baseline else [None]) + list(args.noise)
    runs: list[dict[str, Any]] = []
    if args.baseline_from is not None:
        runs.append(baseline_from(args.baseline_from, args.rounds))
        noises = [n for n in noises if n is not None]
    for noise in noises:  # the results so far are written after each run
        runs.append(run(noise, args.clip, args.rounds, data, args.workers))
        write_json(
            args.out,
            {
                "protocol": (
                    "MNIST conv mode a-e IID, 100 clients, fraction 0.1, E 5, B 10, lr 0.01, "
                    f"seed 0, {args.rounds} rounds, statistics round, 2000 test images; DP: "
                    f"clip {args.clip}, server placement, delta 1e-5, RDP accountant with "
                    "fixed-size sampling without replacement (replace-one adjacency)"
                ),
                "machine": {
                    "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(),
                },
                "complete": len(runs) == len(noises) + (args.baseline_from is not None),
                "runs": runs,
            },
        )
    plot(runs, args.out.with_suffix(".png"))
    for entry in runs:
        eps = entry["final_epsilon"]
        shown = "no DP" if entry["noise_multiplier"] is None else f"z {entry['noise_multiplier']:g}"
        spent = "-" if eps is None else f"{eps:.4g}"
        print(f"{shown}: accuracy {entry['final_accuracy']:.4f}, epsilon {spent}")
    assert all(math.isfinite(e["final_accuracy"]) for e in runs)


if __name__ == "__main__":
    main()
