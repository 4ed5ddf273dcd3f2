"""The federation spec's options, declared once for ``simulate`` and ``coordinator serve``.

Every setting of ``heterofl_edge.spec.FederationSpec`` is an option here, with
one name, one help text and one default, and both commands take all of them
(``tests/test_spec.py`` holds them to it). Options default to ``None``, so that
a command can tell a flag given from one left out: ``spec_settings`` merges,
from lowest to highest, the spec's defaults, a ``--config`` TOML file and the
flags given.

The one default that differs is ``--policy``'s: ``serve`` places devices by
their measured profile; ``simulate`` cannot (simulated clients time nothing)
and follows the mode's own rule.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer

from heterofl_edge.cli.options import check_data_name, check_model_name
from heterofl_edge.errors import ConfigError

__all__ = [
    "FEDERATION_OPTIONS",
    "AggregationSetting",
    "BatchSizeSetting",
    "BufferSizeSetting",
    "ConfigFileOption",
    "DataSetting",
    "DownloadEncodingSetting",
    "DpClipSetting",
    "DpDeltaSetting",
    "DpMaxEpsilonSetting",
    "DpNoiseMultiplierSetting",
    "DpPlacementSetting",
    "DpStatisticsClipSetting",
    "DpTargetEpsilonSetting",
    "ErrorFeedbackSetting",
    "FractionSetting",
    "LocalEpochsSetting",
    "LrFactorSetting",
    "LrSetting",
    "MaxStalenessSetting",
    "MilestonesSetting",
    "ModeSetting",
    "ModelSetting",
    "PolicySetting",
    "RoundsSetting",
    "SecureAggregationClipSetting",
    "SecureAggregationSetting",
    "SecureAggregationThresholdSetting",
    "SeedSetting",
    "ServerLrSetting",
    "SplitSetting",
    "StalenessSetting",
    "StatisticsEverySetting",
    "StatisticsSetting",
    "SubmodelSetting",
    "TestExamplesSetting",
    "UploadEncodingSetting",
    "federation_options",
    "spec_settings",
]

_PANEL = "Federation (also from --config)"


def _model(value: str | None) -> str | None:
    return None if value is None else check_model_name(value)


def _data(value: str | None) -> str | None:
    return None if value is None else check_data_name(value)


ConfigFileOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A TOML file of federation settings (the options in this panel, as keys such "
        'as mode = "a-e" or local_epochs = 1); flags given on the command line win.',
        rich_help_panel=_PANEL,
    ),
]
ModelSetting = Annotated[
    str | None,
    typer.Option(
        help="Model: conv, resnet18, transformer, an installed one, or package.module:factory "
        "[default: conv].",
        callback=_model,
        rich_help_panel=_PANEL,
    ),
]
DataSetting = Annotated[
    str | None,
    typer.Option(
        help="Data set: mnist, wikitext2, imagefolder, an installed one, or "
        "package.module:loader [default: the model's own: conv mnist, resnet18 imagefolder, "
        "transformer wikitext2].",
        callback=_data,
        rich_help_panel=_PANEL,
    ),
]
ModeSetting = Annotated[
    str | None,
    typer.Option(
        help="Levels in play: 'a-b-c-d-e' = Dynamic over five levels, 'a2-b8' = Fix 20% a, "
        "80% b; a rate may replace a letter ('0.3x2') [default: a-b-c-d-e].",
        rich_help_panel=_PANEL,
    ),
]
PolicySetting = Annotated[
    str | None,
    typer.Option(
        help="How clients get their level: fix or dynamic (the paper's, overriding the "
        "mode's own rule), or profile (each device at the largest level its measured "
        "profile fits, re-leveled after every round) [default: serve: profile; simulate: the "
        "mode's rule, since simulated clients time nothing to place them by].",
        show_default=False,
        rich_help_panel=_PANEL,
    ),
]
SubmodelSetting = Annotated[
    str | None,
    typer.Option(
        help="Sub-model extraction: static (HeteroFL's upper-left slices) or rolling "
        "(FedRolex: a window rolling by one each round) [default: static].",
        rich_help_panel=_PANEL,
    ),
]
SplitSetting = Annotated[
    str | None,
    typer.Option(
        help="How the training data is split across clients, iid or non-iid; it also picks "
        "the paper's rounds and milestones [default: iid].",
        rich_help_panel=_PANEL,
    ),
]
RoundsSetting = Annotated[
    int | None,
    typer.Option(
        help="Communication rounds [default: the paper's: conv 200 IID, 400 non-IID; "
        "resnet18 400, 800; transformer 100].",
        rich_help_panel=_PANEL,
    ),
]
FractionSetting = Annotated[
    float | None,
    typer.Option(
        help="Share of the clients selected per round [default: 0.1].", rich_help_panel=_PANEL
    ),
]
LrSetting = Annotated[
    float | None,
    typer.Option(
        help="Learning rate [default: the paper's: conv 0.01; resnet18 and transformer 0.1].",
        rich_help_panel=_PANEL,
    ),
]
MilestonesSetting = Annotated[
    str | None,
    typer.Option(
        help="Rounds after which the learning rate is multiplied by --lr-factor, comma-"
        "separated, e.g. 100,150 [default: the paper's for the model and split].",
        rich_help_panel=_PANEL,
    ),
]
LrFactorSetting = Annotated[
    float | None,
    typer.Option(
        help="Learning-rate factor at each milestone [default: 0.1].", rich_help_panel=_PANEL
    ),
]
LocalEpochsSetting = Annotated[
    int | None,
    typer.Option(
        help="Local epochs E per round [default: the paper's: 5; transformer 1].",
        rich_help_panel=_PANEL,
    ),
]
BatchSizeSetting = Annotated[
    int | None,
    typer.Option(
        help="Local batch size B [default: the paper's: 10; transformer 100].",
        rich_help_panel=_PANEL,
    ),
]
StatisticsSetting = Annotated[
    str | None,
    typer.Option(
        help="Who reports sBN statistics after each round: all (every live client, as in the "
        "paper, but those that missed the round), round (its uploaders) or none "
        "[default: all].",
        rich_help_panel=_PANEL,
    ),
]
SeedSetting = Annotated[
    int | None,
    typer.Option(
        help="Seed for selection, levels, initial weights and batch orders [default: 0].",
        rich_help_panel=_PANEL,
    ),
]
TestExamplesSetting = Annotated[
    int | None,
    typer.Option(
        help="Evaluate on this many test examples, the same ones for the same --seed in "
        "simulate and serve (text: the first rows) [default: all].",
        rich_help_panel=_PANEL,
    ),
]

DownloadEncodingSetting = Annotated[
    str | None,
    typer.Option(
        help="Encoding of the weights sent to devices: fp32, fp16, bf16 or int8 (per-channel "
        "scales, stochastic rounding), for every level or per level as DEFAULT,LEVEL=ENC,... "
        "(fp16,e=int8); a device gets fp32 where it did not declare the encoding "
        "[default: fp32].",
        rich_help_panel=_PANEL,
    ),
]
UploadEncodingSetting = Annotated[
    str | None,
    typer.Option(
        help="Encoding of what devices send back: fp32 (the trained weights) or fp16, bf16, "
        "int8 (the update: trained minus received weights), as --download-encoding "
        "(fp32,d=int8,e=int8: int8 at levels d and e only) [default: fp32].",
        rich_help_panel=_PANEL,
    ),
]
ErrorFeedbackSetting = Annotated[
    bool | None,
    typer.Option(
        "--error-feedback/--no-error-feedback",
        help="Carry what a lossy upload's quantization dropped into the device's next upload "
        "at the same level (static sub-models only) [default: no].",
        show_default=False,
        rich_help_panel=_PANEL,
    ),
]


_PRIVACY = "Differential privacy (also from --config)"

DpClipSetting = Annotated[
    float | None,
    typer.Option(
        help="Turn on client-level DP: clip each client's update (trained minus received, "
        "over its slice) to this L2 norm C [default: off].",
        rich_help_panel=_PRIVACY,
    ),
]
DpNoiseMultiplierSetting = Annotated[
    float | None,
    typer.Option(
        help="Noise of std z*C on every element's sum before the per-element average "
        "(elements held by fewer clients get relatively more).",
        rich_help_panel=_PRIVACY,
    ),
]
DpTargetEpsilonSetting = Annotated[
    float | None,
    typer.Option(
        help="Instead of --dp-noise-multiplier: the epsilon to reach at --dp-delta after the "
        "planned rounds; the noise multiplier is solved for it at round 1.",
        rich_help_panel=_PRIVACY,
    ),
]
DpDeltaSetting = Annotated[
    float | None,
    typer.Option(
        help="The delta of (epsilon, delta)-DP [default: 1e-05].", rich_help_panel=_PRIVACY
    ),
]
DpMaxEpsilonSetting = Annotated[
    float | None,
    typer.Option(
        help="Stop before a round that would spend more than this epsilon [default: no limit].",
        rich_help_panel=_PRIVACY,
    ),
]
DpStatisticsClipSetting = Annotated[
    float | None,
    typer.Option(
        help="L2 bound of a client's sBN statistics (per-channel means and second moments, "
        "all layers) [default: 50].",
        rich_help_panel=_PRIVACY,
    ),
]
DpPlacementSetting = Annotated[
    str | None,
    typer.Option(
        help="server (the aggregator clips and adds the noise) or distributed (each client "
        "adds its share) [default: server].",
        rich_help_panel=_PRIVACY,
    ),
]


_BUFFERED = "Buffered asynchronous aggregation (also from --config)"

AggregationSetting = Annotated[
    str | None,
    typer.Option(
        help="sync (rounds: every selected client answers or misses, then one average) or "
        "buffered (FedBuff: clients train whenever free on the newest model; every "
        "--buffer-size updates, weighted by staleness, make a new version; --rounds then "
        "counts versions) [default: sync].",
        rich_help_panel=_BUFFERED,
    ),
]
BufferSizeSetting = Annotated[
    int | None,
    typer.Option(
        help="Buffered: K, the updates folded into each new model version [default: 10].",
        rich_help_panel=_BUFFERED,
    ),
]
StalenessSetting = Annotated[
    str | None,
    typer.Option(
        help="Buffered: weight of an update that started tau versions ago: constant, "
        "polynomial:a ((1+tau)^-a) or hinge:a,b (1 up to b, then 1/(a(tau-b)+1)) "
        "[default: polynomial:0.5].",
        rich_help_panel=_BUFFERED,
    ),
]
ServerLrSetting = Annotated[
    float | None,
    typer.Option(
        help="Buffered: eta, the new version is the current one plus eta x the per-element "
        "weighted average update [default: 1].",
        rich_help_panel=_BUFFERED,
    ),
]
MaxStalenessSetting = Annotated[
    int | None,
    typer.Option(
        help="Buffered: updates that started more versions ago than this are refused "
        "(409 stale_update) and count as a miss for the level policy [default: 20].",
        rich_help_panel=_BUFFERED,
    ),
]
StatisticsEverySetting = Annotated[
    int | None,
    typer.Option(
        help="Buffered: gather sBN statistics (from --statistics' clients) every this many "
        "versions; versions between keep the last ones [default: 1].",
        rich_help_panel=_BUFFERED,
    ),
]


_SECURE = "Secure aggregation (also from --config)"

SecureAggregationSetting = Annotated[
    bool | None,
    typer.Option(
        help="SecAgg+ over mixed widths: devices mask their updates, labels and sBN "
        "statistics so that the coordinator learns only their sums [default: off].",
        rich_help_panel=_SECURE,
    ),
]
SecureAggregationClipSetting = Annotated[
    float | None,
    typer.Option(
        help="Each update element (trained minus received) is clipped to +- this before its "
        "fixed-point encoding [default: 1].",
        rich_help_panel=_SECURE,
    ),
]
SecureAggregationThresholdSetting = Annotated[
    float | None,
    typer.Option(
        help="The share of a device's neighbours that must survive for its secrets to be "
        "rebuilt; fewer at any stage abandons the round [default: 0.5].",
        rich_help_panel=_SECURE,
    ),
]


# Every federation option by its parameter name, in the order --help lists them.
FEDERATION_OPTIONS: dict[str, Any] = {
    "config": ConfigFileOption,
    "model": ModelSetting,
    "data": DataSetting,
    "mode": ModeSetting,
    "policy": PolicySetting,
    "submodel": SubmodelSetting,
    "split": SplitSetting,
    "rounds": RoundsSetting,
    "fraction": FractionSetting,
    "lr": LrSetting,
    "milestones": MilestonesSetting,
    "lr_factor": LrFactorSetting,
    "local_epochs": LocalEpochsSetting,
    "batch_size": BatchSizeSetting,
    "statistics": StatisticsSetting,
    "seed": SeedSetting,
    "test_examples": TestExamplesSetting,
    "download_encoding": DownloadEncodingSetting,
    "upload_encoding": UploadEncodingSetting,
    "error_feedback": ErrorFeedbackSetting,
    "dp_clip": DpClipSetting,
    "dp_noise_multiplier": DpNoiseMultiplierSetting,
    "dp_target_epsilon": DpTargetEpsilonSetting,
    "dp_delta": DpDeltaSetting,
    "dp_max_epsilon": DpMaxEpsilonSetting,
    "dp_statistics_clip": DpStatisticsClipSetting,
    "dp_placement": DpPlacementSetting,
    "secure_aggregation": SecureAggregationSetting,
    "secure_aggregation_clip": SecureAggregationClipSetting,
    "secure_aggregation_threshold": SecureAggregationThresholdSetting,
    "aggregation": AggregationSetting,
    "buffer_size": BufferSizeSetting,
    "staleness": StalenessSetting,
    "server_lr": ServerLrSetting,
    "max_staleness": MaxStalenessSetting,
    "statistics_every": StatisticsEverySetting,
}

Command = TypeVar("Command", bound=Callable[..., None])


def federation_options(command: Command) -> Command:
    """Give ``command`` every federation option; it receives them merged as ``spec``.

    ``spec`` holds the spec's constructor arguments (``spec_settings``: the
    ``--config`` file's values, then the flags given), so that ``simulate`` and
    ``serve`` declare the options once, here, and cannot drift apart.
    """
    signature = inspect.signature(command, eval_str=True)  # typer reads the objects
    own = [p for p in signature.parameters.values() if p.name != "spec"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in FEDERATION_OPTIONS.items()
    ]

    @functools.wraps(command)
    def with_spec(*args: Any, **kwargs: Any) -> None:
        flags = {name: kwargs.pop(name, None) for name in FEDERATION_OPTIONS}
        config = flags.pop("config")
        command(*args, spec=spec_settings(config, **flags), **kwargs)

    with_spec.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    hints = {k: v for k, v in command.__annotations__.items() if k != "spec"}
    with_spec.__annotations__ = {**hints, **FEDERATION_OPTIONS}
    return cast(Command, with_spec)


def spec_settings(config_file: Path | None, **flags: Any) -> dict[str, Any]:
    """The spec's constructor arguments: ``--config``'s values, then the flags given.

    ``flags`` are the options above by their keys (``heterofl_edge.spec.SPEC_KEYS``);
    ``None`` means not given. ``ConfigError`` for an unreadable file, an unknown key
    or a value of the wrong kind.
    """
    from heterofl_edge.spec import load_spec, spec_values

    values: dict[str, Any] = load_spec(config_file) if config_file is not None else {}
    milestones = flags.get("milestones")
    if isinstance(milestones, str):
        try:
            flags["milestones"] = tuple(int(m) for m in milestones.split(",") if m.strip())
        except ValueError:
            raise ConfigError(
                f"--milestones {milestones!r} is not a list of rounds", "e.g. --milestones 100,150"
            ) from None
    values.update({k: v for k, v in flags.items() if v is not None})
    return spec_values(values)
