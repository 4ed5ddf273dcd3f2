"""The HeteroFL round strategy: who trains which level at which learning rate.

``HeteroFLStrategy`` plans a round (``configure_round``) and opens an
aggregator for it (``aggregator``); the loops that run rounds (the in-process
simulation, the coordinator) call it and keep the I/O. A round's randomness
comes from ``(seed, round)`` alone, so a plan can be recomputed after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from heterofl_edge.aggregation import HeteroFLAggregator
from heterofl_edge.assignment import LevelMix
from heterofl_edge.bn_stats import ChannelMoments, combine_moments
from heterofl_edge.errors import ConfigError, InternalError
from heterofl_edge.privacy import PrivacyPlan, PrivateAggregator, private_statistics
from heterofl_edge.secagg import LayoutPlan
from heterofl_edge.secure_aggregation import SecureSettings, training_plan
from heterofl_edge.slicing import SlicingSpec, Submodel

__all__ = ["ClientTask", "HeteroFLStrategy", "MultiStepSchedule", "RoundPlan", "client_seed"]


@dataclass(frozen=True)
class MultiStepSchedule:
    """Learning rate ``lr * factor**k`` after k milestones (rounds counted from 1)."""

    lr: float
    milestones: tuple[int, ...] = ()
    factor: float = 0.1

    def lr_at(self, round_number: int) -> float:
        passed = sum(1 for m in self.milestones if m <= round_number - 1)
        return self.lr * self.factor**passed


@dataclass(frozen=True)
class ClientTask:
    client_id: int
    rate: float
    seed: int


@dataclass(frozen=True)
class RoundPlan:
    round: int
    lr: float
    tasks: tuple[ClientTask, ...]
    offset: int = 0  # where this round's sub-model windows start (``Submodel.offset``)


def client_seed(seed: int, round_number: int, client_id: int) -> int:
    """The seed a client shuffles its data with in a round (same everywhere it runs)."""
    return int(np.random.SeedSequence([seed, round_number, client_id]).generate_state(1)[0])


class HeteroFLStrategy:
    """Plans rounds (``configure_round``) and aggregates them (``aggregator``).

    The round engine asks the strategy for both, so that another aggregation
    (secure, private, buffered) plugs in as another strategy, never as an edit
    of the engine (Flower's configure/aggregate split). ``num_clients`` is the
    population when it is fixed (a simulation); a coordinator's changes as
    devices register, and the engine passes it with every round.
    """

    def __init__(
        self,
        spec: SlicingSpec,
        mix: LevelMix,
        num_clients: int | None,
        fraction: float,
        schedule: MultiStepSchedule,
        seed: int = 0,
        submodel: Submodel = Submodel.static,
        privacy: PrivacyPlan | None = None,
        secure: SecureSettings | None = None,
        num_classes: int = 0,
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(
                f"fraction {fraction} is outside (0, 1]", "it is the share of clients per round"
            )
        if num_clients is not None and num_clients < 1:
            raise ConfigError(f"need at least one client, got {num_clients}")
        self.spec = spec
        self.mix = mix
        self.num_clients = num_clients
        self.fraction = fraction
        self.schedule = schedule
        self.seed = seed
        self.submodel = submodel
        self.privacy = privacy  # client-level DP (heterofl_edge.privacy), or None
        self.secure = secure  # secure aggregation (heterofl_edge.secagg), or None
        self.num_classes = num_classes  # rows of a labels dimension (the label split)

    def _population(self, population: int | None) -> int:
        total = self.num_clients if population is None else population
        if total is None:
            raise InternalError("the population of a changing fleet is given with each round")
        return total

    def clients_per_round(self, population: int | None = None) -> int:
        """``ceil(fraction * clients)``, of ``population`` clients if given."""
        return max(1, math.ceil(round(self.fraction * self._population(population), 9)))

    def configure_round(
        self,
        round_number: int,
        eligible: Sequence[int] | None = None,
        population: int | None = None,
    ) -> RoundPlan:
        """Select ``ceil(fraction * clients)`` clients among ``eligible`` and their levels.

        ``eligible`` are the positions of the clients that can be reached now
        (all of them by default); ``population`` is how many clients exist
        (registered devices), by default the strategy's ``num_clients``.
        """
        total = self._population(population)
        rng = np.random.default_rng([self.seed, round_number])
        pool = np.arange(total) if eligible is None else np.asarray(eligible, dtype=np.int64)
        chosen = rng.permutation(pool)[: min(self.clients_per_round(total), len(pool))].tolist()
        rates = self.mix.rates_for(chosen, total, rng)
        tasks = tuple(
            ClientTask(c, r, client_seed(self.seed, round_number, c))
            for c, r in zip(chosen, rates, strict=True)
        )
        return RoundPlan(
            round_number,
            self.schedule.lr_at(round_number),
            tasks,
            self.submodel.offset(round_number),
        )

    @property
    def private(self) -> bool:
        """Whether rounds release only differentially private aggregates."""
        return self.privacy is not None

    def training_plan(self) -> LayoutPlan:
        """How each client lays out its secure training vector (every level in play)."""
        return training_plan(self.spec, self.mix.rates, self.mix.global_rate, self.num_classes)

    def aggregator(
        self, global_state: Mapping[str, torch.Tensor], round_number: int = 0
    ) -> HeteroFLAggregator | PrivateAggregator:
        """A fresh aggregate of one round's updates, starting from ``global_state``.

        With DP, updates are clipped and the sums noised (``PrivateAggregator``).
        """
        if self.privacy is None:
            return HeteroFLAggregator(global_state, self.spec, self.mix.global_rate)
        return PrivateAggregator(
            global_state,
            self.spec,
            self.mix.global_rate,
            self.privacy.settings(),
            self.privacy.generator(round_number, 1),
        )

    def combine_statistics(
        self, reports: Sequence[Mapping[str, ChannelMoments]], round_number: int = 0
    ) -> dict[str, ChannelMoments]:
        """The global sBN moments from clients' reports: exact, or clipped and noised (DP)."""
        if self.privacy is None:
            return combine_moments(reports)
        return private_statistics(
            reports, self.privacy.settings(), self.privacy.generator(round_number, 2)
        )

    def admit_round(
        self, round_number: int, pool: int, sampled: int, statistics: str
    ) -> str | None:
        """None if the round may run; else why not (its release would exceed the budget)."""
        if self.privacy is None:
            return None
        return self.privacy.admit(round_number, pool, sampled, statistics)

    def release(
        self, pool: int, sampled: int, statistics: str, upload_rates: Sequence[float] = ()
    ) -> dict[str, Any] | None:
        """Record what a finished round released; its privacy report (None without DP)."""
        if self.privacy is None:
            return None
        return self.privacy.release(pool, sampled, statistics, upload_rates, self.mix.rates)
