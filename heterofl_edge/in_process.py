"""The round engine's transport in process: clients as training sessions on a backend.

``SessionTransport`` hands each selected client's sub-model to a session
backend (``heterofl_edge.backends``: this process, a pool of worker processes,
or Ray tasks) and returns the replies in task order, whatever order the
sessions finish in, so that the aggregate is the same bits for any number of
workers. Every client is always live and answers; statistics are computed by
the same workers, clients grouped into runs of equal size. ``MemoryJournal``
keeps no checkpoints (a run without ``--out`` cannot resume).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from heterofl_edge.backends import SessionBackend, split_clients
from heterofl_edge.dp_noise import add_distributed_noise
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
from heterofl_edge.models import Architecture
from heterofl_edge.partition import Partition
from heterofl_edge.privacy import DpPlacement, PrivacyPlan, noise_shape
from heterofl_edge.secagg import (
    SecAggClient,
    ShareRequest,
    Stage,
    UnmaskRequest,
    statistics_layout,
    statistics_vector,
    training_vector,
)
from heterofl_edge.sessions import StatsJob, TrainJob, moments_from, to_arrays, to_tensors
from heterofl_edge.slicing import extract_submodel_state
from heterofl_edge.training import LocalTrainingConfig

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
    ) -> None:
        self.arch = arch
        self.global_rate = global_rate
        self.backend = backend
        self.parts = parts
        self.num_classes = num_classes
        self.local = local
        self.on_client = on_client
        self._tasks: tuple[Task, ...] = ()
        self._state: dict[str, torch.Tensor] = {}
        # A private run's plan (set with the engine): clients add their DP noise share here.
        self.privacy: PrivacyPlan | None = None
        self.noise_seed = 0
        # Secure aggregation: each client's side of the protocol runs here, as a device's would.
        self._secure: Mapping[str, SecureInput] | None = None
        self._stage: tuple[Stage, Mapping[str, StageRequest]] | None = None
        self._secagg: dict[str, SecAggClient] = {}

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

    def open_stage(
        self,
        round_number: int,
        phase: Phase,
        stage: Stage,
        requests: Mapping[str, StageRequest],
        deadline: float,
    ) -> None:
        self._stage = (stage, requests)

    def stage_replies(self, round_number: int, phase: Phase, stage: Stage) -> Iterator[StageReply]:
        """Each client's answer, computed as a device computes it (``SecAggClient``)."""
        assert self._stage is not None and self._stage[0] is stage
        for client, request in self._stage[1].items():
            if stage is Stage.advertise:
                self._secagg[client] = SecAggClient(request.context, request.index)
                yield StageReply(client, self._secagg[client].advertise())
            elif isinstance(request.body, ShareRequest):
                body = request.body
                yield StageReply(
                    client, self._secagg[client].share_keys(body.neighbours, body.threshold)
                )
            elif isinstance(request.body, UnmaskRequest):
                answer = self._secagg[client].unmask(request.body.dropped, request.body.survivors)
                yield StageReply(client, answer)

    def close_stage(self, round_number: int, phase: Phase, stage: Stage) -> list[StageReply]:
        self._stage = None
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
        return self._secagg[client].mask(vector, layout, request.peers, request.ciphertexts)

    def replies(self, round_number: int, phase: Phase) -> Iterator[TrainReply | StatsReply]:
        if phase is Phase.statistics:
            yield from self._statistics()
            return
        jobs = [self._train_job(task) for task in self._tasks]
        for done, outcome in enumerate(self.backend.train(jobs), start=1):
            task = self._tasks[done - 1]
            update = to_tensors(outcome.update)
            plan = self.privacy
            if plan is not None and plan.placement is DpPlacement.distributed:
                update = self._noised(round_number, task, jobs[done - 1], update, plan)
            if self._secure is not None:
                yield self._secure_reply(task, jobs[done - 1], outcome.update, outcome.seconds)
                if self.on_client:
                    self.on_client(done, len(jobs))
                continue
            yield TrainReply(
                outcome.client,
                update,
                tuple(self.parts.labels[task.position]),
                outcome.num_samples,
                {"loss": outcome.loss, "accuracy": outcome.accuracy},
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
            update, secure.plan, task.rate, secure.fixed, self.parts.labels[task.position]
        )
        masked = self._masked(task.client, vector, secure, task.rate)
        return TrainReply(task.client, {}, None, 0, {}, seconds, checked=True, masked=masked)

    def _noised(
        self,
        round_number: int,
        task: Task,
        job: TrainJob,
        trained: dict[str, torch.Tensor],
        plan: PrivacyPlan,
    ) -> dict[str, torch.Tensor]:
        """A client's upload with its share of the DP noise, as a device adds it (seeded)."""
        assert plan.noise_multiplier is not None  # solved when the round was admitted
        shape = noise_shape(self.arch.spec, [t.rate for t in self._tasks])
        received = job.state
        update = {n: trained[n].double().numpy() - received[n] for n in trained}
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
        return {n: torch.from_numpy((received[n] + noised[n]).astype(np.float32)) for n in trained}

    def _train_job(self, task: Task) -> TrainJob:
        state = extract_submodel_state(
            self._state, self.arch.spec, task.rate, self.global_rate, task.offset
        )
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
            to_arrays(state),
        )

    def _statistics(self) -> Iterator[StatsReply]:
        """Every client's moments; clients go to the workers in runs of equal size."""
        tasks = self._tasks
        sizes = [len(self.parts.indices[t.position]) for t in tasks]
        state = to_arrays(self._state)
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

    def all_silent(self, clients: Sequence[str]) -> bool:
        return not clients

    def close_phase(self, round_number: int, phase: Phase) -> list[TrainReply | StatsReply]:
        return []

    def stopping(self) -> bool:
        return False


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
