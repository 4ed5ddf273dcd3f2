"""``heterofl-edge coordinator serve|repair``: the coordinator under a production WSGI server."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from heterofl_edge.cli.options import (
    BatchSizeOption,
    LocalEpochsOption,
    ModelDataOption,
    ModelOption,
    parse_choice,
)
from heterofl_edge.errors import ConfigError

if TYPE_CHECKING:
    from heterofl_edge.training import LocalTrainingConfig

app = typer.Typer(help="The coordinator service devices talk to.", no_args_is_help=True)

StateDirOption = Annotated[
    Path, typer.Option(help="Folder for the database, checkpoints, artifacts.")
]


def training_settings(
    model: str,
    data: str | None,
    lr: float | None,
    local_epochs: int | None,
    batch_size: int | None,
) -> tuple[str, float, LocalTrainingConfig]:
    """The data set, learning rate and local training of a run.

    What is not given is the paper's for ``model`` (Table 6), as in ``simulate``.
    """
    from heterofl_edge.simulation import dataset_for, local_training, paper_settings

    chosen_data = dataset_for(model, data)  # ConfigError: no default, or another task's data
    return (
        chosen_data,
        paper_settings(model).lr if lr is None else lr,
        local_training(model, local_epochs, batch_size),
    )


@app.command()
def serve(
    state_dir: StateDirOption,
    model: ModelOption = "conv",
    mode: Annotated[
        str, typer.Option(help="Levels in play, e.g. a-b-c-d-e or a2-e8.")
    ] = "a-b-c-d-e",
    policy: Annotated[
        str,
        typer.Option(
            help="profile (each device at the level its measured profile fits, re-leveled "
            "after every round), fix or dynamic (the paper's, from --mode)."
        ),
    ] = "profile",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 10,
    fraction: Annotated[float, typer.Option(help="Share of devices selected per round.")] = 0.1,
    min_devices: Annotated[int, typer.Option(help="Live devices needed to open a round.")] = 1,
    min_uploads: Annotated[int, typer.Option(help="Uploads needed to aggregate a round.")] = 1,
    round_seconds: Annotated[float, typer.Option(help="Training deadline per round.")] = 600.0,
    stats_seconds: Annotated[
        float, typer.Option(help="Deadline of the sBN statistics query.")
    ] = 120.0,
    statistics: Annotated[
        str,
        typer.Option(help="Who reports sBN statistics: round (the uploaders) or all live devices."),
    ] = "round",
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate (paper: conv 0.01; resnet18 and transformer 0.1)."),
    ] = None,
    local_epochs: LocalEpochsOption = None,
    batch_size: BatchSizeOption = None,
    seed: Annotated[int, typer.Option(help="Seed for selection, levels and initial weights.")] = 0,
    eval_data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="HETEROFL_DATA_DIR",
            help="Folder of the --data set whose test split evaluates the global model.",
        ),
    ] = None,
    data: ModelDataOption = None,
    eval_examples: Annotated[
        int | None,
        typer.Option(
            help="Evaluate on N test examples, those simulate --test-examples N scores for the "
            "same --seed (default: all)."
        ),
    ] = None,
    formats: Annotated[
        str, typer.Option(help="Artifact formats to offer devices: onnx, or onnx,executorch.")
    ] = "onnx",
    verify_artifacts: Annotated[
        bool, typer.Option(help="Verify each exported program against eager PyTorch.")
    ] = True,
    artifacts: Annotated[
        bool,
        typer.Option(
            help="Export the levels' programs at start-up (--no-artifacts: protocol tests, "
            "load benchmarks; devices then cannot train)."
        ),
    ] = True,
    device_timeout: Annotated[
        float, typer.Option(help="Seconds without a request after which a device is offline.")
    ] = 30.0,
    poll_seconds: Annotated[
        float, typer.Option(help="How often waiting devices ask for a task.")
    ] = 2.0,
    threads: Annotated[int, typer.Option(help="WSGI worker threads.")] = 16,
    connection_limit: Annotated[
        int, typer.Option(help="Concurrent connections the server accepts.")
    ] = 1000,
    body_timeout: Annotated[
        float,
        typer.Option(help="Seconds a request (or its reply) may stall before it is cut off (408)."),
    ] = 30.0,
    request_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a request's headers may take; its body then has Content-Length / "
            "--min-transfer-rate more (408 after)."
        ),
    ] = 15.0,
    min_transfer_rate: Annotated[
        float,
        typer.Option(
            help="Bytes per second a request must arrive at after its first --request-timeout "
            "seconds (408 below)."
        ),
    ] = 4096.0,
    silent_connection_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may stay open without sending a byte.")
    ] = 10.0,
    idle_timeout: Annotated[
        float, typer.Option(help="Seconds a keep-alive connection may wait for its next request.")
    ] = 15.0,
    connections_per_address: Annotated[
        int,
        typer.Option(
            help="Connections one client address may hold (503 beyond); behind a reverse proxy, "
            "set it to --connection-limit."
        ),
    ] = 64,
    demo_data: Annotated[
        Path | None,
        typer.Option(
            help="Serve browser devices deterministic shards of the --data set in this folder "
            "(demo only)."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate: serve HTTPS (a phone's secure context).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM key of --tls-cert.")] = None,
    log_format: Annotated[
        str, typer.Option(help="plain, or json: one JSON object per line (with request ids).")
    ] = "plain",
    torch_threads: Annotated[
        int,
        typer.Option(help="Threads for aggregation and evaluation (leave cores for requests)."),
    ] = 1,
) -> None:
    """Run the coordinator; an existing state folder resumes where it stopped."""
    import torch

    from coordinator.app import create_app
    from coordinator.config import CoordinatorConfig, LevelPolicy
    from coordinator.logs import configure as configure_logs
    from coordinator.server import ServerLimits, make_server, make_tls_server
    from heterofl_edge.engine import StatisticsClients

    chosen = parse_choice(LevelPolicy, policy, "policy")
    eval_data, chosen_lr, local = training_settings(model, data, lr, local_epochs, batch_size)
    stats = parse_choice(StatisticsClients, statistics, "statistics")
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is outside 1..65535")
    if eval_examples is not None and eval_examples < 1:
        raise ConfigError(f"--eval-examples must be at least 1, got {eval_examples}")
    if torch_threads < 1:
        raise ConfigError(f"--torch-threads must be at least 1, got {torch_threads}")
    for name, seconds in (
        ("--round-seconds", round_seconds),
        ("--stats-seconds", stats_seconds),
        ("--device-timeout", device_timeout),
        ("--poll-seconds", poll_seconds),
    ):
        if not seconds > 0:
            raise ConfigError(f"{name} must be positive, got {seconds}")
    limits = ServerLimits(  # ConfigError naming the flag for a bad value
        threads=threads,
        connection_limit=connection_limit,
        body_timeout=body_timeout,
        idle_timeout=idle_timeout,
        request_timeout=request_timeout,
        min_transfer_rate=min_transfer_rate,
        silent_connection_timeout=silent_connection_timeout,
        connections_per_address=connections_per_address,
    )
    if log_format not in ("plain", "json"):
        raise ConfigError(f"unknown log format {log_format!r}", "use plain or json")
    configure_logs(json_lines=log_format == "json")
    torch.set_num_threads(torch_threads)
    config = CoordinatorConfig(
        state_dir=state_dir,
        model=model,
        mode=mode,
        policy=chosen,
        rounds=rounds,
        fraction=fraction,
        min_devices=min_devices,
        min_uploads=min_uploads,
        round_seconds=round_seconds,
        stats_seconds=stats_seconds,
        statistics=stats,
        lr=chosen_lr,
        eval_data_dir=eval_data_dir,
        eval_data=eval_data,
        eval_examples=eval_examples,
        demo_data_dir=demo_data,
        local=local,
        artifact_formats=_formats(formats),
        artifact_verify=verify_artifacts,
        build_artifacts=artifacts,
        seed=seed,
        device_timeout=device_timeout,
        poll_seconds=poll_seconds,
        heartbeat_seconds=max(0.5, min(5.0, device_timeout / 4)),
    )
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", "give both, or neither")
    limits = dataclasses.replace(limits, max_body_bytes=config.max_upload_bytes)
    application = create_app(config)
    coordinator = application.extensions["heterofl"]
    scheme = "http"
    try:
        if tls_cert is not None and tls_key is not None:
            server: Any = make_tls_server(application, host, port, tls_cert, tls_key, limits)
            scheme = "https"
        else:
            server = make_server(application, host, port, limits)
    except BaseException:
        coordinator.close()
        raise
    root = f"{scheme}://{host}:{port}"
    typer.echo(
        f"coordinator for {model} ({mode}, policy {chosen.value}) on {root}/v1 "
        f"(live page {root}/, device page {root}/device/)"
    )

    def shut_down(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Both signals stop the server cleanly, even where SIGINT arrives ignored (a background
    # job of a non-interactive shell). Every acknowledged upload is already committed.
    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    server.close()
    coordinator.close()
    typer.echo("coordinator stopped")


@app.command()
def repair(
    state_dir: StateDirOption,
    discard_open_round: Annotated[
        bool,
        typer.Option(
            "--discard-open-round/--keep-open-round",
            help="Mark the open round failed and drop its stored results.",
        ),
    ] = True,
) -> None:
    """Make a damaged state folder usable again (the model keeps its last checkpoint)."""
    from coordinator.store import Store

    if not (state_dir / "coordinator.sqlite3").is_file():
        raise ConfigError(f"{state_dir} holds no coordinator state", "give the --state-dir to fix")
    store = Store(state_dir)
    try:
        if not discard_open_round:
            typer.echo("nothing to do")
            return
        number = store.discard_open_round("discarded by 'coordinator repair'")
    finally:
        store.close()
    if number is None:
        typer.echo("no open round: nothing to discard")
    else:
        typer.echo(f"round {number} discarded; the coordinator resumes at round {number + 1}")


def _formats(text: str) -> tuple[str, ...]:
    chosen = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in ("onnx", "executorch")]
    if unknown or not chosen:
        raise ConfigError(f"unknown artifact formats {text!r}", "use onnx or onnx,executorch")
    return chosen
