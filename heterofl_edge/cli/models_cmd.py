"""``heterofl-edge models summary``: parameters, FLOPs and space per level."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from heterofl_edge.complexity import format_count, measure_complexity
from heterofl_edge.levels import Level, parse_rate, rate_label
from heterofl_edge.models import ModelName, get_architecture

app = typer.Typer(help="Inspect the width-scalable models.", no_args_is_help=True)


@app.command()
def summary(
    model: Annotated[ModelName, typer.Option(help="Model family.")] = ModelName.conv,
    rate: Annotated[
        list[str] | None, typer.Option(help="Extra rates in (0, 1] to list after levels a..e.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print level, rate, parameters, FLOPs and space (MB), counted as in the paper."""
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
