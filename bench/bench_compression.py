"""Benchmark: what compressed transport saves on the wire, and what it costs in accuracy.

MNIST conv, Dynamic a-e, IID, 100 clients, 10 per round, E = 5, B = 10, lr 0.01
(the paper's settings), 20 rounds per encoding, the same seed for every encoding
(the same clients, levels and batch orders: a paired comparison). The
quantization runs in process exactly as over the network (``simulate``'s
transport encodes every download and upload with the coordinator's seeds), so
the bytes are the encoded payloads' sizes (safetensors with their metadata)
and the accuracy is what the encoding leaves. To finish on a shared 2-core
machine: sBN statistics from the round's clients (``--statistics round``) and
the global accuracy on 2,000 test images (``--test-examples 2000``), both the
same for every encoding.

Runs (download / upload): ``fp32`` / ``fp32`` (today), ``fp16`` / ``fp16``,
``bf16`` / ``bf16``, ``fp32`` / ``int8`` and ``fp32`` / ``int8`` with error
feedback, and ``fp16`` / ``int8`` with error feedback; then ``secure-int8``:
secure aggregation with int8 uploads (integers of one shared step, clip / 127,
masked in 12 bits and uploaded as uint16). Per run: bytes per
device-round (a training session's download and upload, averaged over the
sessions) over fp32's, per direction and in all, and the global accuracy
after each round.

``--transformer`` adds the second model: the transformer on WikiText-2 for 3
rounds (mode a-e, 10 clients, 2 per round, the first 2,000 training rows and
100 test rows, as ``bench_transformer.py``), fp32 and fp16 both ways.

    .venv/bin/python bench/bench_compression.py                  # conv, every run
    .venv/bin/python bench/bench_compression.py --transformer    # and the transformer

Results go to ``results/compression.json`` after every run (a run already there
with the same protocol is kept, so an interrupted benchmark continues), and the
plot to ``results/compression.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from heterofl_edge.data import get_dataset
from heterofl_edge.report import write_json
from heterofl_edge.simulation import (
    Execution,
    RoundRecord,
    SimulationConfig,
    StatisticsClients,
    run_simulation,
)
from heterofl_edge.training import LocalTrainingConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
RESULTS = Path(__file__).parent / "results"

# name: (download encoding, upload encoding, error feedback)
RUNS: dict[str, tuple[str, str, bool]] = {
    "fp32": ("fp32", "fp32", False),
    "fp16": ("fp16", "fp16", False),
    "bf16": ("bf16", "bf16", False),
    "int8-up": ("fp32", "int8", False),
    "int8-up-ef": ("fp32", "int8", True),
    "fp16-down-int8-up-ef": ("fp16", "int8", True),
    # with secure aggregation (issue 29): int8 integers at one shared step masked in
    # 8 + ceil(log2 10) = 12 bits, uploaded as uint16 (a secure fp32 upload is the masked
    # uint32 fixed point: as many bytes as fp32, bench_secagg.py)
    "secure-int8": ("fp32", "int8", False),
}
SECURE_RUNS = frozenset({"secure-int8"})
TRANSFORMER_RUNS = ("fp32", "fp16")
TARGETS = {  # the issue's: bytes over fp32's at most, accuracy at most (pp) below fp32's
    "fp16": ("total", 0.51, 0.1),
    "bf16": ("total", 0.51, 0.1),
    "int8-up": ("up", 0.27, 0.5),
    "int8-up-ef": ("up", 0.27, 0.5),
    "fp16-down-int8-up-ef": ("up", 0.27, 0.5),
}


def conv_protocol(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "conv",
        "data": "mnist",
        "mode": args.mode,
        "split": "iid",
        "num_clients": args.clients,
        "fraction": 0.1,
        "rounds": args.rounds,
        "local_epochs": 5,
        "batch_size": 10,
        "lr": 0.01,
        "statistics": "round",
        "test_examples": args.test_examples,
        "seed": args.seed,
        "workers": args.workers,
    }


def transformer_protocol() -> dict[str, Any]:
    return {
        "model": "transformer",
        "data": "wikitext2",
        "mode": "a-e",
        "num_clients": 10,
        "fraction": 0.2,
        "rounds": 3,
        "local_epochs": 1,
        "batch_size": 100,
        "lr": 0.1,
        "train_examples": 2000,
        "test_examples": 100,
        "seed": 0,
        "workers": 1,
    }


def run_one(
    protocol: dict[str, Any],
    name: str,
    download: str,
    upload: str,
    ef: bool,
    data,
    secure: bool = False,
):
    """One encoding of ``protocol``: bytes per device-round and the global metric per round."""
    config = SimulationConfig(
        model=protocol["model"],
        data=protocol["data"],
        mode=protocol["mode"],
        num_clients=protocol["num_clients"],
        fraction=protocol["fraction"],
        rounds=protocol["rounds"],
        local=LocalTrainingConfig(
            epochs=protocol["local_epochs"], batch_size=protocol["batch_size"]
        ),
        lr=protocol["lr"],
        statistics=StatisticsClients(protocol.get("statistics", "round")),
        test_examples=protocol["test_examples"],
        train_examples=protocol.get("train_examples"),
        seed=protocol["seed"],
        download_encoding=download,
        upload_encoding=upload,
        error_feedback=ef,
        secure_aggregation=secure,
    )
    metric = "perplexity" if protocol["model"] == "transformer" else "accuracy"

    def report(record: RoundRecord) -> None:
        value = record.global_perplexity if metric == "perplexity" else record.global_accuracy
        per = record.transfer
        down = sum(e["bytes"] for e in per["down"].get("train", {}).values())
        up = sum(e["bytes"] for e in per["up"].get("train", {}).values())
        print(
            f"{protocol['model']} {name} round {record.round}: {metric} {value}, "
            f"train bytes down {down} up {up}, {record.round_seconds:.0f} s",
            flush=True,
        )

    start = time.perf_counter()
    result = run_simulation(
        config, data, on_round=report, execution=Execution(workers=protocol["workers"])
    )
    summary = result.to_json()["transfer"]
    scores = [
        r.global_perplexity if metric == "perplexity" else r.global_accuracy for r in result.rounds
    ]
    return {
        "download_encoding": download,
        "upload_encoding": upload,
        "error_feedback": ef,
        "secure_aggregation": secure,
        "metric": metric,
        "per_round": scores,
        "final": scores[-1],
        "levels": [r.levels for r in result.rounds],
        "bytes_per_device_round": summary["bytes_per_device_round"],
        "transfer": {k: summary[k] for k in ("down", "up")},
        "wall_seconds": time.perf_counter() - start,
    }


def compare(runs: dict[str, Any]) -> dict[str, Any]:
    """Each run against fp32's: bytes ratios per direction and in all, accuracy difference."""
    base = runs.get("fp32")
    if base is None:
        return {}
    out = {}
    for name, run in runs.items():
        ratios = {
            k: run["bytes_per_device_round"][k] / base["bytes_per_device_round"][k]
            for k in ("down", "up", "total")
        }
        entry: dict[str, Any] = {"bytes_over_fp32": ratios}
        if run["metric"] == "accuracy":
            entry["accuracy_pp_vs_fp32"] = 100 * (run["final"] - base["final"])
            # Less noisy than one round: the mean over the last 5 rounds (fp32's own accuracy
            # moves by ~0.1 pp from round to round there).
            last = min(5, len(run["per_round"]), len(base["per_round"]))
            entry["accuracy_pp_vs_fp32_last5"] = (
                100
                * sum(
                    a - b
                    for a, b in zip(
                        run["per_round"][-last:], base["per_round"][-last:], strict=True
                    )
                )
                / last
            )
        else:
            entry["perplexity_vs_fp32"] = run["final"] / base["final"]
        target = TARGETS.get(name)
        if target is not None and run["metric"] == "accuracy":
            direction, bound, points = target
            # The accuracy target bounds the cost: an encoding that ends above fp32 meets it
            # (on 2,000 test images one image is 0.05 pp).
            entry["target"] = {
                "bytes": f"{direction} <= {bound}x",
                "accuracy": f"at most {points} pp below",
                "bytes_met": ratios[direction] <= bound,
                "accuracy_met": entry["accuracy_pp_vs_fp32"] >= -points,
            }
        out[name] = entry
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["conv"]["runs"]
    comparison = results["conv"]["comparison"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        rounds = range(1, len(run["per_round"]) + 1)
        left.plot(rounds, [100 * a for a in run["per_round"]], marker=".", label=name)
    left.set_xlabel("round")
    left.set_ylabel("global accuracy (%)")
    left.set_title(f"MNIST conv {results['conv']['protocol']['mode']} IID, same seed")
    left.grid(alpha=0.3)
    left.legend()
    names = [n for n in runs if n in comparison]
    x = range(len(names))
    width = 0.27
    for i, direction in enumerate(("down", "up", "total")):
        values = [comparison[n]["bytes_over_fp32"][direction] for n in names]
        bars = right.bar([p + (i - 1) * width for p in x], values, width, label=direction)
        right.bar_label(bars, fmt="%.2f", fontsize=7)
    right.set_xticks(list(x), names, rotation=20, ha="right")
    right.set_ylabel("bytes per device-round / fp32's")
    right.set_title("bytes on the wire")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED / "mnist")
    parser.add_argument("--wikitext-dir", type=Path, default=SHARED / "wikitext2")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, in turn")
    parser.add_argument("--mode", default="a-e")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--test-examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transformer", action="store_true", help="the transformer too")
    parser.add_argument("--out", type=Path, default=RESULTS / "compression.json")
    parser.add_argument(
        "--table", action="store_true", help="print the results in --out as markdown, run nothing"
    )
    args = parser.parse_args()
    if args.table:
        results = json.loads(args.out.read_text())
        for section in results.values():
            if isinstance(section, dict) and "runs" in section:
                section["comparison"] = compare(section["runs"])
        print(markdown(results))
        return
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    protocol = conv_protocol(args)
    conv = results.get("conv", {})
    if conv.get("protocol") != protocol:
        conv = {"protocol": protocol, "runs": {}}
    mnist = get_dataset("mnist", args.data_dir)
    for name in [n for n in args.runs.split(",") if n]:
        if name not in conv["runs"]:
            conv["runs"][name] = run_one(
                protocol, name, *RUNS[name], mnist, secure=name in SECURE_RUNS
            )
        conv["comparison"] = compare(conv["runs"])
        results["conv"] = conv
        save(args.out, results)
    if args.transformer:
        second = results.get("transformer", {})
        if second.get("protocol") != transformer_protocol():
            second = {"protocol": transformer_protocol(), "runs": {}}
        wikitext = get_dataset("wikitext2", args.wikitext_dir)
        for name in TRANSFORMER_RUNS:
            if name not in second["runs"]:
                second["runs"][name] = run_one(transformer_protocol(), name, *RUNS[name], wikitext)
            second["comparison"] = compare(second["runs"])
            results["transformer"] = second
            save(args.out, results)
    save(args.out, results)
    if "comparison" in results.get("conv", {}) and "fp32" in results["conv"]["runs"]:
        plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: v.get("comparison") for k, v in results.items() if k != "machine"}))


def markdown(results: dict[str, Any]) -> str:
    """The results as the tables of bench/README.md."""
    lines = []
    for model, section in results.items():
        if model == "machine" or "comparison" not in section:
            continue
        runs, comparison = section["runs"], section["comparison"]
        metric = next(iter(runs.values()))["metric"]
        score = "accuracy after" if metric == "accuracy" else "perplexity after"
        rounds = section["protocol"]["rounds"]
        lines += [
            f"{model}:",
            "",
            f"| run (down / up) | bytes per device-round | down / fp32 | up / fp32 | "
            f"total / fp32 | {score} {rounds} rounds | vs fp32 | last 5 rounds vs fp32 "
            "| target |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, run in runs.items():
            ratios = comparison[name]["bytes_over_fp32"]
            feedback = " + error feedback" if run["error_feedback"] else ""
            if metric == "accuracy":
                value = f"{100 * run['final']:.2f}%"
                versus = f"{comparison[name]['accuracy_pp_vs_fp32']:+.2f} pp"
                smoothed = f"{comparison[name]['accuracy_pp_vs_fp32_last5']:+.2f} pp"
            else:
                value = f"{run['final']:.1f}"
                versus = f"{comparison[name]['perplexity_vs_fp32']:.3f}x"
                smoothed = "-"
            target = comparison[name].get("target")
            verdict = "-"
            if target is not None:
                met = target["bytes_met"] and target["accuracy_met"]
                verdict = f"{target['bytes']}, {target['accuracy']}: {'met' if met else 'missed'}"
            total = run["bytes_per_device_round"]["total"]
            lines.append(
                f"| {name} ({run['download_encoding']} / {run['upload_encoding']}{feedback}) "
                f"| {total / 2**20:.2f} MiB | {ratios['down']:.3f} | {ratios['up']:.3f} "
                f"| {ratios['total']:.3f} | {value} | {versus} | {smoothed} | {verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


def save(path: Path, results: dict[str, Any]) -> None:
    results["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(path, results)


if __name__ == "__main__":
    main()
