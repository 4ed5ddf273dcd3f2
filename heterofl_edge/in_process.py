"""The round engine's transport in process: clients as training sessions on a backend.

``SessionTransport`` hands each selected client's sub-model to a session
backend (``heterofl_edge.backends``: this process, a pool of worker processes,
or Ray tasks) and returns the replies in task order, whatever order the
sessions finish in, so that the aggregate is the same bits for any number of
workers. Every client is always live and answers; statistics are computed by
the same workers, clients grouped into runs of equal size. ``MemoryJournal``
keeps no checkpoints (a run without ``--out`` cannot resume).

The transport encodes what a device would receive and send
(``heterofl_edge.encoding``), with the coordinator's seeds, so that a run's
quantization costs the accuracy it costs over the network: every client trains
from the weights it would decode, lossy uploads are encoded as updates (with
each client's error-feedback residual) and added back, and ``transfer`` counts
the payloads' bytes. Every simulated client declares every encoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from heterofl_edge.backends import SessionBackend, split_clients
from heterofl_edge.batching import SplitMix64
from heterofl_edge.dp_noise import add_distributed_noise
from heterofl_edge.encoding import (
    Encoding,
    EncodingPlan,
    TransferLog,
    UpdateEncoder,
    apply_update,
    decode_payload,
    download_seed,
    encode_payload,
    upload_seed,
)
from heterofl_edge.engine import (
    Client,
    Phase,
    RoundOpen,
    RoundResult,
    SecureInput,
    StageReply,
    StageRequest,
    StatsReply,
    Task,
    TrainReply,
)
from heterofl_edge.levels import rate_label
from heterofl_edge.models import Architecture
from heterofl_edge.partition import Partition
from heterofl_edge.privacy import DpPlacement, PrivacyPlan, noise_shape
from heterofl_edge.protocol import UploadMetadata
from heterofl_edge.secagg import (
    MODULUS_BITS,
    SecAggClient,
    ShareRequest,
    Stage,
    UnmaskRequest,
    statistics_layout,
    statistics_vector,
    training_vector,
)
from heterofl_edge.sessions import (
    Arrays,
    StatsJob,
    TrainJob,
    moments_from,
    to_arrays,
    to_tensors,
)
from heterofl_edge.slicing import extract_submodel_state
from heterofl_edge.training import LocalTrainingConfig

EVERY_ENCODING = tuple(e.value for e in Encoding)

__all__ = ["MemoryJournal", "SessionTransport"]


class SessionTransport:
    """Clients as sessions on a backend; replies come back in task order."""

    def __init__(
        self,
        arch: Architecture,
        global_rate: float,
        backend: SessionBackend,
        parts: Partition,
        num_classes: int,
        local: LocalTrainingConfig,
        on_client: Callable[[int, int], None] | None,
        plan: EncodingPlan | None = None,
        run_seed: int = 0,
    ) -> None:
        self.arch = arch
        self.global_rate = global_rate
        self.backend = backend
        self.parts = parts
        self.num_classes = num_classes
        self.local = local
        self.on_client = on_client
        self.plan = plan or EncodingPlan()
        self.run_seed = run_seed
        self.transfer = TransferLog()
        self.encoders: dict[int, UpdateEncoder] = {}  # by client position (error feedback)
        self._round = 0
        self._tasks: tuple[Task, ...] = ()
        self._state: dict[str, torch.Tensor] = {}
        # A private run's plan (set with the engine): clients add their DP noise share here.
        self.privacy: PrivacyPlan | None = None
        self.noise_seed = 0
        # Secure aggregation: each client's side of the protocol runs here, as a device's would.
        self._secure: Mapping[str, SecureInput] | None = None
        self._stages: list[tuple[Stage, Mapping[str, StageRequest]]] = []  # open, in order
        # Each client's protocol state, by instance context (the latest two rounds' at most).
        self._secagg: dict[str, dict[str, SecAggClient]] = {}
        self._downloads: dict[float, tuple[Encoding, Arrays]] = {}  # this round's, by rate
        self._download_sizes: dict[float, int] = {}

    def wait_for_clients(self, minimum: int) -> list[Client]:
        return [Client(str(i), i) for i in range(self.parts.num_clients)]

    def population(self) -> int:
        return self.parts.num_clients

    def open_phase(
        self,
        round_number: int,
        phase: Phase,
        tasks: Sequence[Task],
        state: dict[str, torch.Tensor],
        deadline: float,
        secure: Mapping[str, SecureInput] | None = None,
    ) -> None:
        self._tasks, self._state, self._secure = tuple(tasks), state, secure
        self._round, self._downloads, self._download_sizes = round_number, {}, {}

    def open_stage(
        self,
        round_number: int,
        phase: Phase,
        stage: Stage,
        requests: Mapping[str, StageRequest],
        deadline: float,
    ) -> None:
        self._stages.append((stage, requests))

    def stage_replies(self, round_number: int) -> Iterator[StageReply]:
        """Each client's answer to each open stage, computed as a device computes it."""
        for stage, requests in self._stages:
            for client, request in requests.items():
                yield StageReply(request.context, client, self._answer(stage, client, request))

    def _answer(self, stage: Stage, client: str, request: StageRequest) -> object:
        if stage is Stage.advertise:
            if request.context not in self._secagg:
                while len(self._secagg) >= 4:  # as a device keeps them
                    self._secagg.pop(next(iter(self._secagg)))
                self._secagg[request.context] = {}
            held = self._secagg[request.context]
            held[client] = SecAggClient(request.context, request.index)
            return held[client].advertise()
        held_client = self._secagg[request.context][client]
        body = request.body
        if isinstance(body, ShareRequest):
            return held_client.share_keys(body.neighbours, body.threshold)
        assert isinstance(body, UnmaskRequest)
        return held_client.unmask(body.dropped, body.survivors)

    def close_stages(self, round_number: int) -> list[StageReply]:
        self._stages = []
        return []

    def _masked(
        self, client: str, vector: np.ndarray, secure: SecureInput, rate: float
    ) -> np.ndarray:
        layout = (
            secure.plan.layout(rate)
            if secure.plan is not None
            else statistics_layout(secure.layers)
        )
        request = secure.request
        bits = secure.modulus_bits
        held = self._secagg[secure.context][client]
        masked = held.mask(vector, layout, request.peers, request.ciphertexts, bits)
        phase = "train" if secure.plan is not None else "statistics"
        upload = "int8" if bits < MODULUS_BITS else "fp32"
        size = len(encode_payload({"masked": masked}, Encoding.fp32))
        self.transfer.add(self._round, "up", phase, upload, size, client)
        return masked

    def replies(self, round_number: int, phase: Phase) -> Iterator[TrainReply | StatsReply | None]:
        if phase is Phase.statistics:
            yield from self._statistics()
            return
        jobs = [self._train_job(task) for task in self._tasks]
        for done, outcome in enumerate(self.backend.train(jobs), start=1):
            task = self._tasks[done - 1]
            labels = tuple(self.parts.labels[task.position])
            metrics = {"loss": outcome.loss, "accuracy": outcome.accuracy}
            trained = outcome.update
            plan = self.privacy
            if plan is not None and plan.placement is DpPlacement.distributed:
                trained = self._noised(round_number, task, jobs[done - 1], trained, plan)
            if self._secure is not None:
                yield self._secure_reply(task, jobs[done - 1], trained, outcome.seconds)
                if self.on_client:
                    self.on_client(done, len(jobs))
                continue
            weights = self._uploaded(task, trained, outcome.num_samples, labels, metrics)
            yield TrainReply(
                outcome.client,
                to_tensors(weights),
                labels,
                outcome.num_samples,
                metrics,
                outcome.seconds,
                checked=True,  # this process's own sessions trained it from the task
            )
            if self.on_client:
                self.on_client(done, len(jobs))

    def _secure_reply(
        self, task: Task, job: TrainJob, trained: Mapping[str, np.ndarray], seconds: float
    ) -> TrainReply:
        """A client's masked training vector: its update, label rows and label presence."""
        assert self._secure is not None
        secure = self._secure[task.client]
        assert secure.plan is not None and secure.fixed is not None
        update = {n: trained[n].astype(np.float64) - job.state[n] for n in secure.plan.names}
        vector = training_vector(
            update,
            secure.plan,
            task.rate,
            secure.fixed,
            self.parts.labels[task.position],
            SplitMix64(upload_seed(task.seed)),
        )
        masked = self._masked(task.client, vector, secure, task.rate)
        return TrainReply(task.client, {}, None, 0, {}, seconds, checked=True, masked=masked)

    def _noised(
        self,
        round_number: int,
        task: Task,
        job: TrainJob,
        trained: Arrays,
        plan: PrivacyPlan,
    ) -> Arrays:
        """A client's upload with its share of the DP noise, as a device adds it (seeded)."""
        assert plan.noise_multiplier is not None  # solved when the round was admitted
        shape = noise_shape(self.arch.spec, [t.rate for t in self._tasks])
        received = job.state
        update = {n: np.asarray(trained[n], np.float64) - received[n] for n in trained}
        seed = np.random.SeedSequence([self.noise_seed, round_number, task.position, 0xD15])
        noised = add_distributed_noise(
            update,
            plan.clip,
            plan.noise_multiplier,
            plan.reporting_fraction,
            shape.sizes,
            shape.blocks,
            np.random.default_rng(seed),
        )
        return {n: (received[n] + noised[n]).astype(np.float32) for n in trained}

    def _download(self, rate: float, offset: int, phase: Phase) -> tuple[Encoding, Arrays, int]:
        """What a device of width ``rate`` decodes from its download, and the download's size."""
        encoding, _, _ = self.plan.choose(rate, EVERY_ENCODING)
        if phase is Phase.training and rate in self._downloads:
            cached_encoding, arrays = self._downloads[rate]
            return cached_encoding, arrays, self._download_sizes[rate]
        state = to_arrays(
            extract_submodel_state(self._state, self.arch.spec, rate, self.global_rate, offset)
        )
        body = encode_payload(
            state,
            encoding,
            download_seed(self.run_seed, self._round, rate, phase.value),
            {"round": str(self._round), "rate": repr(rate)},
        )
        arrays = state if encoding is Encoding.fp32 else decode_payload(body).arrays
        if phase is Phase.training:
            self._downloads[rate] = (encoding, arrays)
            self._download_sizes[rate] = len(body)
        return encoding, arrays, len(body)

    def _uploaded(
        self,
        task: Task,
        trained: Arrays,
        num_samples: int,
        labels: tuple[int, ...],
        metrics: Mapping[str, float],
    ) -> Arrays:
        """The weights the coordinator would fold for ``trained``, as it would receive them."""
        _, upload, _ = self.plan.choose(task.rate, EVERY_ENCODING)
        _, received = self._downloads[task.rate]
        encoder = self.encoders.setdefault(task.position, UpdateEncoder())
        metadata = UploadMetadata(num_samples=num_samples, labels=list(labels), metrics=metrics)
        body = encoder.encode(
            trained,
            received,
            upload,
            upload_seed(task.seed),
            rate_label(task.rate),
            self.plan.error_feedback and upload.lossy,
            metadata.to_metadata(),
        )
        self.transfer.add(self._round, "up", "train", upload.value, len(body), task.client)
        if not upload.lossy:
            return dict(trained)
        return apply_update(received, decode_payload(body).arrays)

    def _train_job(self, task: Task) -> TrainJob:
        encoding, state, size = self._download(task.rate, task.offset, Phase.training)
        self.transfer.add(self._round, "down", "train", encoding.value, size, task.client)
        return TrainJob(
            task.client,
            self.arch.name,
            task.rate,
            self.global_rate,
            task.lr,
            task.seed,
            self.parts.indices[task.position],
            tuple(self.parts.labels[task.position]),
            self.num_classes,
            self.local,
            {name: np.array(a) for name, a in state.items()},
        )

    def _statistics(self) -> Iterator[StatsReply]:
        """Every client's moments; clients go to the workers in runs of equal size."""
        tasks = self._tasks
        sizes = [len(self.parts.indices[t.position]) for t in tasks]
        encoding, state, size = self._download(self.global_rate, 0, Phase.statistics)
        for task in tasks:
            self.transfer.add(self._round, "down", "statistics", encoding.value, size, task.client)
        groups = split_clients(sizes, 2 * self.backend.workers if self.backend.workers > 1 else 1)
        jobs = [
            StatsJob(
                self.arch.name,
                self.global_rate,
                state,
                tuple(tasks[i].client for i in group),
                tuple(self.parts.indices[tasks[i].position] for i in group),
            )
            for group in groups
        ]
        for outcome in self.backend.statistics(jobs):
            for client, report in outcome:
                if self._secure is None:
                    self.transfer.add(
                        self._round, "up", "statistics", "fp32", _statistics_size(report), client
                    )
                    yield StatsReply(client, moments_from(report))
                    continue
                secure = self._secure[client]
                arrays = {
                    f"{layer}.{part}": value
                    for layer, (count, mean, var) in report.items()
                    for part, value in (("count", np.array([count])), ("mean", mean), ("var", var))
                }
                vector = statistics_vector(arrays, secure.layers, secure.statistics_scale)
                masked = self._masked(client, vector, secure, self.global_rate)
                yield StatsReply(client, {}, masked)

    def snapshot(self) -> tuple[Arrays, dict[str, str]]:
        """What a resumed run needs of this transport: residuals, and bytes moved so far."""
        arrays: Arrays = {}
        levels: dict[str, str] = {}
        for position, encoder in sorted(self.encoders.items()):
            if encoder.level is None:
                continue
            levels[str(position)] = encoder.level
            for name, residual in encoder.residual.items():
                arrays[f"{position}/{name}"] = residual
        metadata = {
            "levels": json.dumps(levels, sort_keys=True),
            "transfer": json.dumps(self.transfer.to_json(), sort_keys=True),
        }
        return arrays, metadata

    def restore(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        """Take back a ``snapshot``."""
        levels = json.loads(metadata["levels"])
        self.encoders = {}
        for position, level in levels.items():
            prefix = f"{position}/"
            residual = {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
            self.encoders[int(position)] = encoder = UpdateEncoder()
            encoder.restore(level, residual)
        self.transfer = TransferLog()
        self.transfer.load(json.loads(metadata["transfer"]))

    def all_silent(self, clients: Sequence[str]) -> bool:
        return not clients

    def close_phase(self, round_number: int, phase: Phase) -> list[TrainReply | StatsReply]:
        return []

    def stopping(self) -> bool:
        return False


def _statistics_size(report: Mapping[str, tuple[int, np.ndarray, np.ndarray]]) -> int:
    """Bytes of a device's statistics upload: LAYER.count, .mean, .var as float32."""
    arrays: dict[str, Any] = {}
    for layer, (count, mean, var) in report.items():
        arrays[f"{layer}.count"] = np.array(float(count), np.float32)
        arrays[f"{layer}.mean"] = np.asarray(mean, np.float32)
        arrays[f"{layer}.var"] = np.asarray(var, np.float32)
    return len(encode_payload(arrays, Encoding.fp32))


class MemoryJournal:
    """Checkpoints kept nowhere: a run without ``--out`` journal cannot resume."""

    def resume(self) -> None:
        return None

    def round_opened(self, opened: RoundOpen) -> None:
        return None

    def training_closed(self, opened: RoundOpen, state: dict[str, torch.Tensor]) -> None:
        return None

    def round_finished(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None:
        return None
