"""Protocol-level clients for secure aggregation tests and the bench: they train nothing.

``ProtocolClients`` is a round engine transport whose clients answer every
secure aggregation stage as a device does (``heterofl_edge.secagg.SecAggClient``)
and "train" by adding a fixed, known update to the slice they received, so a
test can compute the exact plain aggregate of any set of survivors. A client
listed in ``vanish`` answers the stages before the one named and nothing from
it on, as a device that lost its connection (in the rounds ``vanish_rounds``,
every round when None).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from heterofl_edge.aggregation import HeteroFLAggregator
from heterofl_edge.batching import SplitMix64
from heterofl_edge.bn_stats import ChannelMoments, combine_moments
from heterofl_edge.encoding import upload_seed
from heterofl_edge.engine import (
    Client,
    Phase,
    SecureInput,
    StageReply,
    StageRequest,
    StatsReply,
    Task,
    TrainReply,
)
from heterofl_edge.secagg import (
    SecAggClient,
    ShareRequest,
    Stage,
    UnmaskRequest,
    statistics_layout,
    statistics_vector,
    training_vector,
)
from heterofl_edge.slicing import SlicingSpec, extract_submodel_state, trainable_names

ORDER = [Stage.advertise, Stage.share, Stage.masked, Stage.unmask]


class ProtocolClients:
    def __init__(
        self,
        spec: SlicingSpec,
        global_rate: float,
        labels: Sequence[Sequence[int]],
        channels: Mapping[str, int],
        seed: int = 0,
        vanish: Mapping[str, Stage] | None = None,
        scale: float = 0.01,
        vanish_rounds: set[int] | None = None,
    ) -> None:
        self.spec = spec
        self.global_rate = global_rate
        self.labels = [list(x) for x in labels]
        self.channels = dict(channels)
        self.seed = seed
        self.vanish = dict(vanish or {})
        self.scale = scale
        self.vanish_rounds = vanish_rounds
        self._round = 0
        self.secagg: dict[tuple[str, str], SecAggClient] = {}  # by client and context
        self.trained: dict[str, dict[str, torch.Tensor]] = {}  # what each client uploaded
        # per phase: what the coordinator received, and the vector behind it before masking
        self.masked: dict[Phase, dict[str, np.ndarray]] = {p: {} for p in Phase}
        self.vectors: dict[Phase, dict[str, np.ndarray]] = {p: {} for p in Phase}
        self.updates: dict[str, dict[str, np.ndarray]] = {}
        self.moments: dict[str, dict[str, ChannelMoments]] = {}
        self._tasks: tuple[Task, ...] = ()
        self._state: Mapping[str, torch.Tensor] = {}
        self._secure: Mapping[str, SecureInput] | None = None
        self._stages: list[tuple[Phase, Stage, Mapping[str, StageRequest]]] = []
        self.stage_log: list[tuple[int, Phase, Stage]] = []  # every stage opened, in order
        self._phase = Phase.training

    # -- who is there --
    def gone(self, client: str, stage: Stage) -> bool:
        """Whether ``client`` has vanished by ``stage`` (for good once a phase lost it)."""
        at = self.vanish.get(client)
        if at is None or (self.vanish_rounds is not None and self._round not in self.vanish_rounds):
            return False
        return self._phase is Phase.statistics or ORDER.index(stage) >= ORDER.index(at)

    def wait_for_clients(self, minimum: int) -> list[Client]:
        return [Client(str(i), i) for i in range(len(self.labels))]

    def population(self) -> int:
        return len(self.labels)

    def all_silent(self, clients: Sequence[str]) -> bool:
        return all(self.gone(c, Stage.unmask) for c in clients)

    def stopping(self) -> bool:
        return False

    # -- phases --
    def open_phase(self, round_number, phase, tasks, state, deadline, secure=None) -> None:
        self._tasks, self._state, self._secure, self._phase = tuple(tasks), state, secure, phase
        self._round = round_number

    def update_of(self, task: Task) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, task.position, 17])
        received = extract_submodel_state(self._state, self.spec, task.rate, self.global_rate)
        return {
            n: (self.scale * rng.standard_normal(tuple(received[n].shape))).astype(np.float32)
            for n in trainable_names(self.spec)
        }

    def moments_of(self, client: str) -> dict[str, ChannelMoments]:
        rng = np.random.default_rng([self.seed, int(client), 29])
        count = int(rng.integers(100, 5000))
        return {
            layer: ChannelMoments(
                count,
                torch.from_numpy(rng.normal(0, 1, c).astype(np.float32)),
                torch.from_numpy(rng.uniform(0.1, 3, c).astype(np.float32)),
            )
            for layer, c in self.channels.items()
        }

    def replies(self, round_number: int, phase: Phase) -> Iterator[TrainReply | StatsReply | None]:
        for task in self._tasks:
            if self.gone(task.client, Stage.masked):
                continue
            secure = self._secure[task.client] if self._secure is not None else None
            if phase is Phase.statistics:
                moments = self.moments_of(task.client)
                self.moments[task.client] = moments
                if secure is None:
                    yield StatsReply(task.client, moments)
                    continue
                arrays = {}
                for layer, m in moments.items():
                    arrays[f"{layer}.count"] = np.array([m.count], np.float32)
                    arrays[f"{layer}.mean"], arrays[f"{layer}.var"] = m.mean.numpy(), m.var.numpy()
                vector = statistics_vector(arrays, secure.layers, secure.statistics_scale)
                layout = statistics_layout(secure.layers)
            else:
                update = self.update_of(task)
                received = extract_submodel_state(
                    self._state, self.spec, task.rate, self.global_rate
                )
                trained = {n: received[n] + torch.from_numpy(u) for n, u in update.items()}
                self.trained[task.client], self.updates[task.client] = trained, update
                labels = tuple(self.labels[task.position])
                if secure is None:
                    yield TrainReply(task.client, trained, labels, 1, {}, 0.0)
                    continue
                deltas = {
                    n: trained[n].double().numpy() - received[n].double().numpy() for n in update
                }
                rng = SplitMix64(upload_seed(task.seed))  # int8's rounding, as a device's
                vector = training_vector(deltas, secure.plan, task.rate, secure.fixed, labels, rng)
                layout = secure.plan.layout(task.rate)
            request = secure.request
            masked = self.secagg[(task.client, secure.context)].mask(
                vector, layout, request.peers, request.ciphertexts, secure.modulus_bits
            )
            self.masked[phase][task.client], self.vectors[phase][task.client] = masked, vector
            if phase is Phase.training:
                yield TrainReply(task.client, {}, None, 0, {}, 0.0, checked=True, masked=masked)
            else:
                yield StatsReply(task.client, {}, masked)
        yield None

    def close_phase(self, round_number: int, phase: Phase) -> list:
        return []

    # -- stages --
    def open_stage(self, round_number, phase, stage, requests, deadline) -> None:
        self._stages.append((phase, stage, requests))
        self.stage_log.append((round_number, phase, stage))
        self._round = round_number
        # A statistics instance's keys set up beside the training's are part of training's
        # time line (who vanishes at a training stage misses both instances' stage).
        opened = {p for p, _, _ in self._stages}
        self._phase = Phase.training if Phase.training in opened else Phase.statistics

    def stage_replies(self, round_number) -> Iterator[StageReply | None]:
        for _, stage, requests in self._stages:
            for client, request in requests.items():
                if self.gone(client, stage):
                    continue
                key = (client, request.context)
                body = request.body
                if stage is Stage.advertise:
                    self.secagg[key] = SecAggClient(request.context, request.index)
                    answer = self.secagg[key].advertise()
                elif isinstance(body, ShareRequest):
                    answer = self.secagg[key].share_keys(body.neighbours, body.threshold)
                else:
                    assert isinstance(body, UnmaskRequest)
                    answer = self.secagg[key].unmask(body.dropped, body.survivors)
                yield StageReply(request.context, client, answer)
        yield None

    def close_stages(self, round_number) -> list:
        self._stages = []
        return []

    # -- what the plain aggregation of some clients gives --
    def plain_state(
        self, state: Mapping[str, torch.Tensor], tasks: Sequence[Task], clients: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        aggregator = HeteroFLAggregator(state, self.spec, self.global_rate)
        for task in tasks:
            if task.client in clients:
                aggregator.add(self.trained[task.client], task.rate, self.labels[task.position])
        return aggregator.finalize()

    def plain_moments(self, clients: Sequence[str]) -> dict[str, ChannelMoments]:
        return combine_moments([self.moments[c] for c in clients])
