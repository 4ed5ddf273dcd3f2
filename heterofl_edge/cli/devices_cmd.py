"""``heterofl-edge devices simulate``: a fleet of device processes against a coordinator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heterofl_edge.cli.data_cmd import DataDirOption
from heterofl_edge.errors import ConfigError
from heterofl_edge.partition import Split

app = typer.Typer(help="Simulated devices.", no_args_is_help=True)


@app.command()
def simulate(
    coordinator: Annotated[str, typer.Option(help="Coordinator URL, e.g. http://127.0.0.1:8080.")],
    data_dir: DataDirOption = None,
    n: Annotated[int, typer.Option("--n", help="Number of devices.")] = 20,
    data: Annotated[
        str,
        typer.Option(help="Training data: mnist, imagefolder, arrays, wikitext2 (see 'device')."),
    ] = "mnist",
    image_size: Annotated[int, typer.Option(help="imagefolder: pixels per side.")] = 32,
    channels: Annotated[int, typer.Option(help="imagefolder: 3 (RGB) or 1 (greyscale).")] = 3,
    split: Annotated[Split, typer.Option(help="Data partition across devices.")] = Split.iid,
    profiles: Annotated[
        Path | None, typer.Option(help="JSON list of capabilities, used round-robin.")
    ] = None,
    train_examples: Annotated[
        int | None, typer.Option(help="Use this many training examples.")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the data split (match the coordinator's).")
    ] = 0,
    work_dir: Annotated[Path, typer.Option(help="Logs and artifact caches.")] = Path("runs/fleet"),
    enrollment_token: Annotated[
        str | None,
        typer.Option(
            envvar="HETEROFL_ENROLLMENT_TOKEN",
            help="The coordinator's enrollment token, where it requires one.",
        ),
    ] = None,
    operator_token: Annotated[
        str | None,
        typer.Option(
            envvar="HETEROFL_OPERATOR_TOKEN",
            help="The coordinator's operator token, where its round history needs one.",
        ),
    ] = None,
    ca_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate of an HTTPS coordinator with a self-signed one."),
    ] = None,
    unreachable_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds the fleet and its devices keep retrying while the coordinator is "
            "unreachable (a restart) before they give up."
        ),
    ] = 900.0,
) -> None:
    """Start N device processes with mixed capabilities and follow the rounds."""
    from device_sim.fleet import Fleet, FleetConfig, describe_round, load_profiles
    from device_sim.worker import DeviceData
    from heterofl_edge.cli.options import parse_choice

    chosen = parse_choice(DeviceData, data, "data")
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if data_dir is None:
        raise ConfigError("no data directory given", "pass --data-dir or set HETEROFL_DATA_DIR")
    if not unreachable_timeout > 0:
        raise ConfigError(f"--unreachable-timeout must be positive, got {unreachable_timeout}")
    if ca_cert is not None and not ca_cert.is_file():
        raise ConfigError(f"--ca-cert {ca_cert} is not a file")
    options = ["--data", chosen.value]
    if chosen is DeviceData.imagefolder:
        options += ["--image-size", str(image_size), "--channels", str(channels)]
    fleet = Fleet(
        FleetConfig(
            coordinator,
            data_dir,
            n,
            split.value,
            seed,
            train_examples,
            load_profiles(profiles),
            work_dir,
            device_options=options,
            enrollment_token=enrollment_token,
            operator_token=operator_token,
            ca_cert=ca_cert,
            unreachable_seconds=unreachable_timeout,
        ),
        log=typer.echo,
    )
    try:
        fleet.start()
        fleet.follow(lambda record: typer.echo(describe_round(record)))
    finally:
        fleet.stop()
