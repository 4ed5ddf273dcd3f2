"""Reproduce the paper's Table 1 (HeteroFL, ICLR 2021: MNIST) side by side with our runs.

The paper's MNIST protocol (Table 6): the CNN with hidden sizes [64, 128, 256,
512], 100 clients, fraction 0.1, E = 5, B = 10, SGD lr 0.01 (momentum 0.9,
weight decay 5e-4), x0.1 after round 100 (IID, 200 rounds) or 200 (non-IID,
400 rounds), Dynamic levels, sBN statistics from all clients every round,
masked cross-entropy; balanced non-IID shards of two labels per client. Rows
a, a-e, a-b-c-d-e and e, IID and non-IID, and a-b-c-d-e non-IID with FedRolex's
rolling sub-models against HeteroFL's static ones.

``--rounds N`` runs the first N rounds of the protocol (the schedule is the
paper's, so a short run is the start of the full one); without it, the full
protocol (``--accelerator cuda`` on a GPU machine). Every run keeps a journal
under ``--work``: running the script again resumes each run where it stopped,
and a larger ``--rounds`` extends finished runs. Writes
``bench/results/table1.md``, ``table1.json`` and the learning curves
``table1_iid.png``, ``table1_non_iid.png``.

    .venv/bin/python bench/reproduce_table1.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from heterofl_edge.data import load_mnist
from heterofl_edge.report import atomic_write_bytes, write_json, write_learning_curve
from heterofl_edge.sessions import Accelerator
from heterofl_edge.simulation import (
    Execution,
    SimulationConfig,
    SimulationResult,
    Split,
    Submodel,
    run_simulation,
)

RESULTS = Path(__file__).parent / "results"

# Paper, Table 1 (MNIST): IID accuracy, non-IID local and global accuracy, in %.
PAPER = {
    ("a", Split.iid): {"global": 99.53},
    ("a-e", Split.iid): {"global": 99.46},
    ("a-b-c-d-e", Split.iid): {"global": 99.46},
    ("e", Split.iid): {"global": 98.66},
    ("a", Split.non_iid): {"local": 99.85, "global": 98.92},
    ("a-e", Split.non_iid): {"local": 99.89, "global": 98.96},
    ("a-b-c-d-e", Split.non_iid): {"local": 99.85, "global": 98.29},
    ("e", Split.non_iid): {"local": 99.07, "global": 92.84},
}


@dataclass(frozen=True)
class Run:
    mode: str
    split: Split
    submodel: Submodel = Submodel.static

    @property
    def name(self) -> str:
        suffix = "" if self.submodel is Submodel.static else f"-{self.submodel.value}"
        return f"{self.mode}-{self.split.value}{suffix}"


RUNS = [
    Run(mode, split)
    for split in (Split.iid, Split.non_iid)
    for mode in ("a", "a-e", "a-b-c-d-e", "e")
] + [Run("a-b-c-d-e", Split.non_iid, Submodel.rolling)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=None, help="first N rounds [paper: 200 / 400]"
    )
    parser.add_argument("--accelerator", type=Accelerator, default=Accelerator.auto)
    parser.add_argument("--workers", type=int, default=None, help="sessions at once [all cores]")
    parser.add_argument("--runs", default=None, help="comma-separated run names [all]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs") / "table1", help="journals")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    data = load_mnist(os.environ.get("HETEROFL_DATA_DIR"))
    wanted = set(args.runs.split(",")) if args.runs else None
    execution = Execution(workers=args.workers, accelerator=args.accelerator)
    results: dict[str, dict[str, object]] = {}
    for run in RUNS:
        if wanted is not None and run.name not in wanted:
            continue
        config = SimulationConfig(
            mode=run.mode,
            split=run.split,
            rounds=args.rounds,
            seed=args.seed,
            submodel=run.submodel,
        )
        start = time.perf_counter()

        def report(record, run=run, total=config.total_rounds):  # type: ignore[no-untyped-def]
            local = (
                "" if record.local_accuracy is None else f" local {100 * record.local_accuracy:.2f}"
            )
            print(
                f"{run.name} round {record.round}/{total}: "
                f"global {100 * record.global_accuracy:.2f}{local} ({record.round_seconds:.0f} s)",
                flush=True,
            )

        result = run_simulation(
            config,
            data,
            on_round=report,
            execution=execution,
            journal_dir=args.work / run.name,
            resume=True,
        )
        results[run.name] = summarise(run, result, time.perf_counter() - start)
    payload = {
        "protocol": "paper MNIST (Table 6): 100 clients, fraction 0.1, E 5, B 10, SGD lr 0.01 "
        "momentum 0.9 weight decay 5e-4, lr x0.1 after round 100 (IID) / 200 (non-IID), Dynamic "
        "levels, sBN statistics from all clients every round",
        "rounds_requested": args.rounds,
        "machine": {
            "cpu_count": os.cpu_count(),
            "device": "cuda"
            if execution.accelerator is not Accelerator.cpu and torch.cuda.is_available()
            else "cpu",
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "runs": results,
    }
    write_json(args.out / "table1.json", payload)
    atomic_write_bytes(args.out / "table1.md", markdown(results).encode())
    for split in (Split.iid, Split.non_iid):
        curves = {}
        for name, entry in results.items():
            if entry["split"] == split.value:
                curves[f"{name} global"] = entry["curve_global"]
                if split is Split.non_iid:
                    curves[f"{name} local"] = entry["curve_local"]
        if curves:
            write_learning_curve(
                args.out / f"table1_{split.value.replace('-', '_')}.png",
                f"HeteroFL MNIST conv, {split.value}",
                curves,  # type: ignore[arg-type]
            )
    print(markdown(results))


def summarise(run: Run, result: SimulationResult, wall: float) -> dict[str, object]:
    last = result.rounds[-1]
    paper = PAPER[(run.mode, run.split)]
    ours = {"global": 100 * last.global_accuracy}
    if last.local_accuracy is not None:
        ours["local"] = 100 * last.local_accuracy
    return {
        "mode": run.mode,
        "split": run.split.value,
        "submodel": run.submodel.value,
        "rounds": last.round,
        "protocol_rounds": result.config.total_rounds if result.config.rounds is None else None,
        "ours": ours,
        "paper": paper,
        "difference_points": {k: ours[k] - paper[k] for k in paper if k in ours},
        "round_seconds_mean": sum(r.round_seconds for r in result.rounds) / len(result.rounds),
        "wall_seconds_this_call": wall,
        "curve_global": [(0, result.initial_accuracy)]
        + [(r.round, r.global_accuracy) for r in result.rounds],
        "curve_local": [(r.round, r.local_accuracy or 0.0) for r in result.rounds],
    }


def markdown(results: dict[str, dict[str, object]]) -> str:
    lines = [
        "| mode | split | sub-models | rounds | global: ours | paper | diff (points) "
        "| local: ours | paper | diff (points) | s / round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in results.values():
        ours, paper, diff = entry["ours"], entry["paper"], entry["difference_points"]
        assert isinstance(ours, dict) and isinstance(paper, dict) and isinstance(diff, dict)

        def cell(kind: str, ours=ours, paper=paper, diff=diff) -> str:  # type: ignore[no-untyped-def]
            if kind not in paper:
                return "| | | "
            return f"| {ours[kind]:.2f} | {paper[kind]:.2f} | {diff[kind]:+.2f} "

        lines.append(
            f"| {entry['mode']} | {entry['split']} | {entry['submodel']} | {entry['rounds']} "
            + cell("global")
            + cell("local")
            + f"| {entry['round_seconds_mean']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
