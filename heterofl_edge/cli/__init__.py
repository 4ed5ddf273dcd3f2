"""The ``heterofl-edge`` command line: one module per command, assembled here.

Library errors (``HeteroFLError``) become a one-line ``error:`` message with a
hint and exit code 2; so does a package that a command needs and the install
lacks (``'heterofl-edge export' needs the 'server' extra: pip install ...``).
Nothing else is translated, so a bug still shows its traceback.

Command modules import only the torch-free core at the top and the rest inside
the command, so that a device install (no extras) assembles this command line.
"""

from __future__ import annotations

import sys

import typer

from heterofl_edge.cli import (
    coordinator_cmd,
    data_cmd,
    demo_cmd,
    device_cmd,
    devices_cmd,
    export_cmd,
    models_cmd,
    simulate_cmd,
)
from heterofl_edge.cli.extras import missing_extra
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
app.add_typer(device_cmd.app, name="device")
app.command("simulate")(simulate_cmd.simulate)
app.command("export")(export_cmd.export)
app.command("demo")(demo_cmd.demo)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, prog_name="heterofl-edge", standalone_mode=True)
    except ModuleNotFoundError as exc:
        error = missing_extra(exc, command_path(args))
        if error is None:
            raise
        _fail(error)
    except HeteroFLError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
        sys.exit(130)


def command_path(args: list[str]) -> str:
    """``heterofl-edge`` and the commands ``args`` name, e.g. ``heterofl-edge models check``."""
    words = ["heterofl-edge"]
    commands = getattr(typer.main.get_command(app), "commands", {})
    for arg in args:
        if arg not in commands:
            break
        words.append(arg)
        commands = getattr(commands[arg], "commands", {})
    return " ".join(words)


def _fail(exc: HeteroFLError) -> None:
    typer.secho(f"error: {exc.message}", err=True, fg="red")
    if exc.hint:
        typer.echo(f"hint: {exc.hint}", err=True)
    sys.exit(2)
