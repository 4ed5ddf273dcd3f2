"""Benchmark: simulated wall-clock time to 95% accuracy, synchronous rounds against FedBuff.

MNIST conv, mode a-e, IID, 100 simulated devices with 600 examples each (the
paper's split) in the demo's three tiers (1x; 3x on 50 Mbit/s; 10x on 10 Mbit/s,
dealt round-robin), each online and offline in turn (exponential spells, means
``--availability``). Sessions take what the profile policy's step-time model
says (``--step-ms`` per step at level e on a 1x device, scaled by FLOPs, plus
the transfers); a device that goes offline mid-session loses it.

* synchronous: the profile policy (each device at the largest level whose
  estimate fits half of the 600 s deadline; re-leveled after every round),
  10 devices a round among those online, stragglers miss the deadline;
* buffered (FedBuff): the same policy and 10 devices training at once; every
  10 updates, weighted by staleness (polynomial:0.5), make a new version;
  updates more than 20 versions old are refused.

Both: sBN statistics from the round's (version's) contributors, evaluation on
2,000 test images, and a run stops ``--after`` rounds past the target. To fit
the 2-core machine, local training is one epoch (E = 1, B = 10, lr 0.01)
instead of the paper's five. Then a statistics study on the buffered run's
published versions: the accuracy of the same weights with the statistics of
the version's contributors (what the run publishes), the exact pass over all
100 devices' data, the contributors' statistics refreshed only every 5
versions, and the statistics of version 1 never refreshed.

    .venv/bin/python bench/bench_async.py      # 48 min on 2 shared cores (2026-12-07)
    .venv/bin/python bench/bench_async.py --max-rounds 3 --max-versions 6 --study 2,4

Writes bench/results/async.json and async.png.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from heterofl_edge.bn_stats import apply_statistics, combine_moments
from heterofl_edge.buffered import Aggregation, parse_staleness
from heterofl_edge.data import load_mnist
from heterofl_edge.engine import StatisticsClients, Stopped
from heterofl_edge.models import StaticBatchNorm2d, get_architecture
from heterofl_edge.partition import Split
from heterofl_edge.report import write_json
from heterofl_edge.sessions import ClientArrays, StatsJob, moments_from, to_arrays
from heterofl_edge.simulated_time import SimulatedFleet, parse_availability
from heterofl_edge.simulation import Execution, RoundRecord, SimulationConfig, run_simulation
from heterofl_edge.spec import Policy
from heterofl_edge.tasks import task_for
from heterofl_edge.training import LocalTrainingConfig

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.95
STUDY_REFRESH = 5  # "every N versions" in the statistics study


def config(args: argparse.Namespace, aggregation: Aggregation) -> SimulationConfig:
    fleet = SimulatedFleet(
        step_ms=args.step_ms,
        availability=parse_availability(args.availability),
        round_seconds=args.deadline,
    )
    return SimulationConfig(
        mode="a-e",
        policy=Policy.profile,
        split=Split.iid,
        rounds=args.max_rounds if aggregation is Aggregation.sync else args.max_versions,
        fraction=0.1,
        lr=0.01,
        local=LocalTrainingConfig(epochs=args.local_epochs, batch_size=10),
        statistics=StatisticsClients.round,
        seed=args.seed,
        test_examples=2000,
        num_clients=args.clients,
        fleet=fleet,
        aggregation=aggregation,
        buffer_size=10,
        staleness=parse_staleness("polynomial:0.5"),
        server_lr=1.0,
        max_staleness=20,
    )


def run(
    args: argparse.Namespace, aggregation: Aggregation, data: Any, study: set[int]
) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """One run until ``--after`` rounds past the target; its curve and the studied models."""
    curve: list[dict[str, Any]] = []
    reached: list[int] = []
    kept: dict[int, dict[str, torch.Tensor]] = {}

    def keep(record: RoundRecord, state: dict[str, torch.Tensor]) -> None:
        if aggregation is Aggregation.buffered:  # every version's statistics, some full models
            buffers = {k: v.clone() for k, v in state.items() if "running_" in k}
            kept[record.round] = (
                {k: v.clone() for k, v in state.items()} if record.round in study else buffers
            )

    def record(entry: RoundRecord) -> None:
        assert entry.simulated_time is not None
        point = {
            "round": entry.round,
            "simulated_seconds": entry.simulated_time,
            "accuracy": entry.global_accuracy,
            "levels": entry.levels,
            "train_loss": entry.train_loss,
        }
        if entry.buffer is not None:
            point["staleness"] = entry.buffer["staleness"]
            point["refused_stale"] = entry.buffer["refused_stale"]
            point["lost"] = entry.buffer["lost"]
        curve.append(point)
        print(
            f"{aggregation.value} {entry.round}: {entry.simulated_time / 60:.1f} min simulated, "
            f"accuracy {entry.global_accuracy:.4f}, levels {entry.levels}"
            + (f", staleness {entry.buffer['staleness']}" if entry.buffer else ""),
            flush=True,
        )
        if entry.global_accuracy >= TARGET and not reached:
            reached.append(entry.round)
        last_studied = max(study, default=0) if aggregation is Aggregation.buffered else 0
        if reached and entry.round >= max(reached[0] + args.after, last_studied):
            raise Stopped  # the run ends here (run_simulation returns what it has)

    start = time.perf_counter()
    run_simulation(
        config(args, aggregation),
        data,
        on_round=record,
        execution=Execution(workers=args.workers),
        on_model=keep,
    )
    first = next((p for p in curve if p["accuracy"] >= TARGET), None)
    summary = {
        "aggregation": aggregation.value,
        "curve": curve,
        "time_to_target_seconds": None if first is None else first["simulated_seconds"],
        "rounds_to_target": None if first is None else first["round"],
        "final_accuracy": curve[-1]["accuracy"] if curve else None,
        "wall_seconds": time.perf_counter() - start,
    }
    return summary, kept


class Scorer:
    """Accuracy of a global model on the first 2,000 test images (the study's yardstick)."""

    def __init__(self, data: Any) -> None:
        self.model = get_architecture("conv").build(1.0, 1.0)
        self.x, self.y = data.test_x[:2000], data.test_y[:2000]

    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state)
        self.model.eval()
        with torch.no_grad():
            correct = sum(
                int((self.model(self.x[i : i + 500]).argmax(1) == self.y[i : i + 500]).sum())
                for i in range(0, len(self.y), 500)
            )
        return correct / len(self.y)


def statistics_study(
    args: argparse.Namespace, data: Any, kept: dict[int, dict[str, torch.Tensor]], study: set[int]
) -> list[dict[str, Any]]:
    """Each studied version's accuracy under four statistics policies (see the docstring)."""
    from heterofl_edge.sessions import run_statistics

    arch = get_architecture("conv")
    assert any(isinstance(m, StaticBatchNorm2d) for m in arch.build(1.0).modules())
    split = task_for(arch).split(data, args.clients, Split.iid, args.seed, 2, None, 2000)
    arrays = ClientArrays(data.train_x.numpy(), data.train_y.numpy())
    score = Scorer(data)
    frozen = kept.get(1)  # the statistics of version 1, never refreshed after it
    rows = []
    for version in sorted(v for v in study if v in kept and "classifier.weight" in kept[v]):
        state = kept[version]
        start = time.perf_counter()
        job = StatsJob(
            "conv",
            1.0,
            to_arrays(state),
            tuple(str(i) for i in range(args.clients)),
            tuple(split.train.indices),
        )
        reports = [moments_from(report) for _, report in run_statistics(job, arrays)]
        exact = apply_statistics(state, combine_moments(reports))
        refreshed = dict(state)  # refreshed at versions 1, 6, 11, ...
        refreshed.update(_buffers(kept[1 + STUDY_REFRESH * ((version - 1) // STUDY_REFRESH)]))
        never = dict(state)
        if frozen is not None:
            never.update(_buffers(frozen))
        row = {
            "version": version,
            "contributors_every_version": score(state),
            "exact_all_devices": score(exact),
            f"contributors_every_{STUDY_REFRESH}_versions": score(refreshed),
            "frozen_after_version_1": score(never),
            "exact_pass_seconds": time.perf_counter() - start,
        }
        print(f"statistics study: {row}", flush=True)
        rows.append(row)
    return rows


def _buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sBN statistics of a state (its running means and variances)."""
    return {k: v for k, v in state.items() if "running_" in k}


def plot(runs: list[dict[str, Any]], study: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for entry in runs:
        hours = [p["simulated_seconds"] / 3600 for p in entry["curve"]]
        left.plot(
            hours,
            [100 * p["accuracy"] for p in entry["curve"]],
            marker=".",
            label=entry["aggregation"],
        )
        if entry["time_to_target_seconds"] is not None:
            left.axvline(entry["time_to_target_seconds"] / 3600, linestyle=":", color="grey")
    left.axhline(100 * TARGET, linestyle="--", color="grey", label="95%")
    left.set_ylim(0, 100)
    left.set_xlabel("simulated wall-clock time (hours)")
    left.set_ylabel("global accuracy (%)")
    left.set_title("MNIST conv a-e, 100 devices (1x/3x/10x), churn")
    left.legend()
    if study:
        versions = [r["version"] for r in study]
        for key in (
            "exact_all_devices",
            "contributors_every_version",
            f"contributors_every_{STUDY_REFRESH}_versions",
            "frozen_after_version_1",
        ):
            right.plot(versions, [100 * r[key] for r in study], marker="o", label=key)
        right.set_xlabel("published version")
        right.set_ylabel("accuracy (%), first 2,000 test images")
        right.set_title("buffered: sBN statistics policies, same weights")
        right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("HETEROFL_DATA_DIR", DEFAULT_DATA))
    )
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--availability", default="1800,600")
    parser.add_argument("--deadline", type=float, default=600.0)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=100, help="fewer for a quick look")
    parser.add_argument("--max-rounds", type=int, default=60)
    parser.add_argument("--max-versions", type=int, default=30)
    parser.add_argument("--after", type=int, default=3, help="rounds to run past the target")
    parser.add_argument("--study", default="1,2,5,10,20,30", help="versions to study")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=["sync", "buffered"], default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "async.json")
    args = parser.parse_args()
    data = load_mnist(args.data_dir)
    study = {int(v) for v in args.study.split(",") if v.strip()}
    runs, kept = [], {}
    for aggregation in (Aggregation.sync, Aggregation.buffered):
        if args.only is not None and aggregation.value != args.only:
            continue
        summary, models = run(args, aggregation, data, study)
        runs.append(summary)
        kept.update(models)
    rows = statistics_study(args, data, kept, study) if kept else []
    times = {r["aggregation"]: r["time_to_target_seconds"] for r in runs}
    ratio = None
    if times.get("sync") and times.get("buffered"):
        ratio = times["buffered"] / times["sync"]
    report = {
        "protocol": (
            "MNIST conv mode a-e IID, 100 devices x 600 examples, tiers 1x / 3x@50 Mbit/s / "
            f"10x@10 Mbit/s, step {args.step_ms:g} ms (1x, level e), availability "
            f"{args.availability} s (mean online, offline), deadline {args.deadline:g} s, "
            f"profile policy, 10 devices per round (sync) or at once (buffered), K 10, "
            f"polynomial:0.5, max staleness 20, E {args.local_epochs}, B 10, lr 0.01, "
            f"statistics from the contributors, 2000 test images, seed {args.seed}"
        ),
        "target_accuracy": TARGET,
        "time_to_target_seconds": times,
        "buffered_over_sync": ratio,
        "target_ratio": 0.6,
        "target_met": None if ratio is None else ratio <= 0.6,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "runs": runs,
        "statistics_study": rows,
    }
    write_json(args.out, report)
    plot(runs, rows, args.out.with_suffix(".png"))
    for entry in runs:
        reach = entry["time_to_target_seconds"]
        shown = "not reached" if reach is None else f"{reach / 60:.1f} min simulated"
        print(f"{entry['aggregation']}: 95% at {shown} (round {entry['rounds_to_target']})")
    if ratio is not None:
        print(
            f"buffered / sync = {ratio:.3f} (target <= 0.6: {'met' if ratio <= 0.6 else 'missed'})"
        )
    assert all(math.isfinite(r["final_accuracy"] or 0.0) for r in runs)


if __name__ == "__main__":
    main()
