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

from pathlib import Path
from typing import Annotated, Any

import typer

from heterofl_edge.cli.options import check_data_name, check_model_name
from heterofl_edge.errors import ConfigError

__all__ = [
    "BatchSizeSetting",
    "ConfigFileOption",
    "DataSetting",
    "DownloadEncodingSetting",
    "ErrorFeedbackSetting",
    "FractionSetting",
    "LocalEpochsSetting",
    "LrFactorSetting",
    "LrSetting",
    "MilestonesSetting",
    "ModeSetting",
    "ModelSetting",
    "PolicySetting",
    "RoundsSetting",
    "SeedSetting",
    "SplitSetting",
    "StatisticsSetting",
    "SubmodelSetting",
    "TestExamplesSetting",
    "UploadEncodingSetting",
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
