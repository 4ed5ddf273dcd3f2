"""``heterofl-edge device``: one device against a coordinator (a Raspberry Pi, a laptop).

What a device install (``pip install heterofl-edge``, no extras) runs: numpy,
onnxruntime, safetensors and requests, never torch. ``heterofl-edge device
install-service`` (``heterofl_edge.cli.service_cmd``) writes a systemd unit
that runs this command as a service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from heterofl_edge.cli import service_cmd
from heterofl_edge.cli.data_cmd import DataDirOption
from heterofl_edge.errors import ConfigError
from heterofl_edge.partition import Split

app = typer.Typer(
    help="One device against a coordinator (a Raspberry Pi, a laptop).",
    invoke_without_command=True,
)
app.command(
    "install-service",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(service_cmd.install_service)

DEFAULT_CACHE = Path.home() / ".cache" / "heterofl-edge"
CAPABILITIES_HELP = (
    "Simulated limits as JSON: cpu_slowdown, bandwidth_mbps, memory_mb, dropout "
    "(e.g. '{\"cpu_slowdown\": 3}'; a real device leaves them out)."
)


@app.callback()
def device(
    ctx: typer.Context,
    coordinator: Annotated[
        str | None, typer.Option(help="Coordinator URL, e.g. http://laptop.local:8080.")
    ] = None,
    data_dir: DataDirOption = None,
    shard: Annotated[int, typer.Option(help="This device's shard of the split, from 0.")] = 0,
    clients: Annotated[
        int, typer.Option(help="Shards in the split (1: all of the training data).")
    ] = 1,
    split: Annotated[Split, typer.Option(help="How the training data is split.")] = Split.iid,
    seed: Annotated[
        int, typer.Option(help="Seed of the data split (match the coordinator's).")
    ] = 0,
    train_examples: Annotated[
        int | None, typer.Option(help="Split this many training examples (default: all).")
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option(help="Training runtime: onnx (default), or executorch (extra 'executorch')."),
    ] = None,
    cache: Annotated[
        Path, typer.Option(help="Folder for the level's downloaded artifacts.")
    ] = DEFAULT_CACHE,
    capabilities: Annotated[str, typer.Option(help=CAPABILITIES_HELP)] = "{}",
    data: Annotated[
        str,
        typer.Option(
            help="Training data in --data-dir: mnist (idx files), imagefolder "
            "(train/CLASS/*.png|jpg, read with the 'images' extra), arrays (train.safetensors "
            "from 'heterofl-edge data export', for any classification data set) or wikitext2 "
            "(train.txt, valid.txt, test.txt, for the transformer)."
        ),
    ] = "mnist",
    image_size: Annotated[
        int, typer.Option(help="imagefolder: pixels per side (the model's input, e.g. 32).")
    ] = 32,
    channels: Annotated[int, typer.Option(help="imagefolder: 3 (RGB) or 1 (greyscale).")] = 3,
    enrollment_token: Annotated[
        str | None,
        typer.Option(
            envvar="HETEROFL_ENROLLMENT_TOKEN",
            help="The coordinator's enrollment token, where it requires one (its start-up "
            "output prints it in the device link).",
        ),
    ] = None,
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            help="PEM certificate to trust for an HTTPS coordinator with a self-signed "
            "certificate (its --tls-cert file)."
        ),
    ] = None,
    unreachable_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to keep retrying while the coordinator is unreachable; then exit "
            "with code 5 (a service restarts it)."
        ),
    ] = 900.0,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder that keeps this device's registration (id and token, mode 0600): a "
            "restart resumes it. Default cache: STATE_DIR/cache."
        ),
    ] = None,
    max_memory_mb: Annotated[
        float | None,
        typer.Option(
            help="Never train a level whose training would take this process over this many "
            "MB; the coordinator is told at registration."
        ),
    ] = None,
) -> None:
    """Run one device: profile, register, train the rounds it is given, until done.

    --shard, --clients, --split and --seed pick this device's share of the
    training data the same way the simulation does. Exit codes: 0 done, 2 a
    usage error or a refusal, 4 token refused (without --state-dir), 5 the
    coordinator stayed unreachable.
    """
    if ctx.invoked_subcommand is not None:
        return
    from device_sim.device import Capabilities
    from device_sim.runtimes import get_runtime
    from device_sim.worker import DeviceData, WorkerConfig, run_worker
    from heterofl_edge.cli.options import parse_choice

    chosen_data = parse_choice(DeviceData, data, "data")
    if coordinator is None:
        raise ConfigError(
            "no coordinator given", "pass --coordinator URL, e.g. http://laptop.local:8080"
        )
    if data_dir is None:
        raise ConfigError("no data directory given", "pass --data-dir or set HETEROFL_DATA_DIR")
    try:
        limits = json.loads(capabilities)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--capabilities is not JSON: {exc}", CAPABILITIES_HELP) from None
    if not isinstance(limits, dict):
        raise ConfigError("--capabilities must be a JSON object", CAPABILITIES_HELP)
    if runtime is not None:
        limits["runtime"] = runtime
    chosen = Capabilities.from_json(limits)
    get_runtime(chosen.runtime)  # an unknown runtime or a missing extra stops here
    if ca_cert is not None and not ca_cert.is_file():
        raise ConfigError(
            f"--ca-cert {ca_cert} is not a file", "give the coordinator's PEM certificate"
        )
    if not unreachable_timeout > 0:
        raise ConfigError(f"--unreachable-timeout must be positive, got {unreachable_timeout}")
    if max_memory_mb is not None and not max_memory_mb > 0:
        raise ConfigError(f"--max-memory-mb must be positive, got {max_memory_mb:g}")
    if state_dir is not None and cache == DEFAULT_CACHE:
        cache = state_dir / "cache"
    code = run_worker(
        WorkerConfig(
            coordinator=coordinator,
            data_dir=data_dir,
            cache=cache,
            data=chosen_data,
            image_size=image_size,
            channels=channels,
            shard=shard,
            clients=clients,
            split=split,
            seed=seed,
            train_examples=train_examples,
            capabilities=chosen,
            enrollment_token=enrollment_token,
            ca_cert=ca_cert,
            unreachable_seconds=unreachable_timeout,
            state_dir=state_dir,
            max_memory_mb=max_memory_mb,
        )
    )
    if code:
        raise typer.Exit(code)
