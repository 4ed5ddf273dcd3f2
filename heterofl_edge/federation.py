"""One builder: a federation spec and a transport make a round engine.

``simulate`` (clients as in-process sessions) and ``coordinator serve``
(devices over HTTP) both build their engine here, so that a setting of the
spec means the same in both loops: the strategy (selection, levels, learning
rate, sub-model rule, aggregation) comes from the spec alone, and the loops
differ only in the transport, the journal and their quorum.

``--aggregation buffered`` builds the ``BufferedEngine`` (FedBuff,
``heterofl_edge.buffered_engine``) on the same strategy, policy and quorum; it
needs a transport and a journal of its kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import torch

from heterofl_edge.buffered_engine import (
    BufferedEngine,
    BufferedJournal,
    BufferedTransport,
    BufferSettings,
)
from heterofl_edge.engine import (
    Clock,
    EngineSettings,
    Journal,
    LevelPolicy,
    RoundEngine,
    RoundResult,
    Transport,
)
from heterofl_edge.models import get_architecture
from heterofl_edge.spec import FederationSpec
from heterofl_edge.strategy import HeteroFLStrategy

__all__ = ["Quorum", "buffer_settings", "build_engine", "build_strategy"]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Quorum:
    """When a round opens and closes: a loop's own business, not the run's.

    A simulation waits for nothing (every client answers); a coordinator waits
    for devices to register, and closes rounds at their deadlines.
    """

    min_clients: int = 1  # round 1 opens once this many clients are live
    min_uploads: int = 1  # a round with fewer uploads fails and keeps the model
    round_seconds: float = math.inf  # training deadline
    stats_seconds: float = math.inf  # sBN statistics deadline
    secure_stage_seconds: float = math.inf  # each secure aggregation stage's wait


def build_strategy(
    spec: FederationSpec, population: int | None, noise_seed: int | None = None
) -> HeteroFLStrategy:
    """The spec's strategy; ``population``: a fixed client count, or None (a fleet).

    ``noise_seed`` seeds a private run's noise (a reproducible simulation); None
    draws it from the operating system (a deployment: noise nobody can predict).
    """
    arch = get_architecture(spec.model)
    return HeteroFLStrategy(
        arch.spec,
        spec.level_mix,
        population,
        spec.fraction,
        spec.schedule,
        spec.seed,
        spec.submodel,
        spec.privacy_plan(noise_seed),
        spec.secure_settings,
        arch.num_classes,
    )


def buffer_settings(spec: FederationSpec) -> BufferSettings:
    """The spec's FedBuff settings (used when ``spec.aggregation`` is buffered)."""
    return BufferSettings(
        spec.buffer_size,
        spec.staleness,
        spec.server_lr,
        spec.max_staleness,
        spec.statistics_every,
    )


def build_engine(
    spec: FederationSpec,
    transport: Transport | BufferedTransport,
    journal: Journal | BufferedJournal,
    initial_state: Callable[[], State],
    clock: Clock,
    *,
    population: int | None,
    quorum: Quorum = Quorum(),
    policy: LevelPolicy | None = None,
    evaluate: Callable[[State], Mapping[str, float | None]] | None = None,
    has_statistics: bool = True,
    on_round: Callable[[RoundResult], None] | None = None,
    noise_seed: int | None = None,
) -> RoundEngine:
    """The round engine that runs ``spec`` over ``transport`` (see the module docstring).

    ``policy`` places clients at levels (None: the strategy's Fix or Dynamic draw);
    ``evaluate`` scores the global model after each round. A buffered spec gets a
    ``BufferedEngine``, whose transport and journal must be buffered ones.
    """
    settings = EngineSettings(
        rounds=spec.total_rounds,
        min_clients=quorum.min_clients,
        min_uploads=quorum.min_uploads,
        round_seconds=quorum.round_seconds,
        stats_seconds=quorum.stats_seconds,
        statistics=spec.statistics,
        secure_stage_seconds=quorum.secure_stage_seconds,
    )
    if spec.buffered:
        return BufferedEngine(
            build_strategy(spec, population, noise_seed),
            settings,
            buffer_settings(spec),
            cast(BufferedTransport, transport),
            cast(BufferedJournal, journal),
            initial_state,
            clock,
            policy=policy,
            evaluate=evaluate,
            has_statistics=has_statistics,
            on_round=on_round,
        )
    return RoundEngine(
        build_strategy(spec, population, noise_seed),
        settings,
        transport,
        cast(Journal, journal),
        initial_state,
        clock,
        policy=policy,
        evaluate=evaluate,
        has_statistics=has_statistics,
        on_round=on_round,
    )
