"""Benchmark: a HeteroFL round on the Flower-baseline protocol against its floor, per phase.

Protocol (Flower's HeteroFL baseline, as the peer was measured on this machine):
MNIST conv, Dynamic a-e, IID, 100 clients, 10 per round, E = 5, B = 10, SGD lr
0.01, sBN statistics from all 60,000 training images after every round (each
client's examples in batches of 500), evaluation on the 10,000 test images.

In the same run, before the rounds, the floor of each phase: the fastest eager
formulation of its work on one thread, scaled perfectly to every core
(``bench_round_floor.py``'s measurements): training, the round's clients at
their levels (default and channels-last layouts tried); statistics, 60,000
level-a forwards in training-mode batch norm in the protocol's batches of 500,
with exact moments (the default layout's double accumulation, or channels-last
with the moments taken by the sBN layer); evaluation, 10,000 evaluation-mode
forwards (batches of 10 to 1,000, both layouts). Each phase's time over its
floor is the figure ``--workers 2`` is judged by; ``--workers 2,1`` also runs
one worker (the same model bits: the same work). Training is also set against
the floor of whole sessions (a session is sequential SGD and runs on one core):
the best assignment of the round's sessions to the cores.

    .venv/bin/python bench/bench_simulate.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from bench_round_floor import (
    EXAMPLES_PER_CLIENT,
    evaluation_seconds_per_image,
    statistics_seconds_per_image,
    training_seconds_per_sample,
)

from heterofl_edge.data import load_mnist
from heterofl_edge.report import write_json
from heterofl_edge.simulation import Execution, SimulationConfig, run_simulation

PEER_ROUND_SECONDS = 67.0  # Flower 1.9 HeteroFL baseline on Ray, an earlier machine (the issue)
STATISTICS_IMAGES = 60_000
EVALUATION_IMAGES = 10_000

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def whole_sessions_floor(sessions: list[float], cores: int) -> float:
    """The least makespan of indivisible ``sessions`` on ``cores`` workers.

    Exact for two cores (the best split of the sessions into two sets); for more, the
    bound max(total / cores, the longest session), which no schedule beats.
    """
    total = sum(sessions)
    if cores != 2 or len(sessions) > 20:
        return max(total / cores, max(sessions, default=0.0))
    best = total
    for mask in range(1 << len(sessions)):
        one = sum(t for i, t in enumerate(sessions) if mask >> i & 1)
        best = min(best, max(one, total - one))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="2", help="worker counts, run in turn (e.g. 2,1)")
    parser.add_argument("--images", type=int, default=2000, help="images timed per forward")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "simulate.json"
    )
    args = parser.parse_args()
    data = load_mnist(os.environ.get("HETEROFL_DATA_DIR") or SHARED_MNIST)
    cores = os.cpu_count() or 1
    sample, labels = (
        data.train_images[:EXAMPLES_PER_CLIENT],
        data.train_labels[:EXAMPLES_PER_CLIENT],
    )
    training = {level: training_seconds_per_sample(sample, labels, level) for level in "ae"}
    statistics = statistics_seconds_per_image(data.train_images[: args.images])
    evaluation = evaluation_seconds_per_image(data.train_images[: args.images])
    per_sample = {level: min(found.values()) for level, found in training.items()}
    statistics_floor = STATISTICS_IMAGES * min(statistics.values()) / cores
    evaluation_floor = EVALUATION_IMAGES * min(evaluation.values()) / cores
    config = SimulationConfig(mode="a-e", rounds=args.rounds, seed=0)
    runs: dict[str, dict[str, object]] = {}
    for workers in (int(w) for w in args.workers.split(",")):

        def report(record, workers=workers):  # type: ignore[no-untyped-def]
            parts = ", ".join(f"{k} {v:.1f}" for k, v in record.seconds.items())
            print(
                f"workers {workers} round {record.round}: {record.round_seconds:.1f} s ({parts})",
                flush=True,
            )

        start = time.perf_counter()
        result = run_simulation(config, data, on_round=report, execution=Execution(workers=workers))
        wall = time.perf_counter() - start
        rounds = result.rounds
        session = {
            level: EXAMPLES_PER_CLIENT * config.local_training.epochs * per_sample[level]
            for level in per_sample
        }
        floors = [
            {
                "training": sum(count * session[level] for level, count in r.levels.items())
                / cores,
                "statistics": statistics_floor,
                "evaluation": evaluation_floor,
            }
            for r in rounds
        ]
        # A session is sequential SGD: it cannot be split between cores. The least training
        # time with whole sessions is the best assignment of them to the cores.
        whole = [
            whole_sessions_floor(
                [session[level] for level, count in r.levels.items() for _ in range(count)], cores
            )
            for r in rounds
        ]
        runs[str(workers)] = {
            "round_seconds": [r.round_seconds for r in rounds],
            "seconds": [r.seconds for r in rounds],
            "floor_seconds": floors,
            "training_floor_whole_sessions_seconds": whole,
            "over_floor": [
                {phase: r.seconds[phase] / floor[phase] for phase in floor}
                | {"round": r.round_seconds / sum(floor.values())}
                | {"training_whole_sessions": r.seconds["training"] / w}
                | {
                    "round_whole_sessions": r.round_seconds
                    / (w + floor["statistics"] + floor["evaluation"])
                }
                for r, floor, w in zip(rounds, floors, whole, strict=True)
            ],
            "levels": [r.levels for r in rounds],
            "accuracy": [r.global_accuracy for r in rounds],
            "wall_seconds_with_start_up": wall,
            "state_sums": [float(v.double().sum()) for v in result.global_state.values()][:3],
        }
    summary: dict[str, object] = {}
    for workers, run in runs.items():
        over = run["over_floor"]
        summary[f"workers_{workers}"] = {
            "mean_round_seconds": float(np.mean(run["round_seconds"])),  # type: ignore[arg-type]
            "worst_over_floor": {
                phase: max(o[phase] for o in over)  # type: ignore[attr-defined]
                for phase in (
                    "training",
                    "training_whole_sessions",
                    "statistics",
                    "evaluation",
                    "round",
                    "round_whole_sessions",
                )
            },
        }
    if "1" in runs and "2" in runs:
        one, two = (np.array(runs[w]["round_seconds"]) for w in ("1", "2"))
        summary["speed_up_2_over_1"] = float(one.mean() / two.mean())
        summary["same_model"] = runs["1"]["state_sums"] == runs["2"]["state_sums"]
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "protocol": "MNIST conv, Dynamic a-e, IID, 100 clients, 10 per round, E 5, B 10, lr 0.01, "
        "sBN statistics from all 60,000 training images every round (batches of 500), "
        "evaluation on 10,000",
        "training_seconds_per_sample_one_thread": training,
        "statistics_seconds_per_image_level_a_one_thread": statistics,
        "evaluation_seconds_per_image_level_a_one_thread": evaluation,
        "runs": runs,
        "summary": summary,
    }
    write_json(args.out, results)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
