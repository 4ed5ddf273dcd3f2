"""``heterofl-edge coordinator serve``: the coordinator under a production WSGI server."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Annotated

import typer

from heterofl_edge.errors import ConfigError
from heterofl_edge.models import ModelName

app = typer.Typer(help="The coordinator service devices talk to.", no_args_is_help=True)


@app.command()
def serve(
    state_dir: Annotated[
        Path, typer.Option(help="Folder for the database, checkpoints, artifacts.")
    ],
    model: Annotated[ModelName, typer.Option(help="Model family.")] = ModelName.conv,
    mode: Annotated[
        str, typer.Option(help="Levels in play, e.g. a-b-c-d-e or a2-e8.")
    ] = "a-b-c-d-e",
    policy: Annotated[
        str, typer.Option(help="profile (from each device's measured profile), fix or dynamic.")
    ] = "profile",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 10,
    fraction: Annotated[float, typer.Option(help="Share of devices selected per round.")] = 0.1,
    min_devices: Annotated[int, typer.Option(help="Devices needed before round 1 opens.")] = 1,
    min_uploads: Annotated[int, typer.Option(help="Uploads needed to aggregate a round.")] = 1,
    round_seconds: Annotated[float, typer.Option(help="Training deadline per round.")] = 600.0,
    stats_seconds: Annotated[
        float, typer.Option(help="Deadline of the sBN statistics query.")
    ] = 120.0,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.01,
    local_epochs: Annotated[int, typer.Option(help="Local epochs E per round.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Local batch size B.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for selection, levels and initial weights.")] = 0,
    eval_data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="HETEROFL_DATA_DIR", help="MNIST folder for evaluating the global model."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="WSGI worker threads.")] = 8,
    formats: Annotated[
        str, typer.Option(help="Artifact formats to offer devices: onnx, or onnx,executorch.")
    ] = "onnx",
) -> None:
    """Run the coordinator; an existing state folder resumes where it stopped."""
    import waitress

    from coordinator.app import create_app
    from coordinator.config import CoordinatorConfig, LevelPolicy
    from heterofl_edge.training import LocalTrainingConfig

    try:
        chosen = LevelPolicy(policy)
    except ValueError:
        raise ConfigError(f"unknown policy {policy!r}", "use profile, fix or dynamic") from None
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is outside 1..65535")
    config = CoordinatorConfig(
        state_dir=state_dir,
        model=model.value,
        mode=mode,
        policy=chosen,
        rounds=rounds,
        fraction=fraction,
        min_devices=min_devices,
        min_uploads=min_uploads,
        round_seconds=round_seconds,
        stats_seconds=stats_seconds,
        lr=lr,
        eval_data_dir=eval_data_dir,
        local=LocalTrainingConfig(epochs=local_epochs, batch_size=batch_size),
        artifact_formats=_formats(formats),
        seed=seed,
    )
    application = create_app(config)
    typer.echo(
        f"coordinator for {model.value} ({mode}, policy {chosen.value}) on http://{host}:{port}/v1"
    )

    def shut_down(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Both signals stop the server cleanly, even where SIGINT arrives ignored (a background
    # job of a non-interactive shell). Every accepted upload is already on disk.
    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    with contextlib.suppress(KeyboardInterrupt):
        waitress.serve(application, host=host, port=port, threads=threads, ident="heterofl-edge")
    typer.echo("coordinator stopped")


def _formats(text: str) -> tuple[str, ...]:
    chosen = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in ("onnx", "executorch")]
    if unknown or not chosen:
        raise ConfigError(f"unknown artifact formats {text!r}", "use onnx or onnx,executorch")
    return chosen
