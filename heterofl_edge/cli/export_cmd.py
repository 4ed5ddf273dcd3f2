"""``heterofl-edge export``: on-device training artifacts for one level or all."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heterofl_edge.cli.options import ModelOption, parse_choice
from heterofl_edge.errors import ConfigError
from heterofl_edge.levels import Level, parse_rate


def export(
    model: ModelOption = "conv",
    level: Annotated[str, typer.Option(help="Level a..e, 'all' for a..e, or use --rate.")] = "all",
    rate: Annotated[
        float | None, typer.Option(help="Any width rate in (0, 1]; overrides --level.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx, executorch or all.")] = "all",
    out: Annotated[
        Path, typer.Option(help="Output folder; each level goes to MODEL-LEVEL/.")
    ] = Path("artifacts"),
    batch_size: Annotated[
        int, typer.Option(help="ExecuTorch batch size and verification batch (ONNX takes any).")
    ] = 10,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Check every artifact against PyTorch.")
    ] = True,
    executorch_kernels: Annotated[
        str,
        typer.Option(
            help="ExecuTorch training program: xnnpack (delegated matmuls, fast) or "
            "portable (portable kernels only, for comparison)."
        ),
    ] = "xnnpack",
    tolerance: Annotated[
        float | None, typer.Option(help="Largest weight difference verification accepts [1e-4].")
    ] = None,
) -> None:
    """Export a level's sub-model as ONNX and ExecuTorch training programs with a manifest."""
    from exporter.config import VERIFY_TOLERANCE, ExportConfig, Format, Kernels
    from exporter.pipeline import export_level
    from heterofl_edge.models import get_architecture

    arch = get_architecture(model)
    if rate is not None:
        rates = [parse_rate(rate)]
    elif level.strip().lower() == "all":
        rates = [lvl.rate for lvl in Level]
    else:
        rates = [parse_rate(level)]
    try:
        formats = (Format(fmt.strip().lower()),)
    except ValueError:
        raise ConfigError(f"unknown format {fmt!r}", "use onnx, executorch or all") from None
    kernels = parse_choice(Kernels, executorch_kernels, "ExecuTorch kernels")
    if tolerance is not None and not tolerance > 0:
        raise ConfigError(f"tolerance must be positive, got {tolerance}")
    for r in rates:
        config = ExportConfig(
            model=arch.name,
            rate=r,
            formats=formats,
            batch_size=batch_size,
            verify=verify,
            executorch_kernels=kernels,
            tolerance=tolerance if tolerance is not None else VERIFY_TOLERANCE,
        )
        folder = export_level(config, out, progress=typer.echo)
        typer.echo(f"manifest: {folder / 'manifest.json'}")
