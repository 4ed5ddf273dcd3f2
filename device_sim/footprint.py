r"""Peak memory of a device's training, per level and runtime: ``python -m device_sim.footprint``.

Measures what ``--max-memory-mb`` is about, on the machine it runs on (a
Raspberry Pi, or an emulated arm64 root): for each level, a fresh process
loads the device's examples as ``heterofl-edge device`` does, measures what
it holds before any level (``base_mb``), then does one round's work at that
level the way ``Device`` does it (the weights through safetensors as
downloaded, ``--steps`` training steps of batch ``--batch-size``, the upload
encoded, sBN statistics in batches of 10 as under a memory limit) and reports
the peak resident set (``peak_mb``, Linux ``VmHWM``). One JSON object per
level, on stdout::

    python -m device_sim.footprint --artifacts runs/state/artifacts --runtime onnx \
        --levels a,b,c,d,e --data-dir ~/mnist --clients 60

``--artifacts`` holds the levels' folders as the coordinator serves them
(``MODEL-LEVEL/manifest.json`` with the runtime's programs). No coordinator is
needed; the weights are random (memory does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

from device_sim.device import LIMITED_STATISTICS_BATCH, chunked_statistics
from device_sim.memory import PeakMemory, resident_mb
from device_sim.runtimes import get_runtime
from device_sim.worker import DeviceData, WorkerConfig, device_examples
from heterofl_edge.device_runtime import TrainingRequest
from heterofl_edge.errors import ConfigError, HeteroFLError
from heterofl_edge.levels import parse_rate, rate_label
from heterofl_edge.partition import Split

__all__ = ["measure", "run"]


def measure(
    folder: Path, runtime: str, config: WorkerConfig, steps: int, batch_size: int
) -> dict[str, float | int | str]:
    """The footprint of one level in this process (call it in a fresh one)."""
    factory = get_runtime(runtime)  # imports the runtime's libraries, as Device does
    images, labels = device_examples(config)
    present = sorted(int(v) for v in np.unique(labels))
    base = resident_mb()
    peak = PeakMemory()
    peak.mark()
    level = factory(folder)
    manifest = level.manifest
    rng = np.random.default_rng(0)
    weights = {
        p["name"]: (0.05 * rng.standard_normal(p["shape"])).astype(np.float32)
        for p in manifest["parameters"]
    }
    weights = load(save(weights))  # as downloaded: decoded from a safetensors body
    batch = int(getattr(level, "batch", batch_size))  # ExecuTorch: the program's fixed batch
    used = min(len(labels), steps * batch)
    result = level.train(
        TrainingRequest(weights, images[:used], labels[:used], present, 0.01, 1, batch, 0)
    )
    body = save({k: np.ascontiguousarray(v) for k, v in result.weights.items()})
    fixed = int(getattr(level, "batch", 1))
    chunk = fixed * max(1, -(-LIMITED_STATISTICS_BATCH // fixed))
    chunked_statistics(level, weights, images, chunk)
    top = peak.peak_mb()
    return {
        "level": rate_label(float(manifest["rate"])),
        "runtime": runtime,
        "examples": len(labels),
        "steps": result.steps,
        "batch": batch,
        "upload_bytes": len(body),
        "base_mb": round(base, 1) if base is not None else -1,
        "peak_mb": round(top, 1),
        "peak_resets": int(peak.resets),
    }


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m device_sim.footprint", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--model", default="conv")
    parser.add_argument("--levels", default="a,b,c,d,e")
    parser.add_argument("--runtime", default="onnx")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child
    args = parser.parse_args(argv)
    config = WorkerConfig(
        "http://unused",
        args.data_dir,
        Path("unused"),
        DeviceData.mnist,
        shard=args.shard,
        clients=args.clients,
        split=Split.iid,
    )
    try:
        levels = [rate_label(parse_rate(v)) for v in args.levels.split(",")]
        folders = [args.artifacts / f"{args.model}-{level}" for level in levels]
        for folder in folders:
            if not (folder / "manifest.json").is_file():
                raise ConfigError(f"no {folder}/manifest.json", "export the level first")
        if args.one:
            found = measure(folders[0], args.runtime, config, args.steps, args.batch_size)
            print(json.dumps(found))
            return 0
    except HeteroFLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for level in levels:  # one fresh process per level: peaks never mix
        child = [sys.executable, "-m", "device_sim.footprint", *_without_levels(argv), "--one"]
        done = subprocess.run([*child, "--levels", level], capture_output=True, text=True)
        if done.returncode != 0:
            failed += 1
            print(f"level {level}: failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        print(done.stdout.strip(), flush=True)
    return 1 if failed else 0


def _without_levels(argv: list[str] | None) -> list[str]:
    args = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--levels":
            skip = True
            continue
        if not arg.startswith("--levels="):
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(run())
