"""Static batch-norm statistics, gathered from clients and combined.

After a round's aggregation the global model's sBN layers need the mean and
variance of their inputs over the training data (paper section 3.2). Each
queried client computes, with the global weights, per-channel ``count``,
``mean`` and (biased) ``var`` on its own data; ``combine_moments`` merges them
exactly (Chan et al.'s parallel formula), as if one pass had been made over
all the clients' data, and ``apply_statistics`` writes them into a state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from heterofl_edge.errors import UpdateError
from heterofl_edge.models.layers import Scaler, StaticBatchNorm2d

__all__ = [
    "ChannelMoments",
    "apply_statistics",
    "collect_moments",
    "combine_moments",
    "merge_moments",
]


@dataclass(frozen=True)
class ChannelMoments:
    """Per-channel count, mean and biased variance of one sBN layer's input."""

    count: int
    mean: torch.Tensor
    var: torch.Tensor


def merge_moments(a: ChannelMoments, b: ChannelMoments) -> ChannelMoments:
    """Moments of the union of two disjoint sets of values."""
    if a.mean.shape != b.mean.shape:
        raise UpdateError(f"statistics of {a.mean.shape[0]} and {b.mean.shape[0]} channels differ")
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean.double() - a.mean.double()
    mean = a.mean.double() + delta * (b.count / n)
    m2 = a.var.double() * a.count + b.var.double() * b.count + delta**2 * (a.count * b.count / n)
    return ChannelMoments(n, mean.float(), (m2 / n).float())


def combine_moments(
    reports: Iterable[Mapping[str, ChannelMoments]],
) -> dict[str, ChannelMoments]:
    """Merge per-client reports (layer name -> moments) layer by layer."""
    combined: dict[str, ChannelMoments] = {}
    for report in reports:
        for layer, moments in report.items():
            combined[layer] = (
                merge_moments(combined[layer], moments) if layer in combined else moments
            )
    return combined


@torch.no_grad()
def collect_moments(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, ChannelMoments]:
    """Moments of every sBN layer's input over ``batches``, as evaluation will see them.

    The sBN layers normalise with batch statistics (training mode) while every
    Scaler is the identity, as in evaluation: the moments are then those of the
    inputs the layers receive at inference, whatever the model's width. Each
    layer reports the mean and variance it normalised the batch with, so the
    pass costs one forward; per-batch moments are merged exactly. Any memory
    format: in the default one on a CPU the batch-norm kernel accumulates them
    in double; in channels-last (faster convolutions) the layer takes them with
    cascaded sums instead of the kernel's float32 accumulation
    (``StaticBatchNorm2d._gather``).
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, StaticBatchNorm2d)}
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, Scaler):
            module.eval()
    for layer in layers.values():
        layer.gathered = []
    try:
        for batch in batches:
            model(batch)
        result = {}
        for name, layer in layers.items():
            parts = [
                ChannelMoments(n, mean.detach().float().cpu(), var.detach().float().cpu())
                for n, mean, var in layer.gathered or []
            ]
            merged = combine_moments({name: p} for p in parts)
            if name in merged:
                result[name] = merged[name]
        return result
    finally:
        for layer in layers.values():
            layer.gathered = None
        model.train(was_training)


def apply_statistics(
    state: Mapping[str, torch.Tensor], moments: Mapping[str, ChannelMoments]
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose sBN layers use ``moments`` (leading channels if narrower)."""
    new_state = dict(state)
    for layer, m in moments.items():
        mean_key, var_key = f"{layer}.running_mean", f"{layer}.running_var"
        if mean_key not in state:
            raise UpdateError(f"the model has no sBN layer named {layer!r}")
        width = m.mean.shape[0]
        if width > state[mean_key].shape[0]:
            raise UpdateError(f"statistics for {layer!r} have {width} channels, the layer fewer")
        mean, var = state[mean_key].clone(), state[var_key].clone()
        mean[:width], var[:width] = m.mean, m.var
        new_state[mean_key], new_state[var_key] = mean, var
    return new_state
