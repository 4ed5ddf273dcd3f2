"""The least time a round of Flower's HeteroFL protocol can take on this machine.

Protocol (as ``bench_simulate.py``): MNIST conv, Dynamic a-e, 10 clients per
round with 600 examples each, E = 5, B = 10, then sBN statistics from all
60,000 training images and evaluation on the 10,000 test images at level a.
The issue's target is a round at most 0.5x the peer's 67 s, with exact
statistics.

A round needs, at the least, every client's local training, the statistics
pass (60,000 level-a forwards in training-mode batch norm, in the protocol's
batches of 500, with exact moments) and the evaluation (10,000 level-a
evaluation-mode forwards, any batch). This measures, in one process and one
thread, the fastest eager PyTorch formulation found of each (training and
statistics: default and channels-last memory; evaluation: both formats,
batches of 10 to 1,000) and assumes perfect scaling to every core. The floor
of each phase is that work divided by the cores; a round can be faster only
with less work or faster kernels. ``bench_simulate.py`` measures the same
floors in its own run and compares each phase of real rounds with them.

    .venv/bin/python bench/bench_round_floor.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
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
TARGET_OVER_PEER = 0.5
CLIENTS_PER_ROUND = 10
EXAMPLES_PER_CLIENT = 600
EPOCHS = 5
STATISTICS_IMAGES = 60_000  # the statistics pass over the training set
EVALUATION_IMAGES = 10_000
STATISTICS_BATCH = 500  # the protocol's: the batches define the statistics
FORMATS = (("default", torch.contiguous_format), ("channels_last", torch.channels_last))

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def training_seconds_per_sample(
    images: torch.Tensor, labels: torch.Tensor, level: str
) -> dict[str, float]:
    """One thread, one epoch of 600 examples at batch 10, per memory format."""
    found = {}
    for name, fmt in FORMATS:
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


def _per_image(run: Callable[[], object], images: int, threads: int) -> float:
    """Seconds per image of ``run()`` over ``images`` images, best of 2 after a warm-up."""
    best = float("inf")
    with session_threads(threads), torch.inference_mode():
        run()
        for _ in range(2):
            start = time.perf_counter()
            run()
            best = min(best, (time.perf_counter() - start) / images)
    return best


def _batches(images: torch.Tensor, size: int, fmt: torch.memory_format) -> list[torch.Tensor]:
    return [images[i : i + size].contiguous(memory_format=fmt) for i in range(0, len(images), size)]


def statistics_seconds_per_image(images: torch.Tensor, threads: int = 1) -> dict[str, float]:
    """Level a, the statistics pass in the protocol's batches of 500, per memory format.

    Both layouts give exact moments (``collect_moments``): in the default one the
    kernel accumulates them in double; in channels-last the sBN layer takes them.
    """
    found = {}
    for name, fmt in FORMATS:
        model = build_model("conv", 1.0).to(memory_format=fmt)  # type: ignore[call-overload]
        batches = _batches(images, STATISTICS_BATCH, fmt)
        key = f"statistics, {name}, batches of {STATISTICS_BATCH}"
        found[key] = _per_image(
            lambda m=model, b=batches: collect_moments(m, b), len(images), threads
        )
        print(f"{threads} thread(s), {key}: {1e3 * found[key]:.3f} ms per image", flush=True)
    return found


def evaluation_seconds_per_image(images: torch.Tensor, threads: int = 1) -> dict[str, float]:
    """Level a, evaluation-mode forwards, per memory format and batch size (any may serve)."""
    found = {}
    for name, fmt in FORMATS:
        model = build_model("conv", 1.0).to(memory_format=fmt).eval()  # type: ignore[call-overload]
        for size in (10, 100, 500, 1000):
            batches = _batches(images, size, fmt)
            key = f"evaluation, {name}, batches of {size}"
            found[key] = _per_image(
                lambda m=model, b=batches: [m(x) for x in b], len(images), threads
            )
            print(f"{threads} thread(s), {key}: {1e3 * found[key]:.3f} ms per image", flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000, help="images timed per forward")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "round_floor.json"
    )
    args = parser.parse_args()
    data = load_mnist(os.environ.get("HETEROFL_DATA_DIR") or SHARED_MNIST)
    cores = os.cpu_count() or 1
    sample, labels = (
        data.train_images[:EXAMPLES_PER_CLIENT],
        data.train_labels[:EXAMPLES_PER_CLIENT],
    )
    training = {level: training_seconds_per_sample(sample, labels, level) for level in ("a", "e")}
    statistics = statistics_seconds_per_image(data.train_images[: args.images])
    evaluation = evaluation_seconds_per_image(data.train_images[: args.images])

    fastest_train = {level: min(t.values()) for level, t in training.items()}
    samples_per_level = CLIENTS_PER_ROUND // 2 * EXAMPLES_PER_CLIENT * EPOCHS  # a-e: half each
    floors = {
        "training": sum(samples_per_level * s for s in fastest_train.values()) / cores,
        "statistics": STATISTICS_IMAGES * min(statistics.values()) / cores,
        "evaluation": EVALUATION_IMAGES * min(evaluation.values()) / cores,
    }
    round_floor = sum(floors.values())
    summary = {
        "cores": cores,
        "floor_seconds": floors,
        "round_floor_seconds": round_floor,
        "round_floor_over_peer": round_floor / PEER_ROUND_SECONDS,
        "target_round_seconds": TARGET_OVER_PEER * PEER_ROUND_SECONDS,
    }
    results = {
        "machine": {
            "cpu_count": cores,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
        },
        "protocol": "MNIST conv, Dynamic a-e (5 clients at a, 5 at e per round on average), "
        f"{EXAMPLES_PER_CLIENT} examples per client, E {EPOCHS}, B 10; sBN statistics over "
        f"{STATISTICS_IMAGES:,} training images in batches of {STATISTICS_BATCH}, evaluation "
        f"on {EVALUATION_IMAGES:,}; fastest one-thread figure of each, scaled perfectly to "
        "every core",
        "training_seconds_per_sample_one_thread": training,
        "statistics_seconds_per_image_level_a_one_thread": statistics,
        "evaluation_seconds_per_image_level_a_one_thread": evaluation,
        "summary": summary,
    }
    write_json(args.out, results)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
