"""Simulated HeteroFL: the whole federation on one machine, or on a Ray cluster.

Any registered model trains on any data set of its task (``heterofl_edge.tasks``):
conv on MNIST, resnet18 on an image folder, the transformer on WikiText-2, or a
user's ``package.module:factory`` on a user's ``package.module:loader``. The
task splits the data across clients, trains each session and scores the
global model (accuracy, or perplexity for the language model); the sBN
statistics pass runs only for models that have sBN layers.

The rounds run on the round engine (``heterofl_edge.engine``) with a
transport that hands client sessions to a backend (``heterofl_edge.backends``:
this process, a pool of worker processes, or Ray tasks): each selected client
receives its level's slice of the global model, trains it locally, and its
update goes into the engine's streaming aggregator, in task order whatever the
order the sessions finish in. Then every client reports sBN statistics
computed with the new global model (the same workers, fresh every round), and
the global model is evaluated on the test set (and, for non-IID splits, on
each client's labels: local accuracy). With a ``FileJournal`` a killed run
resumes from its last checkpoint and ends with the same model, bit for bit
(the transport's error-feedback residuals and byte counts are checkpointed
beside it). Each round's record holds the bytes its payloads took on the wire
in the spec's encodings (``transfer``), and the result sums them up.

With a ``SimulatedFleet`` (``simulate --simulated-time``) every client is a
device with a speed and an on/off availability, the run is timed on a
simulated clock (``heterofl_edge.timed_transport``) and the profile policy can
place clients; ``--aggregation buffered`` runs the ``BufferedEngine`` on the
same transport. Both report simulated wall-clock time per round or version.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from heterofl_edge.backends import (
    InlineBackend,
    PoolBackend,
    SessionBackend,
    available_cores,
)
from heterofl_edge.buffered_engine import BufferedJournal, BufferedResult, MemoryBufferedJournal
from heterofl_edge.data.base import TaskData
from heterofl_edge.data.registry import get_dataset
from heterofl_edge.encoding import training_bytes_per_device
from heterofl_edge.engine import (
    Journal,
    LevelPolicy,
    Phase,
    ResumePoint,
    RoundEngine,
    RoundOpen,
    RoundResult,
    StatisticsClients,
)
from heterofl_edge.errors import ConfigError, DataError
from heterofl_edge.federation import Quorum, build_engine
from heterofl_edge.in_process import MemoryJournal, SessionTransport
from heterofl_edge.journal import FileJournal
from heterofl_edge.loss import label_mask
from heterofl_edge.models import Architecture, StaticBatchNorm2d, get_architecture
from heterofl_edge.paper import (
    PAPER_SETTINGS,
    PaperSettings,
    dataset_for,
    local_training,
    paper_settings,
)
from heterofl_edge.partition import Partition, Split
from heterofl_edge.profile_policy import LevelTable, ProfileLevels, choose_rate, level_costs
from heterofl_edge.report import atomic_write_bytes
from heterofl_edge.sessions import (
    Accelerator,
    ClientArrays,
    PredictJob,
    forward_layout,
    place,
    resolve_device,
    session_threads,
    to_arrays,
)
from heterofl_edge.simulated_time import SimulatedFleet, TimeModel
from heterofl_edge.slicing import Submodel
from heterofl_edge.spec import FederationSpec, Policy
from heterofl_edge.tasks import ClassificationTask, check_compatible, task_for
from heterofl_edge.timed_transport import TimedTransport
from heterofl_edge.training import EVAL_BATCH

__all__ = [
    "PAPER_SETTINGS",
    "Backend",
    "Execution",
    "PaperSettings",
    "RoundRecord",
    "SimulationConfig",
    "SimulationResult",
    "Split",
    "StatisticsClients",
    "Submodel",
    "dataset_for",
    "load_data",
    "local_training",
    "paper_settings",
    "run_simulation",
]  # the paper's settings are heterofl_edge.paper's, re-exported for older imports


@dataclass(frozen=True, kw_only=True)
class SimulationConfig(FederationSpec):
    """A federation spec and the simulated population it runs on.

    The population is what a coordinator cannot choose, since devices bring
    their own data: how many clients there are, how the training data is
    split among them (``split`` is the spec's), and how much of it is used.
    Everything else is the spec's (``heterofl_edge.spec.FederationSpec``).
    """

    num_clients: int = 100
    shards_per_client: int = 2  # non-IID: label shards per client (2: at most 2 classes)
    train_examples: int | None = None  # a random subset of the training examples
    # The clients' devices (speed tiers, availability) on a simulated clock, or None:
    # every client always there and timed by nothing but the machine.
    fleet: SimulatedFleet | None = None

    def __post_init__(self) -> None:
        """The spec's checks, and what only a simulation can get wrong."""
        super().__post_init__()
        if self.num_clients < 1:
            raise ConfigError(f"need at least one client, got {self.num_clients}")
        self.check_reachable(self.num_clients)
        if self.policy is Policy.profile and self.fleet is None:
            raise ConfigError(
                "simulate cannot place clients by a measured profile: simulated clients "
                "time nothing",
                "use --policy fix or dynamic (or leave it to the mode), add --simulated-time "
                "(simulated devices with the profile policy's step-time model), or run devices "
                "against 'coordinator serve'",
            )
        if self.buffered and self.buffer_size > self.num_clients:
            raise ConfigError(
                f"--buffer-size {self.buffer_size} exceeds the {self.num_clients} clients",
                "a client delivers at most one update per version: use at most --clients",
            )
        if self.fleet is not None and self.private:
            raise ConfigError(
                "differential privacy is not available with --simulated-time",
                "drop --simulated-time, or --dp-clip",
            )

    @property
    def spec(self) -> FederationSpec:
        """The federation spec alone, without the population."""
        names = {f.name for f in fields(FederationSpec)}
        return FederationSpec(**{k: getattr(self, k) for k in names})

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data.update(
            num_clients=self.num_clients,
            shards_per_client=self.shards_per_client,
            train_examples=self.train_examples,
            fleet=None if self.fleet is None else self.fleet.to_json(),
        )
        return data


class Backend(StrEnum):
    """What runs the client sessions: this machine's cores, or a Ray cluster."""

    local = "local"
    ray = "ray"


@dataclass(frozen=True)
class Execution:
    """How a run is carried out; the results do not depend on it, except on the device.

    ``workers``: sessions at once (None: every core; 1: in this process).
    ``accelerator``: where sessions run. ``backend`` and ``address``: local
    processes, or Ray tasks on the cluster at ``address`` (None: a local Ray).
    """

    workers: int | None = None
    accelerator: Accelerator = Accelerator.cpu
    backend: Backend = Backend.local
    address: str | None = None

    def __post_init__(self) -> None:
        """Refuse a worker count below 1."""
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class RoundRecord:
    round: int
    lr: float
    levels: dict[str, int]
    train_loss: float
    train_accuracy: float
    global_loss: float
    global_accuracy: float
    local_accuracy: float | None
    train_seconds: float
    round_seconds: float
    train_samples: int
    samples_per_second: float
    seconds: dict[str, float] = field(default_factory=dict)  # training, statistics, ...
    global_perplexity: float | None = None  # the language model's metric (None otherwise)
    privacy: dict[str, Any] | None = None  # a private run's release and epsilon so far
    # With --simulated-time (and buffered runs): the simulated wall-clock time, in seconds
    # from the start, at which the round (version) was finished; the seconds above are then
    # simulated seconds too.
    simulated_time: float | None = None
    buffer: dict[str, Any] | None = None  # a buffered version: staleness and weights folded
    # Payload bytes: {down, up: {train, statistics: {encoding: {bytes, payloads}}}, devices}.
    transfer: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimulationResult:
    config: SimulationConfig
    initial_accuracy: float
    rounds: list[RoundRecord]
    global_state: dict[str, torch.Tensor]
    initial_perplexity: float | None = None
    stopped: str | None = None  # why the run ended before its last round (its privacy budget)

    def to_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "config": self.config.to_json(),
            "initial_global_accuracy": self.initial_accuracy,
        }
        if self.stopped is not None:
            report["stopped"] = self.stopped
        if self.initial_perplexity is not None:
            report["initial_global_perplexity"] = self.initial_perplexity
        report["transfer"] = transfer_summary(self.rounds)
        report["rounds"] = [asdict(r) for r in self.rounds]
        return report


def transfer_summary(rounds: list[RoundRecord]) -> dict[str, Any]:
    """Bytes on the wire over ``rounds``: by direction, kind and encoding, and per device-round.

    ``bytes_per_device_round`` is a training session's download plus its upload,
    averaged over the sessions (what a device pays to train once).
    """
    totals: dict[str, Any] = {"down": {}, "up": {}}
    for record in rounds:
        for direction in ("down", "up"):
            for kind, encodings in record.transfer.get(direction, {}).items():
                for encoding, entry in encodings.items():
                    total = (
                        totals[direction]
                        .setdefault(kind, {})
                        .setdefault(encoding, {"bytes": 0, "payloads": 0})
                    )
                    total["bytes"] += entry["bytes"]
                    total["payloads"] += entry["payloads"]
    per_session = training_bytes_per_device(totals)
    return {
        **totals,
        "bytes_per_device_round": {
            k: (None if math.isnan(v) else v) for k, v in per_session.items()
        },
    }


class TransportJournal:
    """A ``FileJournal`` whose checkpoints also keep the in-process transport's state.

    The residuals of error feedback and the bytes moved so far are written
    (``transport-RRRRRR-STAGE.safetensors``) before each checkpoint of the
    journal, and the one matching the checkpoint a run resumes from is read back,
    so that a resumed run goes on with the state an uninterrupted one had.
    """

    def __init__(self, inner: FileJournal, transport: SessionTransport, folder: Path) -> None:
        self.inner = inner
        self.transport = transport
        self.folder = folder

    def _path(self, round_number: int, stage: str) -> Path:
        return self.folder / f"transport-{round_number:06d}-{stage}.safetensors"

    def save(self, round_number: int, stage: str) -> None:
        arrays, metadata = self.transport.snapshot()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._path(round_number, stage), save_arrays(arrays, metadata))

    def _prune(self, keep: Path) -> None:
        for old in self.folder.glob("transport-*.safetensors"):
            if old != keep:
                old.unlink(missing_ok=True)

    def resume(self) -> ResumePoint | None:
        point = self.inner.resume()
        if point is None:
            return None
        opened = point.open_round
        stage = (
            (opened.round, "aggregated")
            if opened is not None and opened.phase is Phase.statistics
            else (point.completed_rounds, "final")
        )
        path = self._path(*stage)
        try:
            body = path.read_bytes()
            arrays = load_arrays(body)
            metadata = _metadata_of(body)
        except (OSError, SafetensorError, ValueError) as exc:
            raise DataError(
                f"cannot resume: the transport state {path} is unreadable ({exc})",
                "start the run in a new --out",
            ) from None
        self.transport.restore(arrays, metadata)
        return point

    def round_opened(self, opened: RoundOpen) -> None:
        self.inner.round_opened(opened)

    def training_closed(self, opened: RoundOpen, state: dict[str, torch.Tensor]) -> None:
        self.save(opened.round, "aggregated")
        self.inner.training_closed(opened, state)
        self._prune(self._path(opened.round, "aggregated"))

    def round_finished(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None:
        self.save(result.round, "final")
        self.inner.round_finished(result, state)
        self._prune(self._path(result.round, "final"))


def _metadata_of(body: bytes) -> dict[str, str]:
    header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])
    metadata = header.get("__metadata__") or {}
    if not {"levels", "transfer"} <= set(metadata):
        raise ValueError("it lacks its metadata")
    return dict(metadata)


def make_backend(execution: Execution, data: ClientArrays, device: str) -> SessionBackend:
    """The session backend ``execution`` asks for (Ray is imported only when asked for)."""
    if execution.backend is Backend.ray:
        from heterofl_edge.ray_backend import RayBackend

        return RayBackend(data, device, execution.address, execution.workers)
    workers = execution.workers or (1 if device == "cuda" else available_cores())
    if workers == 1:
        return InlineBackend(data, device)
    return PoolBackend(data, workers, device)


def fingerprint(config: SimulationConfig, device: str) -> dict[str, Any]:
    """What a run's results depend on: its settings (not the round count) and device kind."""
    data = config.to_json()
    data.pop("rounds")
    data["device"] = device
    return data


def load_data(config: SimulationConfig, data_dir: str | Path | None) -> TaskData:
    """``config``'s data set from ``data_dir``, shaped for its model where the loader can be.

    ``ConfigError`` when the data does not fit the model (task, input shape, classes).
    """
    arch = get_architecture(config.model)
    name = config.data_name
    assert name is not None  # the config refuses a run without a data set
    data = get_dataset(name, data_dir, fit_to=arch.input_shape)
    check_compatible(arch, data)
    return data


def evaluation_runs(count: int, workers: int) -> list[slice]:
    """The test examples cut into runs of whole evaluation batches, one per worker.

    Runs begin at multiples of ``EVAL_BATCH``, so every run's batches are the
    batches a single pass would make: the outputs are the same bits for any
    number of workers. One run per worker: each run carries the model and warms
    its kernels up once (two per worker took 4.8 s for 10,000 level-a images, one 4.1 s).
    """
    parts = max(1, workers)
    size = max(EVAL_BATCH, math.ceil(count / parts / EVAL_BATCH) * EVAL_BATCH)
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def run_simulation(
    config: SimulationConfig,
    data: TaskData,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_client: Callable[[int, int], None] | None = None,
    execution: Execution | None = None,
    journal_dir: Path | None = None,
    resume: bool = False,
    on_model: Callable[[RoundRecord, dict[str, torch.Tensor]], None] | None = None,
) -> SimulationResult:
    """Run ``config`` on ``data`` and return every round's record and the final state.

    The rounds run on ``heterofl_edge.engine.RoundEngine``, the engine the
    coordinator runs too, with client sessions on the backend ``execution``
    names. ``on_round`` gets each round's record as it ends (also, on resume,
    the records of the rounds already done); ``on_client`` gets (clients done,
    clients in the round) as a round progresses. With ``journal_dir``, every
    round is checkpointed there; ``resume`` continues the run found there.
    ``on_model`` gets each round's (version's) record with its global model, as
    it ends (benchmarks study the published models). Either callback may raise
    ``heterofl_edge.engine.Stopped`` to end the run there: the result then holds
    the rounds finished so far.
    """
    execution = execution or Execution()
    device = resolve_device(execution.accelerator)
    timed = config.fleet is not None or config.buffered
    if timed and resume:
        raise ConfigError(
            "--resume continues synchronous runs without --simulated-time only",
            "start a buffered or time-modelled run again in a new --out (it is deterministic)",
        )
    journal = (
        FileJournal(journal_dir, fingerprint(config, device), resume)
        if journal_dir is not None
        else None
    )
    arch = get_architecture(config.model)
    check_compatible(arch, data)
    task = task_for(arch)
    mix = config.level_mix
    split = task.split(
        data,
        config.num_clients,
        config.split,
        config.seed,
        config.shards_per_client,
        config.train_examples,
        config.test_examples,
    )
    train_x, train_y = (t[torch.from_numpy(split.train_keep)] for t in (data.train_x, data.train_y))
    test_x, test_y = (t[torch.from_numpy(split.test_keep)] for t in (data.test_x, data.test_y))
    train_parts, test_parts = split.train, split.test
    evaluation_model = place(arch.build(mix.global_rate, mix.global_rate), device)
    has_statistics = any(isinstance(m, StaticBatchNorm2d) for m in evaluation_model.modules())
    test_inputs = test_x.numpy()
    # Non-IID: each client's test examples, scored under its label mask (local accuracy).
    local_parts = (
        [
            (indices, label_mask(labels, data.num_classes))
            for indices, labels in zip(test_parts.indices, train_parts.labels, strict=True)
        ]
        if test_parts is not None
        else []
    )

    def initial_state() -> dict[str, torch.Tensor]:
        torch.manual_seed(config.seed)
        model = arch.build(mix.global_rate, mix.global_rate)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def test(state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        if isinstance(task, ClassificationTask):
            # data-parallel over the sessions' workers: each scores runs of the test set
            arrays = to_arrays(state)
            jobs = [
                PredictJob(arch.name, mix.global_rate, arrays, test_inputs[run])
                for run in evaluation_runs(len(test_inputs), backend.workers)
            ]
            logits = torch.from_numpy(np.concatenate(list(backend.predict(jobs))))
            overall, parts = task.score_parts(logits, test_y, local_parts)
        else:  # this process, with as many threads as sessions run at once
            evaluation_model.load_state_dict(state)
            with session_threads(max(1, min(backend.workers, available_cores()))):
                overall, parts = task.evaluate_parts(
                    evaluation_model,
                    forward_layout(test_x.to(device), device),
                    test_y.to(device),
                    local_parts,
                )
        local = None
        if test_parts is not None:
            correct = sum(part.accuracy * part.num_examples for part in parts)
            local = correct / max(sum(part.num_examples for part in parts), 1)
        return {
            "global_loss": overall.loss,
            "global_accuracy": overall.accuracy,
            "local_accuracy": local,
            f"global_{task.metric}": task.metric_of(overall),
        }

    records: list[RoundRecord] = []
    running: list[RoundEngine] = []  # the engine, once built (for on_model)

    def record(result: RoundResult) -> None:
        evaluation = result.evaluation
        train_seconds = result.seconds["training"]
        samples = result.train_samples * config.local_training.epochs
        entry = RoundRecord(
            round=result.round,
            lr=result.lr,
            levels=result.levels,
            train_loss=result.train_loss if result.train_loss is not None else math.nan,
            train_accuracy=result.train_accuracy if result.train_accuracy is not None else 0.0,
            global_loss=evaluation.get("global_loss") or math.nan,
            global_accuracy=evaluation.get("global_accuracy") or 0.0,
            local_accuracy=evaluation.get("local_accuracy"),
            train_seconds=train_seconds,
            round_seconds=result.finished_at - result.opened_at,
            train_samples=samples,
            samples_per_second=samples / max(train_seconds, 1e-9),
            seconds=dict(result.seconds),
            global_perplexity=evaluation.get("global_perplexity"),
            privacy=result.privacy,
            simulated_time=result.finished_at if timed else None,
            buffer=dict(result.buffer) if isinstance(result, BufferedResult) else None,
            transfer=transport.transfer.round(result.round),
        )
        records.append(entry)
        if on_model is not None and running:
            on_model(entry, running[0].global_state)
        if on_round:
            on_round(entry)

    arrays = ClientArrays(train_x.numpy(), train_y.numpy())
    backend = make_backend(execution, arrays, device)
    transport: SessionTransport
    engine: RoundEngine
    if timed:
        engine, transport = _timed_engine(
            config,
            arch,
            backend,
            train_parts,
            data.num_classes,
            on_client,
            None,  # a time-modelled run is not checkpointed (it is deterministic; no --resume)
            initial_state,
            test,
            has_statistics,
            record,
        )
        kept = None
    else:
        transport = SessionTransport(
            arch,
            mix.global_rate,
            backend,
            train_parts,
            data.num_classes,
            config.local_training,
            on_client,
            config.encodings,
            config.seed,
        )
        kept = (
            TransportJournal(journal, transport, journal_dir)
            if journal is not None and journal_dir is not None
            else None
        )
        engine = build_engine(
            config,
            transport,
            kept if kept is not None else MemoryJournal(),
            initial_state,
            time.time,
            population=config.num_clients,
            quorum=Quorum(min_clients=config.num_clients),
            evaluate=test,
            has_statistics=has_statistics,
            on_round=record,
            noise_seed=config.seed,  # a simulation's DP noise is reproducible from its seed
        )  # resuming, the journal restores the transport's state here
    running.append(engine)
    transport.privacy, transport.noise_seed = engine.strategy.privacy, config.seed
    initial: Mapping[str, float | None] = {}
    if journal is not None and journal.started:
        initial = journal.initial
        for done in journal.results:
            record(done)
    try:
        if journal is None or not journal.started:
            initial = engine.initial_statistics(transport.wait_for_clients(0))
            if kept is not None and journal is not None:
                kept.save(0, "final")
                journal.start(engine.global_state, initial)
        engine.run()
    finally:
        backend.close()
    return SimulationResult(
        config,
        float(initial.get("global_accuracy") or 0.0),
        records,
        engine.global_state,
        initial.get("global_perplexity"),
        engine.exhausted,
    )


def _timed_engine(
    config: SimulationConfig,
    arch: Architecture,
    backend: SessionBackend,
    parts: Partition,
    num_classes: int,
    on_client: Callable[[int, int], None] | None,
    journal: FileJournal | None,
    initial_state: Callable[[], dict[str, torch.Tensor]],
    evaluate: Callable[[dict[str, torch.Tensor]], Mapping[str, float | None]],
    has_statistics: bool,
    on_round: Callable[[RoundResult], None],
) -> tuple[RoundEngine, TimedTransport]:
    """The engine of a buffered or time-modelled run, on the simulated clock of its transport.

    With a fleet, clients are devices of its tiers and availability, timed by the
    profile policy's step-time model, which also places them under ``--policy profile``.
    """
    mix = config.level_mix
    local = config.local_training
    fleet = config.fleet
    model: TimeModel | None = None
    policy: LevelPolicy | None = None
    if fleet is not None:
        costs = level_costs(arch, mix.rates)
        examples = [len(indices) for indices in parts.indices]
        model = TimeModel(fleet, costs, examples, local.epochs, local.batch_size, config.seed)
        if config.policy is Policy.profile:
            table = LevelTable()
            rates = {
                str(i): choose_rate(
                    model.profile(i),
                    costs,
                    table,
                    fleet.round_seconds,
                    local.epochs,
                    local.batch_size,
                )
                for i in range(config.num_clients)
            }
            policy = ProfileLevels(costs, table, rates.__getitem__, rates.update)
    transport = TimedTransport(
        arch,
        mix.global_rate,
        backend,
        parts,
        num_classes,
        local,
        on_client,
        model,
        config.encodings,
        config.seed,
    )
    quorum = Quorum(
        min_clients=1 if fleet is not None else config.num_clients,
        round_seconds=fleet.round_seconds if fleet is not None else math.inf,
    )
    engine_journal: Journal | BufferedJournal
    if config.buffered:
        engine_journal = MemoryBufferedJournal()  # a buffered simulation does not resume
    else:
        engine_journal = journal if journal is not None else MemoryJournal()
    engine = build_engine(
        config,
        transport,
        engine_journal,
        initial_state,
        transport.clock,
        population=config.num_clients,
        quorum=quorum,
        policy=policy,
        evaluate=evaluate,
        has_statistics=has_statistics,
        on_round=on_round,
        noise_seed=config.seed,
    )
    return engine, transport
