"""Benchmark: exporter support matrix, export time, artifact size and step latency.

For every model and level a..e: export (ONNX always; ExecuTorch for conv and
resnet18), verification result, export seconds, artifact bytes against the
level's raw float32 parameter bytes. For conv levels a..e at batch 10 and 64:
median step latency on one thread for eager PyTorch (torch.optim.SGD),
onnxruntime (the train_step graph) and ExecuTorch (forward_backward + its SGD),
and their ratios to eager, all measured in this run.

    .venv/bin/python bench/bench_export.py [--models conv,resnet18,transformer] [--repeats 30]

Writes bench/results/export.json. Run it on a quiet machine: latencies are medians
of wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exporter.config import ExportConfig, Format
from exporter.errors import ExportError, VerificationError
from exporter.executorch_backend import ExecuTorchTrainer
from exporter.pipeline import export_level
from exporter.step import OptimizerSettings
from heterofl_edge.levels import Level
from heterofl_edge.loss import masked_cross_entropy
from heterofl_edge.models import build_model
from heterofl_edge.report import write_json

SETTINGS = OptimizerSettings()


def median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def step_latencies(folder: Path, rate: float, batch: int, repeats: int) -> dict[str, float]:
    import onnxruntime as ort

    model = build_model("conv", rate)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    mask = torch.ones(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def eager() -> None:
        loss = masked_cross_entropy(model(x), y, mask)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "onnx" / "train_step.onnx"), options)
    params = [p.detach().numpy() for p in model.parameters()]
    feeds = dict(
        zip(
            [i.name for i in session.get_inputs()],
            [
                *params,
                *[np.zeros_like(p) for p in params],
                x.numpy(),
                y.numpy(),
                mask.numpy(),
                np.array(0.01, np.float32),
            ],
            strict=True,
        )
    )
    result = {
        "eager_ms": median_ms(eager, repeats),
        "onnxruntime_ms": median_ms(lambda: session.run(None, feeds), repeats),
    }
    if batch == 10:  # the ExecuTorch program has the batch it was exported with
        names = [n for n, _ in model.named_parameters()]
        trainer = ExecuTorchTrainer(folder / "executorch" / "train.pte", names, SETTINGS)
        trainer.load_weights(model.state_dict(), (x, y, mask))
        result["executorch_ms"] = median_ms(
            lambda: trainer.step((x, y, mask), 0.01), max(5, repeats // 3)
        )
    for key in ("onnxruntime_ms", "executorch_ms"):
        if key in result:
            result[key.replace("_ms", "_over_eager")] = result[key] / result["eager_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="conv,resnet18,transformer")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "export.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"support": {}, "latency_conv": {}}
    if args.out.is_file():  # update the models run now, keep the others' results
        report = json.loads(args.out.read_text())
    report["machine"] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            formats = (Format.onnx,) if model == "transformer" else (Format.all,)
            report["support"][model] = {}
            for level in Level:
                start = time.perf_counter()
                entry: dict = {}
                try:
                    folder = export_level(
                        ExportConfig(model=model, rate=level.rate, formats=formats), Path(tmp)
                    )
                    manifest = json.loads((folder / "manifest.json").read_text())
                    raw = 4 * manifest["parameter_count"]
                    entry = {
                        "ok": True,
                        "export_and_verify_seconds": time.perf_counter() - start,
                        "raw_parameter_bytes": raw,
                        "files": {k: v["bytes"] for k, v in manifest["files"].items()},
                        "train_program_bytes_over_raw": {
                            k: v["bytes"] / raw
                            for k, v in manifest["files"].items()
                            if "train" in k
                        },
                        "verification": manifest["verification"]["results"],
                    }
                    if model == "conv":
                        report["latency_conv"][level.value] = {
                            str(b): step_latencies(folder, level.rate, b, args.repeats)
                            for b in (10, 64)
                        }
                except (ExportError, VerificationError) as exc:
                    entry = {"ok": False, "error": str(exc), "seconds": time.perf_counter() - start}
                report["support"].setdefault(model, {})[level.value] = entry
                print(
                    model,
                    level.value,
                    json.dumps(
                        {
                            k: v
                            for k, v in entry.items()
                            if k in ("ok", "error", "export_and_verify_seconds")
                        }
                    ),
                    flush=True,
                )
                write_json(args.out, report)
    print(json.dumps(report["latency_conv"], indent=1))


if __name__ == "__main__":
    main()
