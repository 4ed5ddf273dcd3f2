"""User-level differential privacy for mixed-width federations (DP-FedAvg, widths adapted).

**Training updates** (McMahan et al., ICLR 2018, adapted to HeteroFL): each
client's update, ``trained - received`` over its slice, is clipped to L2 norm
``C`` over the whole slice; the clipped updates are summed element by element,
Gaussian noise N(0, z^2 C^2) is added to every element's sum, and only then
is each sum divided by the number of clients that hold the element. The
global model moves by that average (every client received the same weights,
so averaging updates is HeteroFL's averaging of weights). An element held by
k clients carries noise of standard deviation zC/k in the average: elements
held only by the wide levels, by few clients, are noisier (``effective_noise``
reports it per level). Labels are not released: with DP, every classifier row
of a client's slice counts (no label split).

**sBN statistics**: each reporting client's per-channel mean and second
moment (over all sBN layers, one vector) is clipped to L2 norm ``C_s``, the
vectors are summed, N(0, z^2 C_s^2) is added to every entry, and the sum is
divided by the number of reports (public: who reported is known); the
variance is then the second moment minus the squared mean. Reports weigh
equally (a client's example count would be a release of its own).

**Accounting** (``PrivacyLedger``, Google's ``dp-accounting``, RDP): a fixed
population of N clients with fixed-size sampling of m without replacement per
round, i.e. replace-one adjacency, under which one client's clipped
contribution moves a sum by up to 2C: each round composes
``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` for the
update, and for the statistics the same event (``--statistics round``: the
round's uploaders) or ``GaussianDpEvent(z / 2)`` (``all``: every live client,
no sampling). A failed round releases nothing and costs nothing.

**Placement**: ``server`` (the aggregator clips and adds the noise: the
coordinator is trusted with individual updates, the published model and
statistics are private) or ``distributed`` (each client adds its share,
N(0, z^2 C^2 / (rho k)) for an element held by k clients this round, so that
the sum carries at least the full noise as long as a fraction ``rho`` of the
holders report; the server adds none; with secure aggregation the server then
never sees an unnoised update).

Everything here is pure: tensors, numbers and a noise generator passed in.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import torch

from heterofl_edge.aggregation import accumulate, validate_update
from heterofl_edge.bn_stats import ChannelMoments
from heterofl_edge.errors import ConfigError, UpdateError
from heterofl_edge.slicing import (
    SlicingSpec,
    extract_submodel_state,
    global_positions,
    trainable_names,
)

__all__ = [
    "DistributedNoiseShape",
    "DpPlacement",
    "DpSettings",
    "PrivacyPlan",
    "PrivateAggregator",
    "RoundRelease",
    "clip_update",
    "effective_noise",
    "epsilon_of",
    "noise_multiplier_for",
    "noise_shape",
    "private_statistics",
]

State = dict[str, torch.Tensor]


class DpPlacement(StrEnum):
    server = "server"  # the aggregator clips and adds the noise
    distributed = "distributed"  # each client adds its share of the noise


@dataclass(frozen=True)
class DpSettings:
    """Client-level DP: clip, noise multiplier, delta; ``ConfigError`` if impossible."""

    clip: float  # C: L2 bound of a client's update over its slice
    noise_multiplier: float  # z: noise std on each element's sum is z * C
    delta: float = 1e-5
    statistics_clip: float = 50.0  # C_s: L2 bound of a client's sBN moment vector
    placement: DpPlacement = DpPlacement.server
    max_epsilon: float | None = None  # stop before a round that would spend more
    reporting_fraction: float = 0.8  # distributed: the share of holders whose noise suffices

    def __post_init__(self) -> None:
        """Refuse settings no mechanism has."""
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"--dp-clip must be positive, got {self.clip}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(
                f"--dp-noise-multiplier must be 0 or positive, got {self.noise_multiplier}"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must lie in (0, 1), got {self.delta}")
        if not (self.statistics_clip > 0 and math.isfinite(self.statistics_clip)):
            raise ConfigError(f"--dp-statistics-clip must be positive, got {self.statistics_clip}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ConfigError(f"--dp-max-epsilon must be positive, got {self.max_epsilon}")
        if not 0 < self.reporting_fraction <= 1:
            raise ConfigError(
                f"the reporting fraction must lie in (0, 1], got {self.reporting_fraction}"
            )


def clip_update(update: Mapping[str, torch.Tensor], clip: float) -> tuple[State, float]:
    """``update`` scaled to L2 norm at most ``clip`` (over all its tensors), and its norm."""
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {n: t * scale for n, t in update.items()}, norm


class PrivateAggregator:
    """HeteroFL aggregation of clipped updates with Gaussian noise on each element's sum.

    ``add`` takes a client's trained sub-model (as ``HeteroFLAggregator.add``
    does), clips its update, and adds it in; ``finalize`` adds the noise (server
    placement) and returns the new global state. ``generator`` draws the noise:
    seed it for a reproducible simulation, leave it to the OS in a deployment.
    """

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        spec: SlicingSpec,
        global_rate: float,
        settings: DpSettings,
        generator: torch.Generator,
    ) -> None:
        self._spec = spec
        self._global_rate = global_rate
        self._settings = settings
        self._generator = generator
        self._previous = dict(global_state)
        self._names = trainable_names(spec)
        self._sums = {
            n: torch.zeros_like(global_state[n], dtype=torch.float64) for n in self._names
        }
        self._counts = {
            n: torch.zeros_like(global_state[n], dtype=torch.int32) for n in self._names
        }
        self.num_updates = 0
        self.norms: list[float] = []  # each update's norm before clipping (for the operator)

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        rate: float,
        labels: Iterable[int] | None = None,
        offset: int = 0,
        checked: bool = False,
    ) -> None:
        """Add one client's trained sub-model of width ``rate`` (labels are not used)."""
        if rate > self._global_rate:
            raise UpdateError(
                f"rate {rate:g} exceeds the global model's rate {self._global_rate:g}"
            )
        if not checked:
            validate_update(update, self._spec, rate)
        # No label split under DP (``labels`` is not used): every row of the slice counts.
        received = extract_submodel_state(
            self._previous, self._spec, rate, self._global_rate, offset
        )
        delta = {n: update[n].double() - received[n].double() for n in self._names}
        if self._settings.placement is DpPlacement.server:
            clipped, norm = clip_update(delta, self._settings.clip)
            self.norms.append(norm)
        else:  # the client clipped it, then added its noise: clipping again would undo that
            clipped = delta
        for name in self._names:
            positions = list(global_positions(self._spec[name], rate, self._global_rate, offset))
            accumulate(self._sums[name], positions, clipped[name])
            ones = torch.ones_like(clipped[name], dtype=torch.int32)
            accumulate(self._counts[name], positions, ones)
        self.num_updates += 1

    def finalize(self) -> State:
        """The new global state: old + (sum + noise) / count where any client held the element."""
        sigma = self._settings.noise_multiplier * self._settings.clip
        add_noise = self._settings.placement is DpPlacement.server and sigma > 0
        new_state = dict(self._previous)
        for name in self._names:
            counts, old = self._counts[name], self._previous[name]
            total = self._sums[name]
            if add_noise:
                noise = torch.randn(total.shape, generator=self._generator, dtype=torch.float64)
                total = total + sigma * noise
            average = total / counts.clamp(min=1)
            new_state[name] = torch.where(counts > 0, old.double() + average, old.double()).to(
                old.dtype
            )
        return new_state


def private_statistics(
    reports: Sequence[Mapping[str, ChannelMoments]],
    settings: DpSettings,
    generator: torch.Generator,
) -> dict[str, ChannelMoments]:
    """SBN moments from clipped, noised per-client means and second moments.

    Each report's vector (every layer's per-channel mean and mean of squares) is
    clipped to ``settings.statistics_clip``; the vectors are summed, noise of std
    ``z * C_s`` is added (server placement), and the sum is divided by the number
    of reports. ``count`` in the result is the number of reports.
    """
    if not reports:
        return {}
    layers = sorted(reports[0])
    sums = {
        layer: torch.zeros(2, reports[0][layer].mean.numel(), dtype=torch.float64)
        for layer in layers
    }
    for report in reports:
        if sorted(report) != layers:
            raise UpdateError("statistics reports of different layers cannot be combined")
        vector = {
            layer: torch.stack(
                [
                    report[layer].mean.double(),
                    report[layer].var.double() + report[layer].mean.double() ** 2,
                ]
            )
            for layer in layers
        }
        clipped, _ = clip_update(vector, settings.statistics_clip)
        for layer in layers:
            sums[layer] += clipped[layer]
    sigma = settings.noise_multiplier * settings.statistics_clip
    result = {}
    for layer in layers:
        total = sums[layer]
        if settings.placement is DpPlacement.server and sigma > 0:
            total = total + sigma * torch.randn(
                total.shape, generator=generator, dtype=torch.float64
            )
        mean, second = total / len(reports)
        # Noise can take a variance below zero, where batch norm would blow activations up:
        # floor it at the noise's own scale on the averaged second moment (0 without noise).
        floor = sigma / len(reports) if settings.placement is DpPlacement.server else 0.0
        var = (second - mean**2).clamp(min=floor)
        result[layer] = ChannelMoments(len(reports), mean.float(), var.float())
    return result


def effective_noise(
    settings: DpSettings, rates: Sequence[float], level_rates: Sequence[float]
) -> dict[float, float | None]:
    """Noise std on the averaged update of an element only the levels >= r hold, per level r.

    ``rates`` are the rates of this round's uploads; ``level_rates`` the levels in
    play. An element of level r's slice outside the next smaller level's is held by
    the clients at rate >= r: the noise on its average is z C / that count (None:
    no client held it).
    """
    sigma = settings.noise_multiplier * settings.clip
    out: dict[float, float | None] = {}
    for level in sorted(level_rates):
        holders = sum(1 for r in rates if r >= level)
        out[level] = sigma / holders if holders else None
    return out


@dataclass(frozen=True)
class RoundRelease:
    """What one finished round released, for the accountant (a failed round releases nothing).

    ``pool``: the clients the round's were drawn from (N); ``sampled``: the
    clients selected (m); ``statistics``: ``sampled`` (the round's uploaders
    reported sBN statistics), ``all`` (every live client did) or ``none``;
    ``noise_multiplier``: the round's z.
    """

    pool: int
    sampled: int
    statistics: str
    noise_multiplier: float

    def to_json(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "sampled": self.sampled,
            "statistics": self.statistics,
            "noise_multiplier": self.noise_multiplier,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRelease:
        return cls(
            int(data["pool"]),
            int(data["sampled"]),
            str(data["statistics"]),
            float(data["noise_multiplier"]),
        )


def dp_events(releases: Sequence[RoundRelease]) -> list[Any]:
    """The ``dp_accounting`` events of ``releases`` (see the module docstring)."""
    from dp_accounting import dp_event

    events: list[Any] = []
    for release in releases:
        # Replace-one adjacency: one client's clipped contribution moves a sum by up to 2 C.
        gaussian = dp_event.GaussianDpEvent(release.noise_multiplier / 2)
        sampled = dp_event.SampledWithoutReplacementDpEvent(release.pool, release.sampled, gaussian)
        events.append(sampled)
        if release.statistics == "sampled":
            events.append(sampled)
        elif release.statistics == "all":
            events.append(gaussian)
    return events


def epsilon_of(releases: Sequence[RoundRelease], delta: float) -> float:
    """Epsilon at ``delta`` of ``releases`` composed (0 for none; inf for a round without noise)."""
    if not releases:
        return 0.0
    if any(r.noise_multiplier <= 0 for r in releases):
        return math.inf
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # One RDP computation per distinct event (a subsampled Gaussian's takes ~0.3 s), times
    # how often it happened: RDP composes by addition.
    for event, count in Counter(dp_events(releases)).items():
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, planned: Sequence[RoundRelease], delta: float
) -> float:
    """The smallest noise multiplier whose epsilon over ``planned`` is at most the target.

    The releases' own multipliers are replaced by the one searched for.
    ``ConfigError`` when no noise reaches the target over the planned rounds.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"--dp-target-epsilon must be positive, got {target_epsilon}")

    def epsilon(z: float) -> float:
        return epsilon_of([replace(r, noise_multiplier=z) for r in planned], delta)

    high = 1.0
    while epsilon(high) > target_epsilon:
        high *= 2
        if high > 1e4:
            raise ConfigError(
                f"no noise multiplier reaches epsilon {target_epsilon:g} at delta {delta:g} "
                f"over {len(planned)} rounds",
                "allow a larger --dp-target-epsilon, fewer --rounds or a smaller --fraction",
            )
    low = 0.0
    for _ in range(14):  # bisection: the bracket shrinks to 6e-5 of its start
        middle = (low + high) / 2
        if epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


@dataclass
class PrivacyPlan:
    """A run's differential privacy: its settings, its ledger, and the noise it draws.

    The round engine asks it (through the strategy) whether a round may run
    within ``max_epsilon`` (``admit``), for the round's noise generator, and
    records what each finished round released (``release``). With a target
    epsilon instead of a noise multiplier, the multiplier is solved at the first
    round from its pool, sample and the rounds planned, and kept (a restart takes
    it from the rounds already released). Noise is drawn from ``seed`` (a
    reproducible simulation) or from the operating system (a deployment).
    """

    clip: float
    delta: float
    statistics_clip: float
    placement: DpPlacement
    total_rounds: int
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_epsilon: float | None = None
    seed: int | None = None
    reporting_fraction: float = 0.8  # distributed: the share of holders whose noise suffices
    releases: list[RoundRelease] = field(default_factory=list)

    def settings(self) -> DpSettings:
        if self.noise_multiplier is None:
            raise ConfigError("the noise multiplier is solved when the first round opens")
        return DpSettings(
            self.clip,
            self.noise_multiplier,
            self.delta,
            self.statistics_clip,
            self.placement,
            self.max_epsilon,
            self.reporting_fraction,
        )

    def epsilon(self) -> float:
        return epsilon_of(self.releases, self.delta)

    def restore(self, history: Iterable[Mapping[str, Any]]) -> None:
        """The releases of rounds already finished (a resumed run), in order."""
        self.releases = [RoundRelease.from_json(h) for h in history]
        if self.releases and self.noise_multiplier is None:
            self.noise_multiplier = self.releases[-1].noise_multiplier

    def admit(self, number: int, pool: int, sampled: int, statistics: str) -> str | None:
        """None if round ``number`` may run; else why not (the budget would be exceeded)."""
        if self.noise_multiplier is None:
            assert self.target_epsilon is not None  # the spec gives one or the other
            remaining = max(1, self.total_rounds - len(self.releases))
            planned = [RoundRelease(pool, sampled, statistics, 1.0)] * remaining
            self.noise_multiplier = noise_multiplier_for(
                self.target_epsilon, [*self.releases, *planned], self.delta
            )
        if self.max_epsilon is None:
            return None
        after = epsilon_of(
            [*self.releases, RoundRelease(pool, sampled, statistics, self.noise_multiplier)],
            self.delta,
        )
        if after <= self.max_epsilon:
            return None
        return (
            f"round {number} would spend epsilon {after:.3g} at delta {self.delta:g}, over "
            f"--dp-max-epsilon {self.max_epsilon:g} (spent so far: {self.epsilon():.3g})"
        )

    def generator(self, number: int, purpose: int) -> torch.Generator:
        """The noise of round ``number``: seeded from (seed, round, purpose), or from the OS."""
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            import numpy as np

            state = np.random.SeedSequence([self.seed, number, purpose, 0xD1FF]).generate_state(1)
            generator.manual_seed(int(state[0]))
        return generator

    def release(
        self,
        pool: int,
        sampled: int,
        statistics: str,
        upload_rates: Sequence[float] = (),
        level_rates: Sequence[float] = (),
    ) -> dict[str, Any]:
        """Record a finished round's release; what the round's result reports of privacy.

        ``effective_noise``: per level in play, the noise std on the averaged update of
        an element that only that level and wider ones hold (``effective_noise``).
        """
        from heterofl_edge.levels import rate_label

        assert self.noise_multiplier is not None
        release = RoundRelease(pool, sampled, statistics, self.noise_multiplier)
        self.releases.append(release)
        noise = effective_noise(self.settings(), upload_rates, level_rates)
        return {
            **release.to_json(),
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "clip": self.clip,
            "placement": self.placement.value,
            "effective_noise": {rate_label(r): std for r, std in noise.items()},
        }


@dataclass(frozen=True)
class DistributedNoiseShape:
    """Which clients hold which elements this round, as ``heterofl_edge.dp_noise`` reads it."""

    sizes: dict[str, list[list[int]]]
    blocks: dict[str, list[int]]


def noise_shape(spec: SlicingSpec, rates: Sequence[float]) -> DistributedNoiseShape:
    """Per trainable tensor and dimension: each rate's block size, and the blocks (0: fixed)."""
    from heterofl_edge.slicing import DimKind

    sizes: dict[str, list[list[int]]] = {}
    blocks: dict[str, list[int]] = {}
    for name in trainable_names(spec):
        rule = spec[name]
        sizes[name], blocks[name] = [], []
        for dim in rule.dims:
            if dim.kind in (DimKind.fixed, DimKind.labels):
                sizes[name].append([-1] * len(rates))
                blocks[name].append(0)
            else:
                per = dim.heads if dim.kind is DimKind.heads else 1
                sizes[name].append([dim.size(r) // per for r in rates])
                blocks[name].append(per)
    return DistributedNoiseShape(sizes, blocks)
