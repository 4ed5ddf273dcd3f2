"""Where an ExecuTorch XNNPACK training step spends its time, by operator, sampled with perf.

ExecuTorch's pip wheel is built without its event tracer (an ETDump comes back
empty), so the XNNPACK delegate cannot say how long each of its operators ran.
This script samples the native call stacks with Linux ``perf record
--call-graph dwarf`` while ``ExecuTorchTrainer.step`` runs (the step that
``bench_export.py`` times: forward, backward, clipping and SGD) and puts every
sample of the stepping thread in one bucket:

* a portable kernel: a ``torch::executor::native::<op>_out`` frame is on the
  stack (these symbols are exported);
* an XNNPACK operator: the function XNNPACK's threadpool called
  (``pthreadpool_parallelize_*``'s callee: one per kind of operator) or, where
  the stack cannot be unwound (the hand-written assembly microkernels carry no
  unwind tables), the sampled function itself. The wheel strips these
  functions' names, so they are told apart by their address ranges in the
  library's unwind tables (``readelf --debug-dump=frames``) and named by
  calibration: single-operator XNNPACK programs (matrix multiply, slice,
  concatenation, pad, transpose, elementwise arithmetic, clamp and ceil, mean)
  are sampled in the same recording, and a function takes the name of the
  probe in which it has the largest share of the samples (names joined with
  "/" where probes share it);
* the ExecuTorch runtime (``Method::execute`` on the stack, no kernel below);
* outside the program: the SGD step, clipping and Python around it.

    .venv/bin/python bench/profile_executorch.py [--rows conv:c:64,resnet18:e:10] [--steps 40]

The default rows are the ones that miss 1.5x eager in ``results/export.json``.
Needs ``perf`` (Debian: ``linux-perf``) and permission to sample one's own
processes. Writes ``results/executorch_profile.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_export import _batch  # this folder is on sys.path when a bench script runs

from exporter.config import ExportConfig, Format, Kernels
from exporter.errors import ExportError
from exporter.executorch_backend import ExecuTorchTrainer, _Function, set_threads
from exporter.pipeline import export_level
from exporter.step import OptimizerSettings
from heterofl_edge.levels import parse_rate
from heterofl_edge.loss import masked_cross_entropy
from heterofl_edge.models import build_model, get_architecture
from heterofl_edge.report import atomic_write_bytes, write_json

RESULTS = Path(__file__).parent / "results"
TARGET = 1.5
# Sampling at 299 Hz with 8 KiB of stack per sample: enough to unwind from a kernel up
# to Method::execute, and few enough bytes that perf loses no samples.
PERF_RECORD = ["perf", "record", "-q", "-k", "mono", "-F", "299", "--call-graph", "dwarf,8192"]
LIBRARY = "_portable_lib"  # ExecuTorch's runtime, kernels and XNNPACK, in one shared library
MIN_PROBE_SHARE = 0.05  # a function under this share of every probe's samples is not named


# -- the profiled process ------------------------------------------------------


def _probe_modules() -> dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]]:
    """Single-operator programs, each with inputs shaped like a conv layer's activations."""
    x = torch.randn(64, 14, 14, 32)
    y = torch.randn(64, 14, 14, 32)
    scale = torch.randn(1, 1, 1, 32)
    nchw = torch.randn(64, 32, 14, 14)
    a = torch.randn(64 * 14 * 14, 288)
    w = torch.randn(64, 288)
    g = torch.randn(64 * 14 * 14, 64)
    small = torch.randn(64, 512)
    head = torch.randn(10, 512)
    narrow = torch.randn(64 * 28 * 28, 9)  # a first layer's patches: few inputs, few outputs
    narrow_w = torch.randn(4, 9)
    narrow_g = torch.randn(64 * 28 * 28, 4)
    return {
        # One probe per shape a training step multiplies in ("#" tells them apart): XNNPACK
        # picks its matrix-multiply path by shape.
        "matrix multiply#forward": (lambda a, w: F.linear(a, w), (a, w)),
        "matrix multiply#input gradient": (lambda g, w: g @ w, (g, w)),
        "matrix multiply#weight gradient": (lambda g, a: g.t() @ a, (g, a)),
        "matrix multiply#head": (lambda small, head: F.linear(small, head), (small, head)),
        "matrix multiply#narrow forward": (lambda n, w: F.linear(n, w), (narrow, narrow_w)),
        "matrix multiply#narrow weight gradient": (lambda g, n: g.t() @ n, (narrow_g, narrow)),
        "slice#rows and columns": (lambda x: x[:, 1:13, 1:13, :], (x,)),
        "slice#channels": (lambda x: x[:, :, :, 8:24], (x,)),
        "concatenate": (lambda x, y: torch.cat([x, y], dim=3), (x, y)),
        "pad": (lambda x: F.pad(x, (0, 0, 1, 2, 1, 2)), (x,)),
        "transpose": (lambda x: x.permute(0, 3, 1, 2).contiguous(), (x,)),
        "elementwise arithmetic": (
            lambda x, y, s: torch.maximum((x * y - x) / (y + 3.0), x * s) * 0.5,
            (x, y, scale),
        ),
        "clamp and ceil": (lambda x: torch.ceil(torch.clamp(x, 0.0, 1.0)), (x,)),
        "mean": (lambda x: x.mean(dim=(2, 3), keepdim=True), (nchw,)),
    }


def _probe_program(function: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Any:
    """``function`` lowered to XNNPACK whole, loaded; None if XNNPACK did not take all of it."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    from exporter.executorch_backend import portable_operators

    program = torch.export.export(_Function(function), inputs, strict=False)
    edge = to_edge_transform_and_lower(
        program, partitioner=[XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)]
    )
    if portable_operators(edge):
        return None
    buffer = edge.to_executorch().buffer
    module = _load_for_executorch_from_buffer(buffer)
    module.forward(inputs)
    return module, buffer  # the module reads the buffer in place: keep it alive


def _timed(run: Callable[[], object], seconds: float) -> tuple[int, int, int]:
    """Run ``run`` for about ``seconds``: (start, end, calls), CLOCK_MONOTONIC ns (perf -k mono)."""
    run()
    start = time.monotonic_ns()
    calls = 0
    while time.monotonic_ns() - start < seconds * 1e9:
        run()
        calls += 1
    return start, time.monotonic_ns(), calls


def _eager_ms(model_name: str, rate: float, batch: tuple[torch.Tensor, ...], steps: int) -> float:
    model = build_model(model_name, rate)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        loss = masked_cross_entropy(model(batch[0]), batch[1], batch[2])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def child(spec_path: Path) -> None:
    """Run the probes and the rows' steps; write when each ran to the spec's ``segments``."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(1)
    set_threads(1)
    segments: list[dict[str, Any]] = []
    for name, (function, inputs) in _probe_modules().items():
        loaded = _probe_program(function, inputs)
        if loaded is None:
            print(f"probe {name!r}: XNNPACK did not take the whole program; skipped", flush=True)
            continue
        start, end, _ = _timed(lambda m=loaded[0], i=inputs: m.forward(i), spec["probe_seconds"])
        segments.append({"probe": name, "start": start, "end": end})
    for row in spec["rows"]:
        rate = parse_rate(row["level"])
        names = [n for n, _ in build_model(row["model"], rate).named_parameters()]
        batch = _batch(row["model"], row["batch"])
        trainer = ExecuTorchTrainer(Path(row["program"]), names, OptimizerSettings())
        trainer.load_weights(build_model(row["model"], rate).state_dict(), batch)
        start, end, calls = _timed(lambda t=trainer, b=batch: t.step(b, 0.01), spec["row_seconds"])
        eager = _eager_ms(row["model"], rate, batch, steps=max(3, calls // 4))
        segments.append(
            {
                "row": row["key"],
                "start": start,
                "end": end,
                "executorch_ms": (end - start) / 1e6 / calls,
                "eager_ms": eager,
            }
        )
        print(row["key"], json.dumps(segments[-1]), flush=True)
    spec_path.write_text(json.dumps({**spec, "segments": segments, "pid": os.getpid()}))


# -- reading the samples ------------------------------------------------------------


_HEAD = re.compile(r"^\S+\s+(\d+)\s+(\d+)\.(\d+):")
_FRAME = re.compile(r"^\s*([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")


def read_samples(text: str) -> list[tuple[int, int, list[tuple[int, str, str]]]]:
    """``perf script`` output as (tid, time ns, frames leaf first: (address, symbol, library))."""
    samples: list[tuple[int, int, list[tuple[int, str, str]]]] = []
    frames: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        head = _HEAD.match(line)
        if head:
            frames = []
            nanos = int(head.group(2)) * 1_000_000_000 + int(head.group(3).ljust(9, "0")[:9])
            samples.append((int(head.group(1)), nanos, frames))
            continue
        frame = _FRAME.match(line)
        if frame:
            symbol = re.sub(r"\+0x[0-9a-f]+$", "", frame.group(2))
            frames.append((int(frame.group(1), 16), symbol, Path(frame.group(3)).name))
    return samples


class FunctionRanges:
    """Address ranges of a library's functions, from its unwind tables (.eh_frame)."""

    def __init__(self, frames_dump: str) -> None:
        """``frames_dump``: what ``readelf --debug-dump=frames`` prints for the library."""
        ranges = sorted(
            (int(a, 16), int(b, 16))
            for a, b in re.findall(r"pc=([0-9a-f]+)\.\.([0-9a-f]+)", frames_dump)
        )
        self._starts = [a for a, _ in ranges]
        self._ends = [b for _, b in ranges]

    @classmethod
    def of_library(cls, library: Path) -> FunctionRanges:
        command = ["readelf", "--debug-dump=frames", str(library)]
        return cls(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    def function_of(self, address: int) -> str:
        """An id of the function holding ``address``; code with no unwind entry gets its gap."""
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._ends[i]:
            return f"{self._starts[i]:x}"
        return f"after {self._ends[i]:x}" if i >= 0 else "start"


def _function(frame: tuple[int, str, str], ranges: FunctionRanges) -> str:
    address, symbol, library = frame
    if LIBRARY in library and symbol == "[unknown]":
        return ranges.function_of(address)
    return f"{library}:{symbol}"


def _xnnpack_function(frames: list[tuple[int, str, str]], ranges: FunctionRanges) -> str:
    """The threadpool's callee (the operator's compute function), else the sampled function."""
    for i, (_, symbol, _) in enumerate(frames):
        if symbol.startswith("pthreadpool_parallelize") and i > 0:
            return _function(frames[i - 1], ranges)
    return _function(frames[0], ranges)


def bucket(frames: list[tuple[int, str, str]], ranges: FunctionRanges) -> tuple[str, str]:
    """(kind, what) of one sample: portable kernel, XNNPACK function, runtime or outside."""
    symbols = [symbol for _, symbol, _ in frames]
    for symbol in symbols:
        if symbol.startswith("torch::executor::native::"):
            return "portable", symbol.rsplit("::", 1)[-1].removesuffix("_out")
    in_program = "executorch::runtime::Method::execute" in symbols
    if "xnn_invoke_runtime" in symbols or (
        not in_program and frames and LIBRARY in frames[0][2] and symbols[0] == "[unknown]"
    ):
        return "xnnpack", _xnnpack_function(frames, ranges)
    if in_program:
        return "runtime", ""
    return "outside", ""


def name_functions(per_probe: dict[str, Counter[str]]) -> dict[str, str]:
    """Each XNNPACK function's operator: the probe where it has the largest share of samples.

    Probes within 10% of that share are named with it (a function several operators share);
    a probe's name ends before any "#" (several probes of one operator).
    A function with less than ``MIN_PROBE_SHARE`` of every probe's samples stays unnamed:
    so few samples are the noise of a probe's other work, and named that way a function
    changed name between runs.
    """
    shares: dict[str, dict[str, float]] = defaultdict(dict)
    for probe, counts in per_probe.items():
        total = sum(counts.values()) or 1
        for function, count in counts.items():
            shares[function][probe] = count / total
    names = {}
    for function, by_probe in shares.items():
        best = max(by_probe.values())
        if best >= MIN_PROBE_SHARE:
            close = {p.split("#")[0] for p, s in by_probe.items() if s >= 0.9 * best}
            names[function] = "/".join(sorted(close))
    return names


def attribute(
    spec: dict[str, Any], text: str, ranges: FunctionRanges
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Per row, the share of its step in each bucket (XNNPACK functions named by the probes);
    per probe, its largest functions' shares (what the names rest on)."""
    samples = [s for s in read_samples(text) if s[0] == spec["pid"]]

    def counts_between(start: int, end: int) -> Counter[tuple[str, str]]:
        return Counter(bucket(frames, ranges) for _, t, frames in samples if start <= t <= end)

    per_probe: dict[str, Counter[str]] = {}
    rows: dict[str, Any] = {}
    for segment in spec["segments"]:
        counts = counts_between(segment["start"], segment["end"])
        if "probe" in segment:
            per_probe[segment["probe"]] = Counter(
                {what: n for (kind, what), n in counts.items() if kind == "xnnpack"}
            )
        else:
            rows[segment["row"]] = (segment, counts)
    names = name_functions(per_probe)
    report: dict[str, Any] = {}
    for key, (segment, counts) in rows.items():
        total = sum(counts.values()) or 1
        shares: Counter[str] = Counter()
        unidentified: Counter[str] = Counter()
        for (kind, what), n in counts.items():
            if kind == "xnnpack":
                shares[f"XNNPACK {names.get(what, 'unidentified')}"] += n / total
                if what not in names:
                    unidentified[what] += n / total
            elif kind == "portable":
                shares[f"portable {what}"] += n / total
            else:
                label = {"runtime": "ExecuTorch runtime", "outside": "outside the program"}
                shares[label[kind]] += n / total
        report[key] = {
            "executorch_ms": round(segment["executorch_ms"], 2),
            "eager_ms": round(segment["eager_ms"], 2),
            "over_eager": round(segment["executorch_ms"] / segment["eager_ms"], 2),
            "samples": sum(counts.values()),
            "shares": {k: round(v, 3) for k, v in shares.most_common()},
            "unidentified_functions": {k: round(v, 3) for k, v in unidentified.most_common(5)},
        }
    probes = {
        probe: {f: round(n / (sum(c.values()) or 1), 3) for f, n in c.most_common(6)}
        for probe, c in per_probe.items()
    }
    return report, probes


# -- the run ---------------------------------------------------------------------


def missed_rows(export_json: Path) -> list[str]:
    """``model:level:batch`` of each row of the latency table above the target."""
    latency = json.loads(export_json.read_text()).get("latency", {})
    return [
        f"{model}:{level}:{batch}"
        for model, levels in latency.items()
        for level, batches in levels.items()
        for batch, entry in batches.items()
        if entry["executorch_xnnpack_over_eager"] > TARGET
    ]


def parse_rows(text: str) -> list[str]:
    """``model:level:batch,...`` checked, for argparse (a bad row is a usage error)."""
    rows = [row.strip() for row in text.split(",") if row.strip()]
    for row in rows:
        parts = row.split(":")
        try:
            if len(parts) != 3 or int(parts[2]) < 1:
                raise ValueError
            get_architecture(parts[0])
            parse_rate(parts[1])
        except Exception:  # the model registry and parse_rate raise their own kinds
            raise argparse.ArgumentTypeError(
                f"{row!r} is not model:level:batch (for example conv:c:64)"
            ) from None
    return rows


def export_program(model: str, level: str, batch: int, out: Path) -> Path:
    config = ExportConfig(
        model=model,
        rate=parse_rate(level),
        formats=(Format.executorch,),
        batch_size=batch,
        executorch_kernels=Kernels.xnnpack,
        verify=False,  # bench_export.py and the tests verify these programs
    )
    return export_level(config, out / f"{model}-{level}-{batch}") / "executorch" / "train.pte"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "Where the ExecuTorch XNNPACK step's time goes (share of perf samples of the "
        "stepping thread; one thread).",
        "",
        "| row | XNNPACK step / eager | largest buckets |",
        "| --- | --- | --- |",
    ]
    for key, row in report.items():
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(row["shares"].items())[:6])
        lines.append(
            f"| {key} | {row['executorch_ms']:,.1f} / {row['eager_ms']:,.1f} ms "
            f"({row['over_eager']:.2f}x) | {top} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=parse_rows, help="model:level:batch,... (default: the misses)"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="sampled seconds per row")
    parser.add_argument("--out", type=Path, default=RESULTS / "executorch_profile.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if shutil.which("perf") is None:
        sys.exit("profile_executorch: needs Linux perf (Debian: apt-get install linux-perf)")
    keys = args.rows or missed_rows(RESULTS / "export.json")
    spec = importlib.util.find_spec(f"executorch.extension.pybindings.{LIBRARY}")
    library = Path(spec.origin) if spec and spec.origin else None
    if library is None:
        sys.exit(f"profile_executorch: ExecuTorch's {LIBRARY} is not installed")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows = []
        for key in keys:
            model, level, batch = key.split(":")
            try:
                program = export_program(model, level, int(batch), tmp)
            except ExportError as exc:
                sys.exit(f"profile_executorch: {key}: {exc}")
            row = {"key": key, "model": model, "level": level, "batch": int(batch)}
            rows.append(row | {"program": str(program)})
            print("exported", key, flush=True)
        spec_path = tmp / "spec.json"
        spec_path.write_text(
            json.dumps({"rows": rows, "probe_seconds": 1.5, "row_seconds": args.seconds})
        )
        data = tmp / "perf.data"
        record = [*PERF_RECORD, "-o", str(data), sys.executable, __file__, "--child"]
        if subprocess.run([*record, str(spec_path)]).returncode != 0:
            sys.exit(
                "profile_executorch: the profiled run failed (messages above); if perf "
                "refused to sample, it needs kernel.perf_event_paranoid <= 2 or root"
            )
        text = subprocess.run(
            ["perf", "script", "--no-inline", "-i", str(data)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        ranges = FunctionRanges.of_library(library)
        report, probes = attribute(json.loads(spec_path.read_text()), text, ranges)
    machine = {"cpu_count": os.cpu_count(), "threads": 1}
    write_json(args.out, {"machine": machine, "rows": report, "probes": probes})
    atomic_write_bytes(args.out.with_suffix(".md"), markdown(report).encode())
    print(markdown(report))


if __name__ == "__main__":
    main()
