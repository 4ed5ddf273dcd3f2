"""Secure aggregation in HeteroFL's terms: a round's vector layouts, and models from sums.

The protocol and its arithmetic are ``heterofl_edge.secagg`` (no torch: devices
run it). Here the server side meets the model: the layout every client of a
round uses (``training_plan``: each trainable tensor's slice at each level in
play, the label split's rows, the label presence tiers), the fixed point of a
round (``SecureSettings.fixed_point``), and the new global state from the
unmasked per-element sums (``state_from_sums``), which divides every element's
sum by the number of clients that hold it: public for width elements (the
levels are public), and from the summed label presence for the classifier's
rows. sBN statistics come back from their sums (``statistics_from_sums``).

What a secure round releases to the coordinator: each element's sum over the
survivors, the number of survivors per level, the per-label counts of clients
per level (summed presence), who dropped out and when; never one client's
update, statistics or labels (README, "Secure aggregation").
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from heterofl_edge.aggregation import accumulate
from heterofl_edge.bn_stats import ChannelMoments
from heterofl_edge.errors import ConfigError, InternalError
from heterofl_edge.secagg import (
    FixedPoint,
    LayoutPlan,
    Quantizer,
    decode_wide,
    fixed_point_for,
    shared_int8_for,
)
from heterofl_edge.slicing import DimKind, SlicingSpec, global_positions, shapes_at, trainable_names

__all__ = [
    "SecureSettings",
    "instance_context",
    "sbn_layers",
    "state_from_sums",
    "statistics_from_sums",
    "training_plan",
]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SecureSettings:
    """A secure run's parameters; ``ConfigError`` if impossible.

    ``clip``: the bound of an update element (trained minus received); larger
    values are clipped before encoding. ``threshold``: the share of a client's
    neighbours that must survive to rebuild its secrets. ``statistics_scale``: the
    fixed point of sBN sums (wide encoding). ``int8``: training uploads are the
    shared int8 integers (``SharedInt8``, step ``clip / 127``, masked in
    ``8 + ceil(log2 n)`` bits) instead of the 32-bit fixed point.
    """

    clip: float = 1.0
    threshold: float = 0.5
    statistics_scale: float = 2.0**16
    int8: bool = False

    def __post_init__(self) -> None:
        """Refuse what no fixed point or threshold can do."""
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"--secure-aggregation-clip must be positive, got {self.clip}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(
                f"--secure-aggregation-threshold must lie in (0, 1], got {self.threshold}",
                "it is the share of a client's neighbours needed to rebuild its secrets",
            )

    def fixed_point(self, clients: int) -> FixedPoint:
        """The round's fixed point: ``clients`` clipped updates sum without wrapping."""
        return fixed_point_for(max(1, clients), self.clip)

    def quantizer(self, clients: int) -> Quantizer:
        """How ``clients`` clients' updates become ring elements: fixed point, or int8."""
        if self.int8:
            return shared_int8_for(max(1, clients), self.clip)
        return self.fixed_point(clients)


def instance_context(round_number: int, phase: str) -> str:
    """A fresh name for one aggregation: its keys and masks are bound to it."""
    return f"round {round_number} {phase} {secrets.token_hex(8)}"


def training_plan(
    spec: SlicingSpec, rates: Sequence[float], global_rate: float, classes: int
) -> LayoutPlan:
    """The layout of every client's training vector for the levels ``rates`` (in play).

    ``classes`` > 0: the classifier's label rows are split by the labels each
    client holds, whose presence the vectors carry (0: every row counts).
    """
    names = tuple(trainable_names(spec))
    blocks: dict[str, tuple[int, ...]] = {}
    label_dims: dict[str, int] = {}
    for name in names:
        dims = spec[name].dims
        per = []
        for at, dim in enumerate(dims):
            if dim.kind is DimKind.labels:
                label_dims[name] = at
            per.append(
                0
                if dim.kind in (DimKind.fixed, DimKind.labels)
                else (dim.heads if dim.kind is DimKind.heads else 1)
            )
        blocks[name] = tuple(per)
    tiers = tuple(sorted({*rates, global_rate}))
    shapes = {
        rate: {n: s for n, s in shapes_at(spec, rate).items() if n in blocks} for rate in tiers
    }
    return LayoutPlan(names, blocks, shapes, label_dims, classes if label_dims else 0, tiers)


def sbn_layers(state: Mapping[str, torch.Tensor]) -> tuple[tuple[str, int], ...]:
    """Every sBN layer of a state and its channels, by name (the statistics vector's order)."""
    suffix = ".running_mean"
    return tuple(
        (key[: -len(suffix)], int(state[key].numel()))
        for key in sorted(state)
        if key.endswith(suffix)
    )


def state_from_sums(
    global_state: Mapping[str, torch.Tensor],
    spec: SlicingSpec,
    global_rate: float,
    plan: LayoutPlan,
    fixed: Quantizer,
    sums: np.ndarray,
    survivor_rates: Sequence[float],
) -> State:
    """The new global state from the unmasked sums of the survivors' training vectors.

    Each element moves by its summed update over the number of survivors that
    hold it (HeteroFL's average, of weights or of updates alike: every client
    started from the same weights); elements no survivor held keep their value.
    A classifier row counts the survivors that hold its label (the summed
    presence tiers: tier t minus tier t+1 is the count at exactly level t).
    """
    total = plan.layout(global_rate)
    if sums.shape != (total.size,):
        raise InternalError(f"sums of {sums.shape} for a layout of {total.size}")
    deltas = fixed.decode_sum(sums[: total.tensor_size])
    exact = _exact_presence(plan, sums[total.tensor_size :])
    at_level = np.zeros(len(plan.tiers), np.int64)
    for rate in survivor_rates:
        matches = [i for i, t in enumerate(plan.tiers) if math.isclose(t, rate, rel_tol=1e-9)]
        if not matches:
            raise InternalError(f"a survivor's rate {rate:g} is not a level of the layout")
        at_level[matches[0]] += 1
    new_state = dict(global_state)
    for segment, start in zip(total.segments, total.offsets, strict=True):
        name, rule = segment.name, spec[segment.name]
        summed = torch.from_numpy(deltas[start : start + segment.size].reshape(segment.shape))
        counts = torch.zeros(segment.shape, dtype=torch.float64)
        label_dim = plan.label_dims.get(name) if exact is not None else None
        for t, tier in enumerate(plan.tiers):
            shape = tuple(d.size(tier) for d in rule.dims)
            if label_dim is None:
                if not at_level[t]:
                    continue
                values = torch.full(shape, float(at_level[t]), dtype=torch.float64)
            else:
                assert exact is not None
                axis = [-1 if d == label_dim else 1 for d in range(len(shape))]
                rows = torch.from_numpy(exact[t][: shape[label_dim]].astype(np.float64))
                values = rows.reshape(axis).expand(shape).contiguous()
            accumulate(counts, list(global_positions(rule, tier, global_rate)), values)
        old = global_state[name]
        average = summed / counts.clamp(min=1)
        new_state[name] = torch.where(counts > 0, old.double() + average, old.double()).to(
            old.dtype
        )
    return new_state


def _exact_presence(plan: LayoutPlan, presence: np.ndarray) -> np.ndarray | None:
    """Per level (tier) and label, the survivors at exactly that level holding the label."""
    if not plan.classes:
        return None
    cumulative = presence.view(np.int32).astype(np.int64).reshape(len(plan.tiers), plan.classes)
    exact = cumulative.copy()
    exact[:-1] -= cumulative[1:]
    if (exact < 0).any():
        raise InternalError("the summed label presence is not nested by level")
    return exact


def statistics_from_sums(
    sums: np.ndarray, layers: Sequence[tuple[str, int]], scale: float
) -> dict[str, ChannelMoments]:
    """Per sBN layer the combined count, mean and (biased) variance from summed sums."""
    values = decode_wide(sums, scale)
    result = {}
    at = 0
    for name, channels in layers:
        count = values[at]
        total = values[at + 1 : at + 1 + channels]
        squares = values[at + 1 + channels : at + 1 + 2 * channels]
        at += 1 + 2 * channels
        if count <= 0:
            continue
        mean = total / count
        var = np.maximum(squares / count - mean**2, 0.0)
        result[name] = ChannelMoments(
            round(count), torch.from_numpy(mean).float(), torch.from_numpy(var).float()
        )
    return result
