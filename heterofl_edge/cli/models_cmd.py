"""``heterofl-edge models``: list, summarise and check the width-scalable models."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from heterofl_edge.cli.options import ModelArgument, ModelOption
from heterofl_edge.errors import ModelError
from heterofl_edge.levels import Level, parse_rate, rate_label

if TYPE_CHECKING:  # the models need torch (extra 'server'): imported by each command
    from heterofl_edge.models import Architecture
    from heterofl_edge.models.check import CheckResult

app = typer.Typer(help="Inspect the width-scalable models.", no_args_is_help=True)


@app.command("list")
def list_command() -> None:
    """List the models every command accepts (built-ins, then installed entry points)."""
    from heterofl_edge.models.registry import model_listing

    rows = model_listing()
    width = max(len(name) for name, _, _ in rows) + 2
    source_width = max(len(source) for _, source, _ in rows) + 2
    for name, source, description in rows:
        typer.echo(f"{name:<{width}}{source:<{source_width}}{description}")
    typer.echo("or any package.module:factory (see the README, 'Bring your own model')")


@app.command()
def summary(
    model: ModelOption = "conv",
    rate: Annotated[
        list[str] | None, typer.Option(help="Extra rates in (0, 1] to list after levels a..e.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print level, rate, parameters, FLOPs and space (MB), counted as in the paper."""
    from heterofl_edge.complexity import format_count, measure_complexity
    from heterofl_edge.models import get_architecture

    arch = get_architecture(model)
    rates = [level.rate for level in Level] + [parse_rate(r) for r in rate or []]
    rows = [measure_complexity(arch, r) for r in rates]
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "level": rate_label(c.rate),
                        "rate": c.rate,
                        "parameters": c.parameters,
                        "flops": c.flops,
                        "space_mb": round(c.space_mb, 4),
                    }
                    for c in rows
                ],
                indent=2,
            )
        )
        return
    typer.echo(f"{arch.name}: {arch.description}")
    typer.echo(f"{'level':<6}{'rate':>8}{'parameters':>14}{'FLOPs':>12}{'space (MB)':>12}")
    for c in rows:
        typer.echo(
            f"{rate_label(c.rate):<6}{c.rate:>8.4g}{format_count(c.parameters):>14}"
            f"{format_count(c.flops):>12}{c.space_mb:>12.2f}"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) if shape else "()"


def _print_table(arch: Architecture) -> None:
    from heterofl_edge.models.check import describe_dims, spec_inference

    inference = spec_inference(arch)
    probes = inference.rates[1:]
    header = ["tensor", "kind", "shape at 1", "dimensions", *[f"at {r:g}" for r in probes]]
    rows = [
        [
            t.name,
            ("param" if t.trainable else "buffer") + (" *" if t.overridden else ""),
            _shape(t.shapes[0]),
            describe_dims(t.dims),
            *[_shape(s) for s in t.shapes[1:]],
        ]
        for t in inference.tensors
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if any(t.overridden for t in inference.tensors):
        typer.echo("* dimensions set by ModelInterface.overrides")


def _onnx_check(arch: Architecture, rate: float) -> CheckResult:
    from exporter.config import ExportConfig, Format
    from exporter.pipeline import export_level
    from heterofl_edge.models.check import CheckResult

    with tempfile.TemporaryDirectory(prefix="heterofl-check-") as tmp:
        folder = export_level(
            ExportConfig(model=arch.name, rate=rate, formats=(Format.onnx,), batch_size=4),
            Path(tmp),
        )
        manifest = json.loads((folder / "manifest.json").read_text())
    found = manifest["verification"]["results"]["onnx"]
    steps = manifest["verification"]["steps"]
    return CheckResult(
        "onnx",
        True,
        f"train_step, evaluate{', statistics' if manifest['bn_layers'] else ''} at level "
        f"{rate_label(rate)}: {steps} SGD steps within "
        f"{found['train_step_max_weight_diff']:.1e} of eager PyTorch (bound {found['bound']:.0e})",
    )


@app.command()
def check(
    model: ModelArgument,
    export: Annotated[
        bool,
        typer.Option(
            "--export/--no-export", help="Export the training step to ONNX and verify it."
        ),
    ] = True,
    level: Annotated[str, typer.Option(help="Level (or rate) of the ONNX parity check.")] = "e",
) -> None:
    """Check that MODEL works with HeteroFL; print the slicing spec found and each check."""
    from heterofl_edge.models import get_architecture
    from heterofl_edge.models.check import check_model, run_check

    export_rate = parse_rate(level)
    arch = get_architecture(model)
    typer.echo(f"{arch.name}: {arch.description} ({arch.source})")
    typer.echo(
        f"task {arch.task.value}; input {arch.input_shape} "
        f"{str(arch.input_dtype).removeprefix('torch.')}; {arch.num_classes} classes"
    )
    typer.echo("")
    _print_table(arch)
    typer.echo("")
    results = check_model(arch)
    if export:
        typer.echo(f"exporting level {rate_label(export_rate)} to ONNX and verifying it ...")
        results.append(run_check("onnx", lambda: _onnx_check(arch, export_rate)))
    for r in results:
        typer.echo(f"{'ok' if r.ok else 'FAIL':<6}{r.name:<13}{r.detail}")
    failed = [r for r in results if not r.ok]
    if failed:
        first = failed[0]
        raise ModelError(
            f"{arch.name} fails the {first.name} check: {first.detail}",
            first.hint or "see the checks above",
        )
    typer.echo(f"{arch.name} works with HeteroFL")
