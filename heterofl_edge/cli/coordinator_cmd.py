"""``heterofl-edge coordinator serve|repair``: the coordinator under a production WSGI server."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from heterofl_edge.cli.spec_options import (
    federation_options,
)
from heterofl_edge.errors import ConfigError

if TYPE_CHECKING:
    from coordinator.admission import AdmissionConfig

app = typer.Typer(help="The coordinator service devices talk to.", no_args_is_help=True)

StateDirOption = Annotated[
    Path, typer.Option(help="Folder for the database, checkpoints, artifacts.")
]


@app.command()
@federation_options
def serve(
    state_dir: StateDirOption,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="HETEROFL_DATA_DIR",
            help="Folder of the --data set whose test split evaluates the global model after "
            "each round (none: no evaluation).",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    min_devices: Annotated[int, typer.Option(help="Live devices needed to open round 1.")] = 1,
    min_uploads: Annotated[int, typer.Option(help="Uploads needed to aggregate a round.")] = 1,
    round_seconds: Annotated[float, typer.Option(help="Training deadline per round.")] = 600.0,
    stats_seconds: Annotated[
        float, typer.Option(help="Deadline of the sBN statistics query.")
    ] = 120.0,
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
        int | None,
        typer.Option(
            help="Connections one client address may hold (503 beyond). Default: 64 when "
            "--host is not a loopback address, else --connection-limit (every client of a "
            "loopback coordinator is this machine). Behind a reverse proxy, set it to "
            "--connection-limit.",
            show_default=False,
        ),
    ] = None,
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
    enrollment_token: Annotated[
        str | None,
        typer.Option(
            envvar="HETEROFL_ENROLLMENT_TOKEN",
            help="Devices must present this token to register: a token of 16+ characters, "
            "'auto' (made once, kept in the state folder) or 'none' (open registration). "
            "Default: auto when --host is not a loopback address, else none. Browser devices "
            "get it inside the device link printed at start-up.",
        ),
    ] = None,
    operator_token: Annotated[
        str | None,
        typer.Option(
            envvar="HETEROFL_OPERATOR_TOKEN",
            help="Bearer token for the device list, the round history and /metrics (the live "
            "page's link carries it): a token, auto or none; default as --enrollment-token.",
        ),
    ] = None,
    registrations_per_minute: Annotated[
        float | None,
        typer.Option(
            help="Registrations one client address may make per minute, after a burst of "
            "100 (0: no limit). Default: 60 when --host is not a loopback address, else no "
            "limit.",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        str, typer.Option(help="plain, or json: one JSON object per line (with request ids).")
    ] = "plain",
    torch_threads: Annotated[
        int,
        typer.Option(help="Threads for aggregation and evaluation (leave cores for requests)."),
    ] = 1,
    spec: dict[str, Any] | None = None,  # the federation options (federation_options)
) -> None:
    """Run the coordinator; an existing state folder resumes where it stopped.

    The federation options are simulate's, with the same names and defaults (but
    --policy's). Simulate's --clients, --train-examples, --workers, --accelerator,
    --backend, --address, --resume and --out have no counterpart: devices bring their
    own data and hardware, and the state folder is the run's journal.
    """
    stop = _StopSignals()  # from here on SIGTERM and SIGINT stop it cleanly, at any moment
    from coordinator.admission import AdmissionConfig, resolve_token
    from coordinator.app import create_app
    from coordinator.config import CoordinatorConfig
    from coordinator.logs import configure as configure_logs
    from coordinator.server import ServerLimits, make_server, make_tls_server
    from heterofl_edge.spec import Policy

    settings = dict(spec or {})
    settings.setdefault("policy", Policy.profile)  # devices measure themselves
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is outside 1..65535")
    if torch_threads < 1:
        raise ConfigError(f"--torch-threads must be at least 1, got {torch_threads}")
    if log_format not in ("plain", "json"):
        raise ConfigError(f"unknown log format {log_format!r}", "use plain or json")
    exposed = not _is_loopback(host)
    connections_per_address, registrations_per_minute = per_address_limits(
        exposed, connection_limit, connections_per_address, registrations_per_minute
    )
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
    if registrations_per_minute < 0 or not math.isfinite(registrations_per_minute):
        raise ConfigError(
            f"--registrations-per-minute must be 0 (no limit) or positive, got "
            f"{registrations_per_minute}"
        )
    run = CoordinatorConfig(  # validated here, before anything is opened
        **settings,
        state_dir=state_dir,
        min_devices=min_devices,
        min_uploads=min_uploads,
        round_seconds=round_seconds,
        stats_seconds=stats_seconds,
        data_dir=data_dir,
        demo_data_dir=demo_data,
        artifact_formats=_formats(formats),
        artifact_verify=verify_artifacts,
        build_artifacts=artifacts,
        device_timeout=device_timeout,
        poll_seconds=poll_seconds,
    )
    admission = AdmissionConfig(
        enrollment_token=resolve_token(
            enrollment_token or ("auto" if exposed else "none"), "enrollment", state_dir
        ),
        operator_token=resolve_token(
            operator_token or ("auto" if exposed else "none"), "operator", state_dir
        ),
        registrations_per_minute=registrations_per_minute,
    )
    run = dataclasses.replace(run, admission=admission)
    configure_logs(json_lines=log_format == "json")
    import torch

    torch.set_num_threads(torch_threads)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together", "give both, or neither")
    limits = dataclasses.replace(limits, max_body_bytes=run.max_upload_bytes)
    application = create_app(run)
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
    typer.echo(
        announcement(
            run.model, run.level_mix.name, run.policy_name, scheme, host, port, admission, exposed
        )
    )
    with contextlib.suppress(KeyboardInterrupt):
        stop.run(server.run)
    server.close()
    coordinator.close()  # waits for the round engine's next safe point: nothing abandoned
    typer.echo("coordinator stopped")
    if stop.received == signal.SIGINT:
        raise typer.Exit(130)


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
    """Make a damaged state folder usable again, moving aside (never deleting) what it replaces.

    A lost or emptied database is rebuilt from the latest sound checkpoint; a damaged
    checkpoint gives way to the latest sound one before it; damaged artifacts are moved
    aside and exported again at the next start.
    """
    from coordinator.recovery import repair as repair_folder

    for line in repair_folder(state_dir, discard_open_round):
        typer.echo(line)


def announcement(
    model: str,
    mode: str,
    policy: str,
    scheme: str,
    host: str,
    port: int,
    admission: AdmissionConfig,
    qr: bool,
) -> str:
    """What ``serve`` prints once it listens: where the API, live page and device page are.

    The links carry the tokens in their fragment (never sent to a server); with
    ``qr``, the device link follows as a QR code a phone's camera opens.
    """
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    root = f"{scheme}://{shown}:{port}"
    operator, enroll = admission.operator_token, admission.enrollment_token
    live = f"{root}/" + (f"#operator={operator}" if operator else "")
    device = f"{root}/device/" + (f"#enroll={enroll}" if enroll else "")
    lines = [
        f"coordinator for {model} ({mode}, policy {policy}) on {root}/v1",
        f"live page:   {live}",
        f"device link: {device}",
    ]
    if admission.enrollment_token:
        lines.append(
            "devices register with the enrollment token only: the device link carries it; "
            "Python devices take --enrollment-token"
        )
    if host in ("0.0.0.0", "::"):
        lines.append(f"(if phones cannot resolve {shown!r}, use this machine's LAN address)")
    if qr:
        import io

        import segno

        code = io.StringIO()
        segno.make(device, error="m").terminal(out=code, compact=True, border=1)
        lines += ["scan to open the device page:", code.getvalue().rstrip("\n")]
    return "\n".join(lines)


def per_address_limits(
    exposed: bool,
    connection_limit: int,
    connections: int | None,
    registrations_per_minute: float | None,
) -> tuple[int, float]:
    """The per-address connection cap and registration rate, where not given.

    They guard a coordinator others can reach (64 connections, 60 registrations a
    minute); on loopback every client is this machine (a simulated fleet, a
    benchmark), which they would only get in the way of.
    """
    if connections is None:
        connections = 64 if exposed else connection_limit
    if registrations_per_minute is None:
        registrations_per_minute = 60.0 if exposed else 0.0
    return connections, registrations_per_minute


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _StopSignals:
    """SIGTERM and SIGINT stop the coordinator cleanly whenever they arrive.

    Before the server runs (validation, opening the state folder) a signal is
    only recorded, and the command stops once start-up is complete, so that no
    half-opened state is left behind; while the server runs, the first signal
    ends it. Later signals are ignored: the stop is under way and waits for the
    round engine's next safe point. Both signals are handled even where SIGINT
    arrives ignored (a background job of a non-interactive shell).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._running = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self._running:
            raise KeyboardInterrupt

    def run(self, serve: Callable[[], None]) -> None:
        """``serve()`` until a stop signal (at once, if one came during start-up)."""
        if self.received is not None:
            return
        self._running = True
        try:
            serve()
        finally:
            self._running = False


def _formats(text: str) -> tuple[str, ...]:
    chosen = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in ("onnx", "executorch")]
    if unknown or not chosen:
        raise ConfigError(f"unknown artifact formats {text!r}", "use onnx or onnx,executorch")
    return chosen
