"""Benchmark: a HeteroFL round on the Flower-baseline protocol, --workers 1 against 2, eager limit.

Protocol (Flower's HeteroFL baseline, as the peer was measured on this machine):
MNIST conv, Dynamic a-e, IID, 100 clients, 10 per round, E = 5, B = 10, SGD lr
0.01, sBN statistics from all 60,000 training images after every round,
evaluation on the 10,000 test images. The same rounds run with ``--workers 2``
and ``--workers 1`` (bit-identical models, so the same work), alternating.

Also measured in this process: eager training throughput (``train_local``,
one thread, levels a and e), the physical limit a round's training phase is
compared with, and the cost per image of the sBN statistics pass (the
previous implementation with hooks, the current one, batches of 10 and 500).

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

from heterofl_edge.bn_stats import ChannelMoments, collect_moments, combine_moments
from heterofl_edge.data import load_mnist
from heterofl_edge.levels import parse_rate
from heterofl_edge.loss import label_mask
from heterofl_edge.models import Scaler, StaticBatchNorm2d, build_model
from heterofl_edge.report import write_json
from heterofl_edge.sessions import session_threads
from heterofl_edge.simulation import Execution, SimulationConfig, run_simulation
from heterofl_edge.training import LocalTrainingConfig, train_local

PEER_ROUND_SECONDS = 67.0  # Flower 1.9 HeteroFL baseline on Ray, this machine, mean of 8 rounds
OLD_ROUND_SECONDS = 110.0  # ours before this change, same protocol and machine


def eager_samples_per_second(images: torch.Tensor, labels: torch.Tensor, level: str) -> float:
    """One thread, one local session of 600 examples, one epoch, as a client trains."""
    torch.manual_seed(0)
    model = build_model("conv", parse_rate(level))
    config = LocalTrainingConfig(epochs=1)
    with session_threads(1):
        train_local(model, images[:100], labels[:100], 0.01, config, label_mask(range(10), 10))
        start = time.perf_counter()
        result = train_local(model, images, labels, 0.01, config, label_mask(range(10), 10))
        return result.num_examples / (time.perf_counter() - start)


@torch.no_grad()
def hooks_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """The previous statistics pass: forward hooks that transposed and copied to float64."""
    found: list[dict[str, ChannelMoments]] = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(module, inputs, output):  # type: ignore[no-untyped-def]
            x = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1).double()
            found.append(
                {
                    name: ChannelMoments(
                        x.shape[1], x.mean(1).float(), x.var(1, unbiased=False).float()
                    )
                }
            )

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, StaticBatchNorm2d)
    ]
    model.train()
    for m in model.modules():
        if isinstance(m, Scaler):
            m.eval()
    for batch in batches:
        model(batch)
    for handle in handles:
        handle.remove()
    combine_moments(found)


def statistics_costs(images: torch.Tensor) -> dict[str, float]:
    """Milliseconds per image of the level-a statistics pass, one thread, best of 2."""
    cl = torch.channels_last
    costs: dict[str, float] = {}
    with session_threads(1):
        for name, fmt, size, run in (
            ("hooks, batches of 500 (previous)", torch.contiguous_format, 500, "hooks"),
            (
                "kernel moments, batches of 500 (now: exact, moments in double)",
                torch.contiguous_format,
                500,
                "new",
            ),
            ("kernel moments, channels-last, batches of 500 (float32 moments)", cl, 500, "new"),
            ("kernel moments, channels-last, batches of 10", cl, 10, "new"),
        ):
            model = build_model("conv", 1.0)
            model.to(memory_format=fmt)
            batches = [
                images[i : i + size].contiguous(memory_format=fmt)
                for i in range(0, len(images), size)
            ]
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                if run == "hooks":
                    hooks_pass(model, batches)
                else:
                    collect_moments(model, batches)
                best = min(best, time.perf_counter() - start)
            costs[name] = 1e3 * best / len(images)
            print(f"statistics pass, {name}: {costs[name]:.3f} ms per image", flush=True)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="2,1", help="worker counts, run alternately")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "simulate.json"
    )
    args = parser.parse_args()
    data = load_mnist(os.environ.get("HETEROFL_DATA_DIR"))
    sample = data.train_images[:600]
    eager = {
        lvl: eager_samples_per_second(sample, data.train_labels[:600], lvl) for lvl in ("a", "e")
    }
    print(
        f"eager training, one thread: {eager['a']:.0f} samples/s at a, {eager['e']:.0f} at e",
        flush=True,
    )
    stats = statistics_costs(data.train_images[:2000])
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
        ideal = [
            sum(
                count * 600 * config.local_training.epochs / eager[level]
                for level, count in r.levels.items()
            )
            / workers
            for r in rounds
        ]
        runs[str(workers)] = {
            "round_seconds": [r.round_seconds for r in rounds],
            "seconds": [r.seconds for r in rounds],
            "levels": [r.levels for r in rounds],
            "accuracy": [r.global_accuracy for r in rounds],
            "train_samples_per_second": [r.samples_per_second for r in rounds],
            "eager_limit_train_seconds": ideal,
            "fraction_of_eager_limit": [
                i / r.seconds["training"] for i, r in zip(ideal, rounds, strict=True)
            ],
            "wall_seconds_with_start_up": wall,
            "state_sums": [float(v.double().sum()) for v in result.global_state.values()][:3],
        }
    summary: dict[str, object] = {}
    for workers, run in runs.items():
        mean_round = float(np.mean(run["round_seconds"]))  # type: ignore[arg-type]
        summary[f"workers_{workers}"] = {
            "mean_round_seconds": mean_round,
            "over_peer": mean_round / PEER_ROUND_SECONDS,
            "over_previous": mean_round / OLD_ROUND_SECONDS,
            "fraction_of_eager_limit_mean": float(np.mean(run["fraction_of_eager_limit"])),  # type: ignore[arg-type]
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
        "sBN statistics from all 60,000 training images every round, evaluation on 10,000",
        "peer_round_seconds": PEER_ROUND_SECONDS,
        "previous_round_seconds": OLD_ROUND_SECONDS,
        "eager_samples_per_second_one_thread": eager,
        "statistics_ms_per_image_level_a_one_thread": stats,
        "runs": runs,
        "summary": summary,
    }
    write_json(args.out, results)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
