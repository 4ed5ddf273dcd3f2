"""The federation spec: one run's settings as data, for ``simulate`` and ``serve`` alike.

``FederationSpec`` holds what a HeteroFL run is, whatever carries its
messages: the model and its data set, the levels in play and how clients get
them, the sub-model rule, the rounds, sampling, optimiser and schedule, the
sBN statistics and the seed. It is validated once, in its constructor, so
that an impossible run is refused before anything is loaded, read from a TOML
file (``load_spec``) or from command-line flags alike, and turned into a
round engine by one builder (``heterofl_edge.federation.build_engine``).

What is left unset is the paper's for the model (Table 6,
``heterofl_edge.paper``): read it resolved as ``learning_rate``,
``local_training``, ``total_rounds`` and ``lr_milestones``.

The simulation (``heterofl_edge.simulation.SimulationConfig``) adds the
simulated population; the coordinator (``coordinator.config.CoordinatorConfig``)
adds its fleet's quorum, deadlines and service. Both are a ``FederationSpec``.
"""

from __future__ import annotations

import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from heterofl_edge.assignment import Assignment, LevelMix, parse_mode
from heterofl_edge.buffered import Aggregation, StalenessRule, parse_staleness
from heterofl_edge.encoding import EncodingPlan, LevelEncodings
from heterofl_edge.engine import StatisticsClients
from heterofl_edge.errors import ConfigError
from heterofl_edge.models import get_architecture
from heterofl_edge.paper import PaperSettings, dataset_for, paper_settings
from heterofl_edge.partition import Split
from heterofl_edge.privacy import DpPlacement, DpSettings, PrivacyPlan
from heterofl_edge.secure_aggregation import SecureSettings
from heterofl_edge.slicing import Submodel
from heterofl_edge.strategy import MultiStepSchedule
from heterofl_edge.task_kind import TaskKind
from heterofl_edge.training import LocalTrainingConfig

__all__ = ["SPEC_KEYS", "FederationSpec", "Policy", "load_spec", "spec_values"]


class Policy(StrEnum):
    """How clients get their level each round."""

    fix = "fix"  # the paper's Fix: proportions from the mode, by client position
    dynamic = "dynamic"  # the paper's Dynamic: a fresh draw from the mode every round
    profile = "profile"  # the largest level a device's measured profile fits; re-leveled


@dataclass(frozen=True)
class FederationSpec:
    """A HeteroFL run's settings (see the module docstring); ``ConfigError`` if impossible."""

    model: str = "conv"  # a registered name or package.module:factory
    data: str | None = None  # a data set of the model's task (None: the model's own)
    mode: str = "a-b-c-d-e"  # levels in play; the global model has the largest one's width
    policy: Policy | None = None  # None: the mode's own rule (weights: Fix, none: Dynamic)
    submodel: Submodel = Submodel.static  # static: upper-left slices; rolling: FedRolex
    split: Split = Split.iid  # how the data is split (and which of the paper's schedules)
    rounds: int | None = None
    fraction: float = 0.1  # share of the clients selected per round
    lr: float | None = None
    milestones: tuple[int, ...] | None = None  # rounds after which lr is multiplied ...
    lr_factor: float = 0.1  # ... by this
    local: LocalTrainingConfig | None = None  # epochs, batch size, SGD settings
    statistics: StatisticsClients = StatisticsClients.all  # who reports sBN statistics
    seed: int = 0  # selection, levels, initial weights, batch orders
    test_examples: int | None = None  # evaluate on this many test examples (None: all)
    # Client-level differential privacy (heterofl_edge/privacy.py): on with dp_clip, then
    # with a noise multiplier or a target epsilon (solved over the planned rounds).
    dp_clip: float | None = None
    dp_noise_multiplier: float | None = None
    dp_target_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_max_epsilon: float | None = None  # stop before a round that would spend more
    dp_statistics_clip: float = 50.0  # L2 bound of a client's sBN moment vector
    dp_placement: DpPlacement = DpPlacement.server
    # Buffered asynchronous aggregation (FedBuff, heterofl_edge/buffered.py): every
    # buffer_size arriving updates become a new model version, each weighted by its
    # staleness; `rounds` then counts published versions.
    aggregation: Aggregation = Aggregation.sync
    buffer_size: int = 10  # K: updates per published version
    staleness: StalenessRule = field(default_factory=StalenessRule)  # polynomial:0.5
    server_lr: float = 1.0  # eta: the version moves by eta x the weighted average update
    max_staleness: int = 20  # updates that started more versions ago are refused
    statistics_every: int = 1  # buffered: sBN statistics every this many versions
    # Secure aggregation (heterofl_edge/secagg.py, SecAgg+ over nested slices): the
    # coordinator learns only per-element sums; updates are clipped element-wise to
    # secure_aggregation_clip for the fixed point; a client's secrets need this share of its
    # neighbours to survive.
    secure_aggregation: bool = False
    secure_aggregation_clip: float = 1.0
    secure_aggregation_threshold: float = 0.5
    # Compressed transport (heterofl_edge.encoding): DEFAULT[,LEVEL=ENCODING...] each way;
    # lossy uploads are updates, and error feedback carries what quantization dropped.
    download_encoding: str = "fp32"
    upload_encoding: str = "fp32"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        """Refuse impossible settings before any data is loaded."""
        self._coerce_enums()
        arch = get_architecture(self.model)  # ConfigError listing the choices if unknown
        if arch.task is TaskKind.language_model and self.split is not Split.iid:
            raise ConfigError(
                f"model {self.model!r} is a language model, split IID only (as in the paper)",
                "use --split iid",
            )
        dataset_for(self.model, self.data)
        if self.total_rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.total_rounds}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"fraction {self.fraction} is outside (0, 1]",
                "it is the share of clients per round",
            )
        if self.local_training.epochs < 1 or self.local_training.batch_size < 1:
            raise ConfigError("local epochs and batch size must be at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        if not (self.lr_factor > 0 and math.isfinite(self.lr_factor)):
            raise ConfigError(f"lr factor must be positive, got {self.lr_factor}")
        if any(m < 1 for m in self.lr_milestones):
            raise ConfigError(f"milestones must be rounds from 1, got {list(self.lr_milestones)}")
        if self.test_examples is not None and self.test_examples < 1:
            raise ConfigError(f"test examples must be at least 1, got {self.test_examples}")
        self._check_encodings()
        self._check_privacy()
        self._check_secure()
        self._check_buffered()

    def _check_buffered(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"--buffer-size must be at least 1, got {self.buffer_size}")
        if not (self.server_lr > 0 and math.isfinite(self.server_lr)):
            raise ConfigError(f"--server-lr must be positive, got {self.server_lr}")
        if self.max_staleness < 0:
            raise ConfigError(f"--max-staleness must be 0 or more, got {self.max_staleness}")
        if self.statistics_every < 1:
            raise ConfigError(f"--statistics-every must be at least 1, got {self.statistics_every}")
        if self.aggregation is Aggregation.buffered and (
            self.secure_aggregation
            or self.error_feedback
            or str(LevelEncodings.parse(self.upload_encoding)) != "fp32"
            or str(LevelEncodings.parse(self.download_encoding)) != "fp32"
        ):
            raise ConfigError(
                "--aggregation buffered with secure aggregation or compressed transport is "
                "not built yet",
                "leave out --secure-aggregation, --error-feedback and the --*-encoding options",
            )
        if self.aggregation is Aggregation.buffered and self.private:
            raise ConfigError(
                "differential privacy is not available with --aggregation buffered",
                "its accounting assumes rounds of uniformly sampled clients; use "
                "--aggregation sync with --dp-clip",
            )

    @property
    def buffered(self) -> bool:
        """Whether updates are buffered asynchronously (FedBuff) rather than in rounds."""
        return self.aggregation is Aggregation.buffered

    def _check_secure(self) -> None:
        if not self.secure_aggregation:
            return
        self.secure_settings  # noqa: B018 - the settings' own checks
        if self.submodel is not Submodel.static:
            raise ConfigError(
                "--secure-aggregation works with --submodel static only",
                "rolling windows are not prefixes of each other in a client's own element "
                "order, which the masks rely on; use --submodel static",
            )
        if self.private:
            raise ConfigError(
                "--secure-aggregation with differential privacy is not built yet",
                "leave out --dp-clip, or --secure-aggregation (the server placement clips on "
                "the server, which never sees an update under secure aggregation)",
            )
        if str(LevelEncodings.parse(self.upload_encoding)) not in ("fp32", "int8"):
            raise ConfigError(
                f"--secure-aggregation with --upload-encoding {self.upload_encoding} is not "
                "available",
                "every device of a round masks its update in one ring: use --upload-encoding "
                "fp32 (32-bit fixed point) or int8 (one int8 step for every level, masked in "
                "8 + log2(devices) bits) for all levels; --download-encoding may differ by level",
            )
        if self.error_feedback and self.secure_int8:
            raise ConfigError(
                "--error-feedback with --secure-aggregation is not built",
                "leave out --error-feedback: a secure int8 upload rounds without bias and "
                "carries no residual to the next round",
            )

    @property
    def secure_settings(self) -> SecureSettings | None:
        """The run's secure aggregation (None when off)."""
        if not self.secure_aggregation:
            return None
        return SecureSettings(
            self.secure_aggregation_clip,
            self.secure_aggregation_threshold,
            int8=self.secure_int8,
        )

    @property
    def secure_int8(self) -> bool:
        """Whether secure uploads are shared-step int8 (``--upload-encoding int8``)."""
        return self.secure_aggregation and str(LevelEncodings.parse(self.upload_encoding)) == (
            "int8"
        )

    def _coerce_enums(self) -> None:
        """A setting's plain string (from Python code) becomes its enum, or a ``ConfigError``."""
        for name, kind in _enum_fields(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, str) and not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    raise ConfigError(
                        f"unknown {name} {value!r}",
                        f"use one of: {', '.join(e.value for e in kind)}",
                    ) from None

    def _check_encodings(self) -> None:
        rates = self.level_mix.rates  # parsing the mode is the check
        for name in ("download_encoding", "upload_encoding"):
            parsed = LevelEncodings.parse(getattr(self, name))
            parsed.check_levels(rates, f"--{name.replace('_', '-')} {getattr(self, name)!r}")
            object.__setattr__(self, name, str(parsed))  # one spelling: fp32,d=int8
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"error feedback must be true or false, got {self.error_feedback!r}")
        if self.error_feedback and self.submodel == Submodel.rolling:
            raise ConfigError(
                "error feedback keeps each device's residual at its sub-model's positions, "
                "which rolling sub-models move every round",
                "use --submodel static with --error-feedback",
            )

    def _check_privacy(self) -> None:
        given = {
            "--dp-noise-multiplier": self.dp_noise_multiplier,
            "--dp-target-epsilon": self.dp_target_epsilon,
            "--dp-max-epsilon": self.dp_max_epsilon,
        }
        if self.dp_clip is None:
            named = [flag for flag, value in given.items() if value is not None]
            if named or self.dp_placement is not DpPlacement.server:
                raise ConfigError(
                    f"{named[0] if named else '--dp-placement'} needs --dp-clip",
                    "differential privacy is on with a clip norm: add --dp-clip C",
                )
            return
        if (self.dp_noise_multiplier is None) == (self.dp_target_epsilon is None):
            raise ConfigError(
                "differential privacy needs --dp-noise-multiplier or --dp-target-epsilon "
                "(one of them)",
                "give the noise, or the epsilon to solve the noise for over the planned rounds",
            )
        if self.dp_target_epsilon is not None and not (
            self.dp_target_epsilon > 0 and math.isfinite(self.dp_target_epsilon)
        ):
            raise ConfigError(f"--dp-target-epsilon must be positive, got {self.dp_target_epsilon}")
        DpSettings(  # the mechanism's own checks (clip, noise, delta, statistics clip)
            self.dp_clip,
            self.dp_noise_multiplier if self.dp_noise_multiplier is not None else 1.0,
            self.dp_delta,
            self.dp_statistics_clip,
            self.dp_placement,
            self.dp_max_epsilon,
        )

    def check_reachable(self, pool: int) -> None:
        """``ConfigError`` if no noise multiplier reaches the target epsilon for ``pool`` clients.

        The planned rounds draw ``ceil(fraction * pool)`` of them each; the statistics
        releases follow ``statistics``.
        """
        if self.dp_target_epsilon is None:
            return
        from heterofl_edge.privacy import RoundRelease, noise_multiplier_for

        sampled = max(1, math.ceil(round(self.fraction * pool, 9)))
        kind = {"all": "all", "round": "sampled"}.get(self.statistics.value, "none")
        planned = [RoundRelease(pool, sampled, kind, 1.0)] * self.total_rounds
        noise_multiplier_for(self.dp_target_epsilon, planned, self.dp_delta)

    @property
    def private(self) -> bool:
        """Whether the run is differentially private (``dp_clip`` given)."""
        return self.dp_clip is not None

    def privacy_plan(self, seed: int | None) -> PrivacyPlan | None:
        """The run's privacy plan (None without DP); noise from ``seed``, or the OS if None."""
        if self.dp_clip is None:
            return None
        return PrivacyPlan(
            clip=self.dp_clip,
            delta=self.dp_delta,
            statistics_clip=self.dp_statistics_clip,
            placement=self.dp_placement,
            total_rounds=self.total_rounds,
            noise_multiplier=self.dp_noise_multiplier,
            target_epsilon=self.dp_target_epsilon,
            max_epsilon=self.dp_max_epsilon,
            seed=seed,
        )

    # -- what is left unset, resolved ---------------------------------------------------
    @property
    def paper(self) -> PaperSettings:
        return paper_settings(self.model)

    @property
    def data_name(self) -> str:
        return dataset_for(self.model, self.data)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.paper.lr

    @property
    def local_training(self) -> LocalTrainingConfig:
        return self.local if self.local is not None else self.paper.local

    @property
    def total_rounds(self) -> int:
        return self.rounds if self.rounds is not None else self.paper.rounds[self.split]

    @property
    def lr_milestones(self) -> tuple[int, ...]:
        return self.milestones if self.milestones is not None else self.paper.milestones[self.split]

    @property
    def level_mix(self) -> LevelMix:
        """The levels in play and, unless the policy is ``profile``, how they are drawn."""
        rule = None if self.policy in (None, Policy.profile) else Assignment(self.policy.value)
        return parse_mode(self.mode, rule)

    @property
    def encodings(self) -> EncodingPlan:
        """The transport's encodings down and up, per level, and error feedback."""
        return EncodingPlan(
            LevelEncodings.parse(self.download_encoding),
            LevelEncodings.parse(self.upload_encoding),
            self.error_feedback,
        )

    @property
    def schedule(self) -> MultiStepSchedule:
        return MultiStepSchedule(self.learning_rate, self.lr_milestones, self.lr_factor)

    @property
    def metric(self) -> str:
        """What the run reports: ``accuracy``, or ``perplexity`` for a language model."""
        from heterofl_edge.tasks import task_for

        return task_for(get_architecture(self.model)).metric

    def resolved(self) -> FederationSpec:
        """The spec with everything the paper fills in written out (what a run really is)."""
        return replace(
            self,
            data=self.data_name,
            rounds=self.total_rounds,
            lr=self.learning_rate,
            milestones=self.lr_milestones,
            local=self.local_training,
        )

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values, resolved (``results.json``, the journal's fingerprint)."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, StrEnum):
                data[key] = value.value
        data.update(
            staleness=str(self.staleness),
            data=self.data_name,
            rounds=self.total_rounds,
            lr=self.learning_rate,
            milestones=list(self.lr_milestones),
            local=asdict(self.local_training),
            policy=None if self.policy is None else self.policy.value,
        )
        return data


# The keys a spec file and the flags share: the spec's fields, with local training as
# two keys of its own (its SGD settings are the paper's, built into the exported programs).
SPEC_KEYS: tuple[str, ...] = tuple(
    ["local_epochs", "batch_size"] + [f.name for f in fields(FederationSpec) if f.name != "local"]
)

_CONVERT: dict[str, Any] = {
    "aggregation": Aggregation,
    "staleness": parse_staleness,  # a one-line ConfigError for text of no FedBuff form
    "dp_placement": DpPlacement,
    "policy": Policy,
    "submodel": Submodel,
    "split": Split,
    "statistics": StatisticsClients,
    "milestones": lambda v: tuple(int(m) for m in v),
}


_ENUM_FIELDS: dict[type, dict[str, type[StrEnum]]] = {}


def _enum_fields(cls: type) -> dict[str, type[StrEnum]]:
    """The settings of ``cls`` whose type is an enum (``Split | None`` counts), by name."""
    if cls in _ENUM_FIELDS:
        return _ENUM_FIELDS[cls]
    hints = typing.get_type_hints(cls)
    found: dict[str, type[StrEnum]] = {}
    for setting in fields(cls):
        hint = hints[setting.name]
        for kind in typing.get_args(hint) or (hint,):
            if isinstance(kind, type) and issubclass(kind, StrEnum):
                found[setting.name] = kind
    _ENUM_FIELDS[cls] = found
    return found


def spec_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of a ``FederationSpec`` from file keys or flags (``SPEC_KEYS``).

    ``None`` values are left out (the default applies); ``ConfigError`` for an
    unknown key or a value of the wrong kind.
    """
    unknown = sorted(set(values) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown federation settings {unknown}", f"the settings are: {', '.join(SPEC_KEYS)}"
        )
    given = {k: v for k, v in values.items() if v is not None}
    arguments: dict[str, Any] = {}
    for key, value in given.items():
        if key in ("local_epochs", "batch_size"):
            continue
        convert = _CONVERT.get(key)
        try:
            arguments[key] = convert(value) if convert is not None else value
        except (ValueError, TypeError):
            choices = (
                f"use one of: {', '.join(e.value for e in convert)}"
                if isinstance(convert, type) and issubclass(convert, StrEnum)
                else ""
            )
            raise ConfigError(f"unknown {key} {value!r}", choices) from None
    if "local_epochs" in given or "batch_size" in given:
        from heterofl_edge.paper import local_training

        arguments["local"] = local_training(
            str(given.get("model", FederationSpec.model)),
            given.get("local_epochs"),
            given.get("batch_size"),
        )
    return arguments


def load_spec(path: Path) -> dict[str, Any]:
    """The settings in a TOML file (keys as in ``SPEC_KEYS``, dashes or underscores).

    The file may hold them at its top level or in a ``[federation]`` table;
    ``ConfigError`` for a file that cannot be read or a key that is not a setting.
    """
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not TOML: {exc}") from None
    table = document.get("federation", document)
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path}: [federation] must be a table")
    values = {str(k).replace("-", "_"): v for k, v in table.items()}
    spec_values(values)  # unknown keys and bad kinds are refused here, naming the file's keys
    return values
