"""The least time a round of Flower's HeteroFL protocol can take on this machine.

Protocol (as ``bench_simulate.py``): MNIST conv, Dynamic a-e, 10 clients per
round with 600 examples each, E = 5, B = 10, then sBN statistics from all
60,000 training images and evaluation on the 10,000 test images at level a.
The issue's target is a round at most 0.5x the peer's 67 s, with exact
statistics.

A round needs, at the least, every client's local training and 70,000 level-a
forward passes. This measures, in one process and one thread, the fastest
eager PyTorch formulation found of each (training: default and channels-last
memory; forwards: both formats, batches of 10 to 1,000, the statistics
pass's own kernel and a plain evaluation forward) and assumes perfect scaling
to every core. The floor is that work divided by the cores; a round can be
faster only with less work or faster kernels.

    .venv/bin/python bench/bench_round_floor.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from heterofl_edge.bn_stats import collect_moments
from heterofl_edge.data import load_mnist
from heterofl_edge.levels import parse_rate
from heterofl_edge.loss import label_mask
from heterofl_edge.models import build_model
from heterofl_edge.report import write_json
from heterofl_edge.sessions import session_threads
from heterofl_edge.training import LocalTrainingConfig, train_local

PEER_ROUND_SECONDS = 67.0  # Flower 1.9 HeteroFL baseline, this machine (the figure)
PEER_STATISTICS_AND_EVALUATION_SECONDS = 44.0  # the same measurement's share for both passes
TARGET_OVER_PEER = 0.5
CLIENTS_PER_ROUND = 10
EXAMPLES_PER_CLIENT = 600
EPOCHS = 5
FORWARDS_PER_ROUND = 60_000 + 10_000  # statistics over the training set, then evaluation


def training_seconds_per_sample(
    images: torch.Tensor, labels: torch.Tensor, level: str
) -> dict[str, float]:
    """One thread, one epoch of 600 examples at batch 10, per memory format."""
    found = {}
    for name, fmt in (("default", torch.contiguous_format), ("channels_last", torch.channels_last)):
        torch.manual_seed(0)
        model = build_model("conv", parse_rate(level)).to(memory_format=fmt)  # type: ignore[call-overload]
        x = images.contiguous(memory_format=fmt)
        config = LocalTrainingConfig(epochs=1)
        mask = label_mask(range(10), 10)
        best = float("inf")
        with session_threads(1):
            train_local(model, x[:100], labels[:100], 0.01, config, mask)  # warm-up
            for _ in range(2):
                start = time.perf_counter()
                result = train_local(model, x, labels, 0.01, config, mask)
                best = min(best, (time.perf_counter() - start) / result.num_examples)
        found[name] = best
        print(f"training {level} {name}: {1e3 * best:.3f} ms per sample", flush=True)
    return found


def forward_seconds_per_image(images: torch.Tensor, threads: int) -> dict[str, float]:
    """Level a: the statistics pass and a plain evaluation forward, per format and batch."""
    found = {}
    for fmt_name, fmt in (
        ("default", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        model = build_model("conv", 1.0).to(memory_format=fmt)  # type: ignore[call-overload]
        for size in (10, 100, 500, 1000):
            batches = [
                images[i : i + size].contiguous(memory_format=fmt)
                for i in range(0, len(images), size)
            ]
            for kind in ("statistics", "evaluation"):
                best = float("inf")
                with session_threads(threads), torch.inference_mode():
                    for _ in range(2):
                        start = time.perf_counter()
                        if kind == "statistics":
                            collect_moments(model, batches)
                        else:
                            model.eval()
                            for batch in batches:
                                model(batch)
                        best = min(best, (time.perf_counter() - start) / len(images))
                name = f"{kind}, {fmt_name}, batches of {size}"
                found[name] = best
                print(f"{threads} thread(s), {name}: {1e3 * best:.3f} ms per image", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000, help="images timed per forward")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "round_floor.json"
    )
    args = parser.parse_args()
    data = load_mnist(os.environ.get("HETEROFL_DATA_DIR"))
    cores = os.cpu_count() or 1
    sample, labels = (
        data.train_images[:EXAMPLES_PER_CLIENT],
        data.train_labels[:EXAMPLES_PER_CLIENT],
    )
    training = {level: training_seconds_per_sample(sample, labels, level) for level in ("a", "e")}
    forwards_one = forward_seconds_per_image(data.train_images[: args.images], 1)
    forwards_all = forward_seconds_per_image(data.train_images[: args.images], cores)

    fastest_train = {level: min(t.values()) for level, t in training.items()}
    fastest_forward = min(forwards_one.values())
    samples_per_level = CLIENTS_PER_ROUND // 2 * EXAMPLES_PER_CLIENT * EPOCHS  # a-e: half each
    training_floor = sum(samples_per_level * s for s in fastest_train.values()) / cores
    forward_floor = FORWARDS_PER_ROUND * fastest_forward / cores
    target = TARGET_OVER_PEER * PEER_ROUND_SECONDS
    summary = {
        "cores": cores,
        "training_floor_seconds": training_floor,
        "forwards_floor_seconds": forward_floor,
        "round_floor_seconds": training_floor + forward_floor,
        "round_floor_over_peer": (training_floor + forward_floor) / PEER_ROUND_SECONDS,
        "target_round_seconds": target,
        "forwards_floor_over_target": forward_floor / target,
        "forwards_floor_over_peer_statistics_and_evaluation": forward_floor
        / PEER_STATISTICS_AND_EVALUATION_SECONDS,
        "forward_speed_up_needed_if_training_took_the_peer_s_23_s": forward_floor
        / max(target - (PEER_ROUND_SECONDS - PEER_STATISTICS_AND_EVALUATION_SECONDS), 1e-9),
    }
    results = {
        "machine": {
            "cpu_count": cores,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "protocol": "MNIST conv, Dynamic a-e (5 clients at a, 5 at e per round on average), "
        f"{EXAMPLES_PER_CLIENT} examples per client, E {EPOCHS}, B 10; {FORWARDS_PER_ROUND:,} "
        "level-a forwards (statistics over 60,000 training images, evaluation on 10,000); "
        "fastest one-thread figure of each, scaled perfectly to every core",
        "training_seconds_per_sample_one_thread": training,
        "forward_seconds_per_image_level_a_one_thread": forwards_one,
        f"forward_seconds_per_image_level_a_{cores}_threads": forwards_all,
        "summary": summary,
    }
    write_json(args.out, results)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
