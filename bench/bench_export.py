"""Benchmark: exporter support matrix, export time, artifact size and training step time.

Section ``support``: for every model and level a..e, export (ONNX always;
ExecuTorch for conv and resnet18), verification result, export seconds,
artifact bytes against the level's raw float32 parameter bytes.

Section ``latency``: for each chosen model and level, at batch 10 and 64 on
one thread, the median time of one SGD step (clipping, momentum, weight
decay) in eager PyTorch (torch.optim.SGD), onnxruntime (the train_step
graph), ExecuTorch on XNNPACK (the default program) and ExecuTorch on portable
kernels (forward_backward + its SGD), as ratios to eager measured in the same
run. Eager, ONNX and ExecuTorch-XNNPACK steps run in rotation so that load from
other work hits them alike; the slow portable program gets fewer repeats.
Also onnxruntime's profile of the step: the share of time per operator type.

    .venv/bin/python bench/bench_export.py [--sections support,latency]
        [--models conv,resnet18,transformer] [--levels a,c,e] [--repeats 20]

Writes bench/results/export.json (updating only what ran) and export.md.
Run it on a quiet machine: times are medians of wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.config import ExportConfig, Format, Kernels
from exporter.errors import ExportError, VerificationError
from exporter.executorch_backend import ExecuTorchTrainer, set_threads
from exporter.pipeline import export_level
from exporter.step import Batch, OptimizerSettings
from heterofl_edge.levels import Level, parse_rate
from heterofl_edge.loss import masked_cross_entropy
from heterofl_edge.models import build_model, get_architecture
from heterofl_edge.report import atomic_write_bytes, write_json

SETTINGS = OptimizerSettings()
TARGET = {"executorch_xnnpack": 1.5, "onnxruntime": 1.0}


def rotated_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, run in rotation after one warm-up each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _batch(model: str, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    arch = get_architecture(model)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn((batch, *arch.input_shape), generator=g)
    y = torch.randint(0, arch.num_classes, (batch,), generator=g)
    return x, y, torch.ones(arch.num_classes)


def _onnx_session(path: Path, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options)


def _onnx_feeds(session: Any, model: torch.nn.Module, batch: Batch) -> dict[str, np.ndarray]:
    params = [p.detach().numpy() for p in model.parameters()]
    x, y, mask = batch
    values = [
        *params,
        *[np.zeros_like(p) for p in params],
        x.numpy(),
        y.numpy(),
        mask.numpy(),
        np.array(0.01, np.float32),
    ]
    return dict(zip([i.name for i in session.get_inputs()], values, strict=True))


def onnx_profile(path: Path, feeds: dict[str, np.ndarray], steps: int = 5) -> dict[str, float]:
    """Share of onnxruntime's kernel time per operator type over ``steps`` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        session = _onnx_session(path, str(Path(tmp) / "ort"))
        for _ in range(steps):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values()) or 1
    return {op: round(d / total, 3) for op, d in per_op.most_common(6)}


def _export(model: str, rate: float, fmt: Format, batch: int, kernels: Kernels, out: Path) -> Path:
    config = ExportConfig(
        model=model,
        rate=rate,
        formats=(fmt,),
        batch_size=batch,
        executorch_kernels=kernels,
        verify=False,  # the support section and the tests verify; here only speed counts
    )
    return export_level(config, out / f"{fmt.value}-{kernels.value}-{batch}")


def level_latency(model: str, rate: float, batches: list[int], repeats: int, tmp: Path) -> dict:
    """Step times of eager, ONNX and both ExecuTorch programs at each batch size."""
    names = [n for n, _ in build_model(model, rate).named_parameters()]
    onnx_folder = _export(model, rate, Format.onnx, 10, Kernels.xnnpack, tmp)
    onnx_path = onnx_folder / "onnx" / "train_step.onnx"
    result: dict = {}
    for batch in batches:
        torch.manual_seed(0)
        eager_model = build_model(model, rate)
        data = _batch(model, batch)
        optimizer = torch.optim.SGD(
            eager_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4
        )

        def eager(m: torch.nn.Module = eager_model, o: Any = optimizer, d: Batch = data) -> None:
            loss = masked_cross_entropy(m(d[0]), d[1], d[2])
            o.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()

        session = _onnx_session(onnx_path)
        feeds = _onnx_feeds(session, build_model(model, rate), data)
        seconds: dict[str, float] = {}
        trainers = {}
        for kernels in Kernels:
            start = time.perf_counter()
            folder = _export(model, rate, Format.executorch, batch, kernels, tmp)
            seconds[kernels.value] = round(time.perf_counter() - start, 1)
            trainer = ExecuTorchTrainer(folder / "executorch" / "train.pte", names, SETTINGS)
            trainer.load_weights(build_model(model, rate).state_dict(), data)
            trainers[kernels] = trainer
        fast = trainers[Kernels.xnnpack]
        ms = rotated_medians(
            {
                "eager": eager,
                "onnxruntime": lambda s=session, f=feeds: s.run(None, f),
                "executorch_xnnpack": lambda t=fast, d=data: t.step(d, 0.01),
            },
            repeats if batch <= 10 else max(5, repeats // 2),
        )
        portable = trainers[Kernels.portable]
        ms["executorch_portable"] = rotated_medians(
            {"p": lambda t=portable, d=data: t.step(d, 0.01)}, max(3, repeats // 10)
        )["p"]
        entry: dict[str, Any] = {f"{k}_ms": round(v, 3) for k, v in ms.items()}
        entry |= {
            f"{k}_over_eager": round(v / ms["eager"], 3) for k, v in ms.items() if k != "eager"
        }
        entry["executorch_export_seconds"] = seconds
        entry["onnx_profile_share"] = onnx_profile(onnx_path, feeds)
        result[str(batch)] = entry
        print(model, rate, batch, json.dumps(entry), flush=True)
    return result


def support(model: str, report: dict, tmp: Path, out: Path) -> None:
    formats = (Format.onnx,) if model == "transformer" else (Format.all,)
    report["support"][model] = {}
    for level in Level:
        start = time.perf_counter()
        entry: dict = {}
        try:
            folder = export_level(ExportConfig(model=model, rate=level.rate, formats=formats), tmp)
            manifest = json.loads((folder / "manifest.json").read_text())
            raw = 4 * manifest["parameter_count"]
            entry = {
                "ok": True,
                "export_and_verify_seconds": time.perf_counter() - start,
                "raw_parameter_bytes": raw,
                "files": {k: v["bytes"] for k, v in manifest["files"].items()},
                "train_program_bytes_over_raw": {
                    k: v["bytes"] / raw for k, v in manifest["files"].items() if "train" in k
                },
                "verification": manifest["verification"]["results"],
            }
        except (ExportError, VerificationError) as exc:
            entry = {"ok": False, "error": str(exc), "seconds": time.perf_counter() - start}
        report["support"][model][level.value] = entry
        shown = {
            k: v for k, v in entry.items() if k in ("ok", "error", "export_and_verify_seconds")
        }
        print(model, level.value, json.dumps(shown), flush=True)
        write_json(out, report)


def markdown(latency: dict) -> str:
    """The latency section as a table, ratios to eager, misses of the target marked."""
    lines = [
        "Step time, one thread, ratios to eager PyTorch measured in the same run "
        f"(targets: ExecuTorch XNNPACK <= {TARGET['executorch_xnnpack']}x, "
        f"onnxruntime <= {TARGET['onnxruntime']}x; * marks a miss).",
        "",
        "| model | level | batch | eager (ms) | ExecuTorch XNNPACK | ExecuTorch portable "
        "| onnxruntime | onnxruntime's top operators |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, levels in latency.items():
        for level, batches in levels.items():
            for batch, e in batches.items():

                def cell(key: str, e: dict[str, Any] = e) -> str:
                    ratio = e[f"{key}_over_eager"]
                    miss = "*" if key in TARGET and ratio > TARGET[key] else ""
                    return f"{e[f'{key}_ms']:,.1f} ({ratio:.2f}x{miss})"

                top = ", ".join(
                    f"{op} {share:.0%}" for op, share in list(e["onnx_profile_share"].items())[:3]
                )
                lines.append(
                    f"| {model} | {level} | {batch} | {e['eager_ms']:,.1f} "
                    f"| {cell('executorch_xnnpack')} | {cell('executorch_portable')} "
                    f"| {cell('onnxruntime')} | {top} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="support,latency")
    parser.add_argument("--models", default="conv,resnet18,transformer")
    parser.add_argument("--levels", default="a,b,c,d,e", help="levels of the latency section")
    parser.add_argument("--batches", default="10,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "export.json"
    )
    args = parser.parse_args()
    sections = args.sections.split(",")
    torch.set_num_threads(1)
    set_threads(1)
    report: dict = {"support": {}, "latency": {}}
    if args.out.is_file():  # update what runs now, keep the other results
        report = json.loads(args.out.read_text())
    report.pop("latency_conv", None)  # portable-only figures of an earlier version
    report.setdefault("latency", {})
    report["machine"] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": 1,
    }
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            if "support" in sections:
                support(model, report, Path(tmp), args.out)
            if "latency" in sections and model != "transformer":
                for level in args.levels.split(","):
                    entry = level_latency(
                        model, parse_rate(level), batches, args.repeats, Path(tmp) / level
                    )
                    report["latency"].setdefault(model, {})[level] = entry
                    write_json(args.out, report)
                    table = markdown(report["latency"]).encode()
                    atomic_write_bytes(args.out.with_suffix(".md"), table)
    print(markdown(report["latency"]))


if __name__ == "__main__":
    main()
