"""``heterofl-edge simulate``: HeteroFL on this machine's cores or a Ray cluster.

Any model on a data set of its task: conv on MNIST, resnet18 on an image
folder, the transformer on WikiText-2, or ``package.module:factory`` on
``package.module:loader``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from heterofl_edge.cli.data_cmd import AnyDataDirOption
from heterofl_edge.cli.options import parse_choice
from heterofl_edge.cli.spec_options import (
    federation_options,
)
from heterofl_edge.errors import ConfigError
from heterofl_edge.partition import Split

if TYPE_CHECKING:
    from heterofl_edge.simulated_time import SimulatedFleet


def _perplexity(value: float | None) -> str:
    return "inf" if value is None else f"{value:.2f}"  # the engine reports inf as None


@federation_options
def simulate(
    data_dir: AnyDataDirOption = None,
    clients: Annotated[
        int,
        typer.Option(
            help="Simulated clients (serve has none: its clients are the devices that register)."
        ),
    ] = 100,
    train_examples: Annotated[
        int | None,
        typer.Option(
            help="Use a random subset of this many training examples (text: the first rows; "
            "serve has none: devices bring their own data)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Client sessions at once, each in its own process with one torch thread "
            "[all cores; 1 runs them in this process]. The model is the same for any value.",
            min=1,
        ),
    ] = None,
    accelerator: Annotated[
        str, typer.Option(help="Where sessions run: cpu, cuda, or auto (cuda if present).")
    ] = "auto",
    backend: Annotated[
        str,
        typer.Option(help="local (this machine's processes) or ray (Ray tasks; extra 'ray')."),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="With --backend ray: the cluster to join, 'auto' or HOST:PORT "
            "[a private Ray on this machine]."
        ),
    ] = None,
    simulated_time: Annotated[
        bool,
        typer.Option(
            "--simulated-time",
            help="Give every client a device: a speed tier (--tiers, timed by the profile "
            "policy's step-time model) and an on/off availability (--availability); runs "
            "then report simulated wall-clock time, the same for any --workers, and "
            "--policy profile places clients.",
            rich_help_panel="Simulated time",
        ),
    ] = False,
    tiers: Annotated[
        str | None,
        typer.Option(
            help="Device tiers dealt round-robin: slowdown[@Mbit/s[@MB]], comma-separated "
            "[default: the demo's 1,3@50@1024,10@10@256].",
            rich_help_panel="Simulated time",
        ),
    ] = None,
    step_ms: Annotated[
        float | None,
        typer.Option(
            help="A 1x device's training step at the smallest level in play, in ms [default: 5].",
            rich_help_panel="Simulated time",
        ),
    ] = None,
    availability: Annotated[
        str | None,
        typer.Option(
            help="always, or ON,OFF: mean seconds of each client's online and offline "
            "spells (exponential, seeded) [default: always].",
            rich_help_panel="Simulated time",
        ),
    ] = None,
    round_seconds: Annotated[
        float | None,
        typer.Option(
            help="The synchronous round's deadline (stragglers miss it), the profile "
            "policy's budget and its re-leveling deadline [default: 600].",
            rich_help_panel="Simulated time",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last checkpoint (after a kill); "
            "the result is the same as an uninterrupted run.",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Output folder [runs/simulate-MODEL-MODE-SPLIT-sSEED].")
    ] = None,
    spec: dict[str, Any] | None = None,  # the federation options (federation_options)
) -> None:
    """Run HeteroFL; write per-round results as JSON, a learning curve and the model.

    Every round is checkpointed in OUT/journal, so that --resume can continue a killed run.
    The federation options are coordinator serve's, with the same names and defaults (but
    --policy's); serve's quorum, deadlines, liveness and service options have no
    counterpart: simulated clients are always there and answer at once.
    """
    from safetensors.torch import save as save_state

    from heterofl_edge.report import atomic_write_bytes, write_json, write_learning_curve
    from heterofl_edge.sessions import Accelerator
    from heterofl_edge.simulation import (
        Backend,
        Execution,
        RoundRecord,
        SimulationConfig,
        load_data,
        run_simulation,
    )

    chosen_backend = parse_choice(Backend, backend, "backend")
    settings = dict(spec or {})
    fleet = simulated_fleet(simulated_time, tiers, step_ms, availability, round_seconds)
    run = SimulationConfig(
        **settings, num_clients=clients, train_examples=train_examples, fleet=fleet
    )  # the config refuses impossible settings here, before any data is loaded
    if address is not None and chosen_backend is not Backend.ray:
        raise ConfigError("--address needs --backend ray", "add --backend ray, or drop --address")
    execution = Execution(
        workers, parse_choice(Accelerator, accelerator, "accelerator"), chosen_backend, address
    )
    mix = run.level_mix
    name = run.model.replace(":", "-").replace("/", "-")
    out = out or Path("runs") / f"simulate-{name}-{mix.name}-{run.split.value}-s{run.seed}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", "give a folder for the results")
    dataset = load_data(run, data_dir)
    typer.echo(
        f"HeteroFL {run.model} on {run.data_name} ({run.split.value}), mode {mix.name} "
        f"({mix.assignment.value}), {run.total_rounds} rounds, {run.num_clients} clients, "
        f"fraction {run.fraction:g}, {run.submodel.value} sub-models"
    )
    if run.buffered:
        typer.echo(
            f"buffered: {run.total_rounds} versions of {run.buffer_size} updates, staleness "
            f"{run.staleness}, server lr {run.server_lr:g}, max staleness {run.max_staleness}"
        )
    if run.fleet is not None:
        typer.echo(
            f"simulated time: tiers {', '.join(str(t) for t in run.fleet.tiers)}, step "
            f"{run.fleet.step_ms:g} ms, availability {run.fleet.availability or 'always'}, "
            f"deadline {run.fleet.round_seconds:g} s"
        )

    perplexity = run.metric == "perplexity"

    def on_round(record: RoundRecord) -> None:
        levels = " ".join(f"{k}:{v}" for k, v in record.levels.items())
        local = "" if record.local_accuracy is None else f"  local acc {record.local_accuracy:.4f}"
        score = (
            f"global ppl {_perplexity(record.global_perplexity)}"
            if perplexity
            else f"global acc {record.global_accuracy:.4f}"
        )
        private = ""
        if record.privacy is not None:
            private = (
                f"  epsilon {record.privacy['epsilon']:.3g} at delta {record.privacy['delta']:g}"
            )
        loss = "private" if run.private else f"{record.train_loss:.4f}"
        name = "version" if run.buffered else "round"
        timing = f"({record.round_seconds:.1f} s, {record.samples_per_second:.0f} samples/s)"
        if record.simulated_time is not None:
            timing = f"(simulated time {record.simulated_time:.0f} s)"
        if record.buffer is not None:
            timing = f"staleness {record.buffer['staleness']}  {timing}"
        typer.echo(
            f"{name} {record.round:>3}/{run.total_rounds}  lr {record.lr:g}  levels {levels}  "
            f"train loss {loss}  {score}{local}{private}  {timing}"
        )

    def on_client(done: int, total: int) -> None:
        typer.echo(f"  clients trained {done}/{total}\r", nl=False, err=True)
        if done == total:
            typer.echo(" " * 40 + "\r", nl=False, err=True)

    result = run_simulation(
        run,
        dataset,
        on_round=on_round,
        on_client=on_client,
        execution=execution,
        journal_dir=out / "journal",
        resume=resume,
    )
    if result.stopped is not None:
        typer.echo(f"stopped early: {result.stopped}")
    write_json(out / "results.json", result.to_json())
    atomic_write_bytes(out / "model.safetensors", save_state(result.global_state))
    if not result.rounds:  # a privacy budget that no round fits
        typer.echo(f"no round ran; wrote results.json and the initial model.safetensors in {out}")
        return
    final = result.rounds[-1]
    title = f"HeteroFL {run.model} {mix.name} {run.split.value}"
    if perplexity:
        points = [(0, result.initial_perplexity)]
        points += [(r.round, r.global_perplexity) for r in result.rounds]
        curve = [(n, v) for n, v in points if v is not None]  # None: not finite
        write_learning_curve(out / "learning_curve.png", title, {"global": curve}, "perplexity")
        summary = f"initial global perplexity {_perplexity(result.initial_perplexity)} -> "
        summary += f"final {_perplexity(final.global_perplexity)}"
    else:
        curves = {
            "global": [(0, result.initial_accuracy)]
            + [(r.round, r.global_accuracy) for r in result.rounds]
        }
        if run.split is Split.non_iid:
            curves["local"] = [(r.round, r.local_accuracy or 0.0) for r in result.rounds]
        write_learning_curve(out / "learning_curve.png", title, curves)
        summary = f"initial global accuracy {result.initial_accuracy:.4f} -> "
        summary += f"final {final.global_accuracy:.4f}"
    moved = result.to_json()["transfer"]["bytes_per_device_round"]
    if moved["total"] is not None:
        summary += (
            f"; {moved['total'] / 2**20:.2f} MiB per device-round "
            f"({run.download_encoding} down, {run.upload_encoding} up)"
        )
    typer.echo(f"{summary}; wrote results.json, learning_curve.png and model.safetensors in {out}")


def simulated_fleet(
    enabled: bool,
    tiers: str | None,
    step_ms: float | None,
    availability: str | None,
    round_seconds: float | None,
) -> SimulatedFleet | None:
    """The ``--simulated-time`` options as a fleet (None without it); ``ConfigError``."""
    from heterofl_edge.simulated_time import SimulatedFleet, parse_availability, parse_tiers

    given = {
        "--tiers": tiers,
        "--step-ms": step_ms,
        "--availability": availability,
        "--round-seconds": round_seconds,
    }
    if not enabled:
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise ConfigError(f"{named[0]} needs --simulated-time", "add --simulated-time")
        return None
    defaults = SimulatedFleet()
    return SimulatedFleet(
        tiers=parse_tiers(tiers) if tiers is not None else defaults.tiers,
        step_ms=step_ms if step_ms is not None else defaults.step_ms,
        availability=parse_availability(availability) if availability is not None else None,
        round_seconds=round_seconds if round_seconds is not None else defaults.round_seconds,
    )
