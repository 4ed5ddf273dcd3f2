"""Exporting one level: programs -> verification -> manifest, written atomically.

``export_level`` builds the level's sub-model, writes its programs for each
format into a temporary folder beside the destination, verifies them against
eager PyTorch, writes ``manifest.json`` and only then moves the folder into
place: a failed export leaves no partial files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.config import ExportConfig, Format, Kernels
from exporter.errors import ExportError
from exporter.step import Batch, StepFunctions, make_step_functions
from heterofl_edge.complexity import measure_complexity
from heterofl_edge.errors import HeteroFLError
from heterofl_edge.levels import rate_label
from heterofl_edge.masking import IGNORE_INDEX
from heterofl_edge.models import Architecture, get_architecture
from heterofl_edge.slicing import DimKind, shapes_at
from heterofl_edge.tasks import LanguageModelTask, task_for

__all__ = ["MANIFEST_VERSION", "export_level", "level_folder_name"]

MANIFEST_VERSION = 1
Progress = Callable[[str], None]


def level_folder_name(model: str, rate: float) -> str:
    return f"{model}-{rate_label(rate)}"


def _without_dropout(model: nn.Module) -> bool:
    found = False
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            found = True
    return found


def _example_batch(arch: Architecture, batch: int, generator: torch.Generator) -> Batch:
    """A random batch with a label mask that excludes two labels (absent from y).

    Token inputs are a masked language model's batch: about half of the
    positions hold the mask token and are scored, the others are ignored.
    """
    classes = arch.num_classes
    mask = torch.ones(classes)
    mask[[1, classes - 2]] = 0.0
    allowed = torch.nonzero(mask).flatten()
    if arch.input_dtype == torch.long:
        picks = torch.randint(0, len(allowed), (batch, *arch.input_shape), generator=generator)
        rows = allowed[picks]
        hidden = torch.rand(rows.shape, generator=generator) < 0.5
        hidden.view(-1)[0] = True  # at least one scored position
        x = rows.masked_fill(hidden, classes)  # the mask token: one past the vocabulary
        y = rows.masked_fill(~hidden, IGNORE_INDEX)
    else:
        x = torch.randn((batch, *arch.input_shape), generator=generator)
        y = allowed[torch.randint(0, len(allowed), (batch,), generator=generator)]
    return x, y, mask


def _io(name: str, tensor: torch.Tensor, batch_dim: bool = False) -> dict[str, Any]:
    shape: list[int | str] = list(tensor.shape)
    if batch_dim:
        shape[0] = "batch"
    return {"name": name, "shape": shape, "dtype": str(tensor.dtype).removeprefix("torch.")}


def _program_signatures(
    fns: StepFunctions,
    params: Sequence[torch.Tensor],
    stats: Sequence[torch.Tensor],
    batch: Batch,
    dynamic_batch: bool,
) -> dict[str, dict[str, Any]]:
    x, y, mask = batch
    p_io = [_io(f"param.{n}", t) for n, t in zip(fns.param_names, params, strict=True)]
    m_io = [_io(f"momentum.{n}", t) for n, t in zip(fns.param_names, params, strict=True)]
    s_io = [_io(f"stat.{n}", t) for n, t in zip(fns.stat_names, stats, strict=True)]
    data = [_io("x", x, dynamic_batch), _io("y", y, dynamic_batch), _io("label_mask", mask)]
    scalar = torch.zeros((), dtype=torch.float32)
    count = torch.zeros((), dtype=torch.int64)
    signatures: dict[str, dict[str, Any]] = {
        "evaluate": {
            "inputs": [*p_io, *s_io, _io("x", x, dynamic_batch)],
            "outputs": [_io("logits", fns.evaluate(*params, *stats, x), dynamic_batch)],
        },
    }
    if dynamic_batch:
        signatures["train_step"] = {
            "inputs": [*p_io, *m_io, *data, _io("lr", scalar)],
            "outputs": [_io("loss", scalar)]
            + [{**d, "name": "updated." + d["name"]} for d in p_io + m_io]
            + [_io("correct", count)],
        }
    else:
        signatures["train"] = {
            "method": "forward",
            "inputs": data,
            "outputs": [_io("loss", scalar), _io("correct", count)],
            "parameters": [
                {**d, "name": "model." + d["name"].removeprefix("param.")} for d in p_io
            ],
        }
    if fns.bn_layers:
        outs = []
        for layer, t in zip(fns.bn_layers, fns.statistics(*params, x)[::2], strict=True):
            outs += [_io(f"mean.{layer}", t), _io(f"var.{layer}", t)]
        signatures["statistics"] = {"inputs": [*p_io, _io("x", x, dynamic_batch)], "outputs": outs}
    return signatures


def _export_onnx(
    folder: Path,
    fns: StepFunctions,
    params: list[torch.Tensor],
    stats: list[torch.Tensor],
    batch: Batch,
    config: ExportConfig,
    signatures: dict[str, Any],
) -> None:
    from exporter.onnx_backend import export_onnx_program

    x, y, mask = batch
    n = len(params)
    momenta = [torch.zeros_like(p) for p in params]
    lr = torch.tensor(config.verify_lr)
    plan = {
        "train_step": (fns.train_step, [*params, *momenta, x, y, mask, lr], [2 * n, 2 * n + 1]),
        "evaluate": (fns.evaluate, [*params, *stats, x], [n + len(stats)]),
        "statistics": (fns.statistics, [*params, x], [n]),
    }
    for program, (function, args, batch_inputs) in plan.items():
        if program not in signatures:
            continue
        signature = signatures[program]
        dynamic = export_onnx_program(
            function,
            args,
            [d["name"] for d in signature["inputs"]],
            [d["name"] for d in signature["outputs"]],
            batch_inputs,
            config.max_batch,
            folder / f"{program}.onnx",
        )
        if not dynamic:  # the manifest says the fixed batch the graph was traced with
            for d in signature["inputs"] + signature["outputs"]:
                d["shape"] = [config.batch_size if s == "batch" else s for s in d["shape"]]


def _export_executorch(
    folder: Path,
    model: nn.Module,
    fns: StepFunctions,
    params: list[torch.Tensor],
    stats: list[torch.Tensor],
    batch: Batch,
    config: ExportConfig,
) -> None:
    from exporter.executorch_backend import export_function_program, export_training_program

    export_training_program(model, batch, folder / "train.pte", config.executorch_kernels)
    export_function_program(fns.evaluate, [*params, *stats, batch[0]], folder / "evaluate.pte")
    if fns.bn_layers:
        export_function_program(fns.statistics, [*params, batch[0]], folder / "statistics.pte")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "executorch", "onnx", "onnxruntime", "onnxscript", "heterofl-edge"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _positions(
    arch: Architecture, name: str, rate: float, global_rate: float
) -> list[dict[str, Any]]:
    out = []
    for dim in arch.spec[name].dims:
        entry: dict[str, Any] = {
            "kind": dim.kind.value,
            "size": dim.size(rate),
            "global_size": dim.size(global_rate),
        }
        if dim.kind is DimKind.heads:
            entry["heads"] = dim.heads
        out.append(entry)
    return out


def _prepare_destination(out_root: Path) -> None:
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ExportError(
            f"cannot write to output folder {out_root}: {exc.strerror or exc}",
            "choose a folder you can write to with --out",
        ) from None


def _export_format(
    fmt: Format,
    folder: Path,
    model: nn.Module,
    fns: StepFunctions,
    params: list[torch.Tensor],
    stats: list[torch.Tensor],
    batch: Batch,
    config: ExportConfig,
    where: str,
) -> dict[str, Any]:
    """Write one format's programs into ``folder``; return their signatures."""
    signatures = _program_signatures(fns, params, stats, batch, fmt is Format.onnx)
    try:
        if fmt is Format.onnx:
            _export_onnx(folder, fns, params, stats, batch, config, signatures)
        else:
            _export_executorch(folder, model, fns, params, stats, batch, config)
    except HeteroFLError:
        raise
    except Exception as exc:  # a backend that cannot take this model
        text = str(exc).strip()
        reason = text.splitlines()[0][:300] if text else "no message"
        raise ExportError(
            f"{fmt.value} cannot export {where}: {type(exc).__name__}: {reason}",
            "see the README's support matrix; the other format may work (--format)",
        ) from exc
    if fmt is Format.executorch:
        signatures["train"].update(_executorch_kernels(config.executorch_kernels))
    extension = "onnx" if fmt is Format.onnx else "pte"
    for program, signature in signatures.items():
        signature["file"] = f"{fmt.value}/{program}.{extension}"
    return signatures


def _executorch_kernels(kernels: Kernels) -> dict[str, Any]:
    """What the training program needs from the runtime, for the manifest."""
    if kernels is Kernels.portable:
        return {"kernels": kernels.value, "backends": []}
    return {
        "kernels": kernels.value,
        # The runtime must register these delegates (ExecuTorch's Android AAR does).
        "backends": ["XnnpackBackend"],
        "note": "plain convolutions run as im2col plus linear; ReLU, 2x2 max-pooling and "
        "batch norm are written so that their backward runs on XNNPACK too; whatever XNNPACK "
        "takes runs there, with the weights as program state; the rest on portable kernels",
    }


def _file_table(staging: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every program file, by path relative to the level folder."""
    return {
        path.relative_to(staging).as_posix(): {
            "sha256": _sha256(path),
            "bytes": path.stat().st_size,
        }
        for path in sorted(staging.rglob("*"))
        if path.is_file()
    }


def _has_dynamic_batch(signatures: dict[str, Any]) -> bool:
    inputs = signatures.get("train_step", {}).get("inputs", [])
    return any(size == "batch" for d in inputs for size in d["shape"])


def export_level(config: ExportConfig, out_root: Path, progress: Progress | None = None) -> Path:
    """Export one level of ``config.model`` into ``out_root/MODEL-LEVEL``; return that folder."""
    say = progress or (lambda _message: None)
    arch = get_architecture(config.model)
    if not 0.0 < config.rate <= config.global_rate <= 1.0:
        raise ExportError(f"rate {config.rate:g} must lie in (0, {config.global_rate:g}]")
    if config.batch_size < 1 or config.batch_size > config.max_batch:
        raise ExportError(f"batch size {config.batch_size} must lie in 1..{config.max_batch}")
    _prepare_destination(out_root)
    label = rate_label(config.rate)
    where = f"{arch.name} at level {label}"
    destination = out_root / level_folder_name(arch.name, config.rate)
    formats = [f for fmt in config.formats for f in fmt.expand()]

    torch.manual_seed(config.seed)
    model = arch.build(config.rate, config.global_rate)
    dropout_removed = _without_dropout(model)
    generator = torch.Generator().manual_seed(config.seed)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    # Artifacts hold no round's weights: placeholders are zeros, verification starts from `start`.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    fns = make_step_functions(model, config.optimizer)
    params = [torch.zeros_like(start[n]) for n in fns.param_names]
    stats = [
        torch.rand(b.shape, generator=generator) + (0.5 if n.endswith("var") else -0.5)
        for n, b in model.named_buffers()
    ]
    batch = _example_batch(arch, config.batch_size, generator)

    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=out_root))
    try:
        programs: dict[str, Any] = {}
        verification: dict[str, Any] = {}
        for fmt in formats:
            folder = staging / fmt.value
            folder.mkdir()
            say(f"{where}: exporting {fmt.value}")
            signatures = _export_format(
                fmt, folder, model, fns, params, stats, batch, config, where
            )
            programs[fmt.value] = signatures
            if config.verify:
                say(f"{where}: verifying {fmt.value} ({config.verify_steps} steps against PyTorch)")
                verification[fmt.value] = _verify(
                    fmt,
                    folder,
                    fns,
                    arch,
                    config,
                    start,
                    stats,
                    generator,
                    _has_dynamic_batch(signatures),
                )
        manifest = _manifest(
            arch,
            config,
            fns,
            programs,
            _file_table(staging),
            verification if config.verify else None,
            dropout_removed,
        )
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"{where}: wrote {destination}")
    return destination


def _manifest(
    arch: Architecture,
    config: ExportConfig,
    fns: StepFunctions,
    programs: dict[str, Any],
    files: dict[str, Any],
    verification: dict[str, Any] | None,
    dropout_removed: bool,
) -> dict[str, Any]:
    complexity = measure_complexity(arch, config.rate)
    shapes = shapes_at(arch.spec, config.rate)
    return {
        "format_version": MANIFEST_VERSION,
        "model": arch.name,
        "level": rate_label(config.rate),
        "rate": config.rate,
        "global_rate": config.global_rate,
        "num_classes": arch.num_classes,
        "task": arch.task.value,
        "input": {
            "shape": ["batch", *arch.input_shape],
            "dtype": str(arch.input_dtype).removeprefix("torch."),
        },
        **_task_fields(arch),
        "batch_size": {"onnx": f"1..{config.max_batch}", "executorch": config.batch_size},
        "parameters": [
            {
                "name": n,
                "shape": list(shapes[n]),
                "dtype": "float32",
                "positions": _positions(arch, n, config.rate, config.global_rate),
            }
            for n in fns.param_names
        ],
        "statistics": [
            {"name": n, "shape": list(shapes[n]), "dtype": "float32"} for n in fns.stat_names
        ],
        "bn_layers": fns.bn_layers,
        "hyperparameters": {
            **asdict(config.optimizer),
            "loss": "cross-entropy of logits * label_mask (masked logits become 0)",
            "scaler": config.rate / config.global_rate,
            "dropout": 0.0 if dropout_removed else None,
        },
        "programs": programs,
        "files": files,
        "parameter_count": complexity.parameters,
        "flops": complexity.flops,
        "versions": _versions(),
        "verification": None
        if verification is None
        else {
            "steps": config.verify_steps,
            "lr": config.verify_lr,
            "tolerance": config.tolerance,
            "results": verification,
        },
    }


def _task_fields(arch: Architecture) -> dict[str, Any]:
    """What a device needs to know to train this kind of model beyond the step itself."""
    task = task_for(arch)
    if not isinstance(task, LanguageModelTask):
        return {}
    return {
        "masked_language_model": {
            "mask_token": task.num_tokens,
            "mask_rate": task.mask_rate,
            "scored_positions": task.positions.value,
            "ignore_index": IGNORE_INDEX,
            "masks": "heterofl_edge.masking.TokenMasker seeded with the task's seed",
        }
    }


def _verify(
    fmt: Format,
    folder: Path,
    fns: StepFunctions,
    arch: Architecture,
    config: ExportConfig,
    start: dict[str, torch.Tensor],
    stats: list[torch.Tensor],
    generator: torch.Generator,
    dynamic_batch: bool,
) -> dict[str, float]:
    from exporter.verify import verify_executorch, verify_onnx

    sizes = [config.batch_size] * config.verify_steps
    if dynamic_batch and config.batch_size > 1:
        sizes[-1] = max(1, config.batch_size // 3)  # a short last batch, as on a device
    batches = [_example_batch(arch, b, generator) for b in sizes]
    reference = arch.build(config.rate, config.global_rate)
    _without_dropout(reference)
    check = verify_onnx if fmt is Format.onnx else verify_executorch
    return check(
        folder,
        fns,
        reference,
        start,
        batches,
        stats,
        config.verify_lr,
        config.optimizer,
        config.tolerance,
    )


def _swap_into_place(staging: Path, destination: Path) -> None:
    """Replace ``destination`` by ``staging`` with renames only (no half-written folder)."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp made it private; give it the usual mode
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        destination.rename(old)
    staging.rename(destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
