"""Simulated time: how long each simulated device takes, and when it is there at all.

``simulate --simulated-time`` gives every simulated client a device (a
``SimulatedFleet``): a speed tier (a step-time multiple and a link speed,
dealt round-robin by position, as the demo's fleet) and a seeded on/off
availability process (a phone that trains only while charging). A training
session then takes what the profile policy's step-time model
(``heterofl_edge.profile_policy.estimate_seconds``) says for the client's
level, examples and link; a client that goes offline during a session loses
it. The round engines read the simulated clock, so a run reports simulated
wall-clock time, deterministic for a seed whatever the number of workers.

Availability alternates online and offline spells of exponential length
(means ``online_seconds`` and ``offline_seconds``), each client's drawn from
``(seed, position)`` alone; a client starts online with the stationary
probability ``on / (on + off)``. Everything here is pure (numbers in, numbers
out); ``heterofl_edge.timed_transport`` runs sessions by it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from heterofl_edge.errors import ConfigError, InternalError
from heterofl_edge.profile_policy import DeviceProfile, LevelCost, estimate_seconds

__all__ = [
    "DEMO_TIERS",
    "Availability",
    "DeviceTier",
    "OnOff",
    "SimulatedFleet",
    "TimeModel",
    "parse_availability",
    "parse_tiers",
]


@dataclass(frozen=True)
class DeviceTier:
    """One kind of simulated device: how much slower it steps, its link and memory."""

    slowdown: float = 1.0  # step time as a multiple of the fleet's step_ms
    bandwidth_mbps: float = 1000.0
    memory_mb: float = 4096.0

    def __post_init__(self) -> None:
        """Refuse a tier no device has."""
        for name, value in (
            ("slowdown", self.slowdown),
            ("bandwidth", self.bandwidth_mbps),
            ("memory", self.memory_mb),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"a device tier's {name} must be positive, got {value}")

    def __str__(self) -> str:
        """The tier as ``--tiers`` takes it."""
        return f"{self.slowdown:g}@{self.bandwidth_mbps:g}@{self.memory_mb:g}"


# The demo's fleet (heterofl-edge demo, device_sim.fleet.DEFAULT_PROFILES): fast, 3x slower
# on 50 Mbit/s with 1 GB, 10x slower on 10 Mbit/s with 256 MB.
DEMO_TIERS = (
    DeviceTier(1.0, 1000.0, 4096.0),
    DeviceTier(3.0, 50.0, 1024.0),
    DeviceTier(10.0, 10.0, 256.0),
)


def parse_tiers(text: str) -> tuple[DeviceTier, ...]:
    """``"1,3@50@1024,10@10@256"``: slowdowns, each ``@Mbit/s@MB`` optionally; ``ConfigError``.

    Left out, a tier's link is 1000 Mbit/s and its memory 4096 MB.
    """
    tiers = []
    for part in (p.strip() for p in text.split(",")):
        try:
            numbers = [float(v) for v in part.split("@")]
            if not 1 <= len(numbers) <= 3:
                raise ValueError(part)
        except ValueError:
            raise ConfigError(
                f"--tiers {text!r} is not a list of device tiers",
                "e.g. --tiers 1,3@50@1024,10@10@256 (slowdown, then @ link Mbit/s @ memory MB)",
            ) from None
        tiers.append(DeviceTier(*numbers))
    return tuple(tiers)


@dataclass(frozen=True)
class Availability:
    """Mean lengths of a client's online and offline spells, in simulated seconds."""

    online_seconds: float
    offline_seconds: float

    def __post_init__(self) -> None:
        """Refuse spells that are not positive."""
        if not all(v > 0 and math.isfinite(v) for v in (self.online_seconds, self.offline_seconds)):
            raise ConfigError(
                f"--availability spells must be positive, got {self.online_seconds:g}, "
                f"{self.offline_seconds:g}",
                "e.g. --availability 3600,1200 (mean online, offline seconds)",
            )

    def __str__(self) -> str:
        """The spells as ``--availability`` takes them."""
        return f"{self.online_seconds:g},{self.offline_seconds:g}"


def parse_availability(text: str) -> Availability | None:
    """``"always"`` (None) or ``"ON,OFF"`` mean spell lengths in seconds; ``ConfigError``."""
    if text.strip().lower() == "always":
        return None
    try:
        online, offline = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--availability {text!r} is neither 'always' nor ON,OFF",
            "e.g. --availability 3600,1200 (mean online, offline seconds)",
        ) from None
    return Availability(online, offline)


@dataclass(frozen=True)
class SimulatedFleet:
    """The simulated devices behind ``simulate --simulated-time``."""

    tiers: tuple[DeviceTier, ...] = DEMO_TIERS  # dealt round-robin by client position
    step_ms: float = 5.0  # a 1x device's training step at the smallest level in play
    availability: Availability | None = None  # None: every client always online
    round_seconds: float = 600.0  # the synchronous deadline; the profile policy's budget
    silent_seconds: float = 30.0  # a client that vanished mid-task is noticed this much later

    def __post_init__(self) -> None:
        """Refuse a fleet that cannot run."""
        if not self.tiers:
            raise ConfigError("a simulated fleet needs at least one device tier")
        for name, value in (
            ("--step-ms", self.step_ms),
            ("--round-seconds", self.round_seconds),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be positive, got {value}")
        if not (self.silent_seconds >= 0 and math.isfinite(self.silent_seconds)):
            raise ConfigError(f"the silence delay must be >= 0, got {self.silent_seconds}")

    def tier(self, position: int) -> DeviceTier:
        return self.tiers[position % len(self.tiers)]

    def to_json(self) -> dict[str, object]:
        return {
            "tiers": [str(t) for t in self.tiers],
            "step_ms": self.step_ms,
            "availability": None if self.availability is None else str(self.availability),
            "round_seconds": self.round_seconds,
            "silent_seconds": self.silent_seconds,
        }


class OnOff:
    """One client's seeded on/off process; spells are drawn as far as they are asked for."""

    def __init__(self, availability: Availability | None, seed: int, position: int) -> None:
        self._availability = availability
        self._rng = np.random.default_rng([seed, position, 0x0A7A])
        self._changes: list[float] = []  # times at which the state flips, increasing
        self._starts_online = True
        if availability is not None:
            on, off = availability.online_seconds, availability.offline_seconds
            self._starts_online = bool(self._rng.random() < on / (on + off))
            self._changes.append(self._spell(self._starts_online))

    def _spell(self, online: bool) -> float:
        assert self._availability is not None
        mean = self._availability.online_seconds if online else self._availability.offline_seconds
        return float(self._rng.exponential(mean))

    def _extend(self, until: float) -> None:
        while self._changes[-1] <= until:
            online = self._online_after(len(self._changes))
            self._changes.append(self._changes[-1] + self._spell(online))

    def _online_after(self, flips: int) -> bool:
        return self._starts_online == (flips % 2 == 0)

    def online(self, t: float) -> bool:
        """Whether the client is online at time ``t``."""
        if self._availability is None:
            return True
        self._extend(t)
        return self._online_after(bisect.bisect_right(self._changes, t))

    def next_change(self, t: float) -> float:
        """The first time after ``t`` at which the client goes online or offline (inf: never)."""
        if self._availability is None:
            return math.inf
        self._extend(t)
        return self._changes[bisect.bisect_right(self._changes, t)]

    def online_until(self, t: float) -> float:
        """When the online spell that holds ``t`` ends (``t`` itself when offline at ``t``)."""
        return self.next_change(t) if self.online(t) else t


@dataclass
class TimeModel:
    """Session times and availability of every simulated client (``SimulatedFleet`` applied).

    ``costs``: FLOPs and bytes of every level in play (the reference is the
    smallest); ``examples``: each client's training examples; ``epochs`` and
    ``batch_size``: the local training.
    """

    fleet: SimulatedFleet
    costs: Sequence[LevelCost]
    examples: Sequence[int]
    epochs: int
    batch_size: int
    seed: int
    _processes: list[OnOff] = field(init=False, repr=False)
    _by_rate: Mapping[float, LevelCost] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """One on/off process per client."""
        self._processes = [
            OnOff(self.fleet.availability, self.seed, i) for i in range(len(self.examples))
        ]
        self._by_rate = {c.rate: c for c in self.costs}

    @property
    def reference(self) -> LevelCost:
        return min(self.costs, key=lambda c: c.rate)

    def profile(self, position: int) -> DeviceProfile:
        """What the client's device would report at registration."""
        tier = self.fleet.tier(position)
        return DeviceProfile(
            step_ms=self.fleet.step_ms * tier.slowdown,
            reference_rate=self.reference.rate,
            memory_mb=tier.memory_mb,
            bandwidth_mbps=tier.bandwidth_mbps,
            num_examples=int(self.examples[position]),
        )

    def session_seconds(self, position: int, rate: float) -> float:
        """How long the client's training session at ``rate`` takes, transfers included."""
        cost = self._by_rate.get(rate)
        if cost is None:
            raise InternalError(
                f"no cost for rate {rate}: levels in play are {list(self._by_rate)}"
            )
        steps = self.epochs * math.ceil(int(self.examples[position]) / self.batch_size)
        return estimate_seconds(self.profile(position), cost, self.reference, steps)

    def online(self, position: int, t: float) -> bool:
        return self._processes[position].online(t)

    def online_until(self, position: int, t: float) -> float:
        """When the client's current online spell ends (``t`` if it is offline)."""
        return self._processes[position].online_until(t)

    def next_arrival(self, t: float, among: Sequence[int] | None = None) -> float:
        """The first time after ``t`` at which an offline client (of ``among``) comes online."""
        positions = range(len(self._processes)) if among is None else among
        times = [
            self._processes[p].next_change(t) for p in positions if not self._processes[p].online(t)
        ]
        return min(times, default=math.inf)
