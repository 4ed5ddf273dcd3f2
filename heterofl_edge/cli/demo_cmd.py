"""``heterofl-edge demo``: the whole system on MNIST in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heterofl_edge.cli.data_cmd import DataDirOption
from heterofl_edge.errors import ConfigError


def demo(
    data_dir: DataDirOption = None,
    out: Annotated[Path, typer.Option(help="Folder for results, logs and state.")] = Path(
        "runs/demo"
    ),
    clients: Annotated[int, typer.Option(help="Devices in the fleet.")] = 6,
    rounds: Annotated[int, typer.Option(help="Rounds.")] = 3,
    mode: Annotated[str, typer.Option(help="Levels in play.")] = "a-b-c-d-e",
    policy: Annotated[
        str, typer.Option(help="profile (levels from each device's speed), fix or dynamic.")
    ] = "profile",
    round_seconds: Annotated[float, typer.Option(help="Training deadline per round.")] = 40.0,
) -> None:
    """Export artifacts, start a coordinator and a fleet on MNIST, run rounds, report."""
    from heterofl_edge.cli._demo import DemoConfig, run_demo
    from heterofl_edge.report import write_json, write_learning_curve

    if data_dir is None:
        raise ConfigError("no MNIST directory given", "pass --data-dir or set HETEROFL_DATA_DIR")
    if clients < 1 or rounds < 1:
        raise ConfigError("--clients and --rounds must be at least 1")
    result = run_demo(
        DemoConfig(
            data_dir=data_dir,
            out=out,
            clients=clients,
            rounds=rounds,
            mode=mode,
            policy=policy,
            round_seconds=round_seconds,
        ),
        log=typer.echo,
    )
    points = [
        (r["round"], r["metrics"]["evaluation"]["global_accuracy"])
        for r in result["rounds"]
        if (r["metrics"].get("evaluation") or {}).get("global_accuracy") is not None
    ]
    write_json(out / "results.json", result)
    write_learning_curve(
        out / "learning_curve.png", f"heterofl-edge demo ({mode})", {"global": points}
    )
    typer.echo(f"wrote {out / 'results.json'} and {out / 'learning_curve.png'}")
