"""The ``heterofl-edge`` command line: one module per command, assembled here.

Library errors (``HeteroFLError``) become a one-line ``error:`` message with a
hint and exit code 2; nothing else is translated, so a bug still shows its
traceback.
"""

from __future__ import annotations

import sys

import typer

from heterofl_edge.cli import (
    coordinator_cmd,
    data_cmd,
    demo_cmd,
    devices_cmd,
    export_cmd,
    models_cmd,
    simulate_cmd,
)
from heterofl_edge.errors import HeteroFLError

__all__ = ["app", "main"]

app = typer.Typer(
    name="heterofl-edge",
    help="HeteroFL on real devices: width-scalable models, federated simulation, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_cmd.app, name="models")
app.add_typer(data_cmd.app, name="data")
app.add_typer(coordinator_cmd.app, name="coordinator")
app.add_typer(devices_cmd.app, name="devices")
app.command("simulate")(simulate_cmd.simulate)
app.command("export")(export_cmd.export)
app.command("demo")(demo_cmd.demo)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        app(args=argv, prog_name="heterofl-edge", standalone_mode=True)
    except HeteroFLError as exc:
        typer.secho(f"error: {exc.message}", err=True, fg="red")
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
        sys.exit(130)
