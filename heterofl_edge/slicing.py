"""Declarative slicing specs and sub-model extraction.

Each architecture describes, in one place, how every dimension of every tensor
in its state follows the width rate (a ``SlicingSpec``). Extraction and
aggregation read only the spec: nothing here looks at parameter names.

A dimension is one of:

* ``Dim.fixed(n)``: never sliced (input channels, sequence positions);
* ``Dim.labels(n)``: never sliced, but each client contributes only the rows of
  the labels it holds (the classifier's output rows; paper's label split);
* ``Dim.width(n)``: the first ``ceil(rate * n)`` entries (upper-left slice);
* ``Dim.heads(n, h)``: ``h`` equal heads of ``n / h`` entries, each sliced to its
  first ``ceil(rate * n / h)`` entries (attention projections), so that a
  sub-model's head ``i`` lives inside the global head ``i``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import torch

from heterofl_edge.errors import InternalError
from heterofl_edge.levels import scaled_width

__all__ = [
    "Dim",
    "DimKind",
    "SlicingSpec",
    "TensorRule",
    "extract_submodel_state",
    "global_positions",
    "shapes_at",
    "trainable_names",
]


class DimKind(StrEnum):
    fixed = "fixed"
    labels = "labels"
    width = "width"
    heads = "heads"


@dataclass(frozen=True)
class Dim:
    """How one tensor dimension follows the width rate."""

    kind: DimKind
    base: int
    heads: int = 1

    @classmethod
    def fixed(cls, size: int) -> Dim:
        return cls(DimKind.fixed, size)

    @classmethod
    def labels(cls, size: int) -> Dim:
        return cls(DimKind.labels, size)

    @classmethod
    def width(cls, base: int) -> Dim:
        return cls(DimKind.width, base)

    @classmethod
    def per_head(cls, base: int, heads: int) -> Dim:
        if base % heads:
            raise InternalError(f"width {base} does not split into {heads} heads")
        return cls(DimKind.heads, base, heads)

    def size(self, rate: float) -> int:
        """Length of this dimension in the sub-model of width ``rate``."""
        if self.kind in (DimKind.fixed, DimKind.labels):
            return self.base
        if self.kind is DimKind.width:
            return scaled_width(self.base, rate)
        return self.heads * scaled_width(self.base // self.heads, rate)

    def positions(self, rate: float, global_rate: float) -> slice | torch.Tensor:
        """Where the sub-model's entries sit along this dimension of the global tensor."""
        if self.kind is not DimKind.heads:
            return slice(0, self.size(rate))
        global_head = scaled_width(self.base // self.heads, global_rate)
        local_head = scaled_width(self.base // self.heads, rate)
        grid = torch.arange(self.heads * global_head).reshape(self.heads, global_head)
        return grid[:, :local_head].reshape(-1)


@dataclass(frozen=True)
class TensorRule:
    """The dimensions of one state tensor; ``trainable`` tensors are aggregated."""

    dims: tuple[Dim, ...]
    trainable: bool = True


SlicingSpec = Mapping[str, TensorRule]


def shapes_at(spec: SlicingSpec, rate: float) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of the sub-model of width ``rate``."""
    return {name: tuple(d.size(rate) for d in rule.dims) for name, rule in spec.items()}


def trainable_names(spec: SlicingSpec) -> list[str]:
    """Names of the tensors a client trains and uploads, in spec order."""
    return [name for name, rule in spec.items() if rule.trainable]


def global_positions(
    rule: TensorRule, rate: float, global_rate: float = 1.0
) -> tuple[slice | torch.Tensor, ...]:
    """Per-dimension positions of a sub-model tensor inside its global tensor."""
    if rate > global_rate:
        raise InternalError(f"sub-model rate {rate} exceeds the global rate {global_rate}")
    return tuple(d.positions(rate, global_rate) for d in rule.dims)


def take(tensor: torch.Tensor, positions: tuple[slice | torch.Tensor, ...]) -> torch.Tensor:
    """The entries of ``tensor`` at ``positions`` (one entry per dimension)."""
    out = tensor
    for dim, where in enumerate(positions):
        if isinstance(where, slice):
            out = out.narrow(dim, 0, where.stop)
        else:
            out = out.index_select(dim, where)
    return out


def extract_submodel_state(
    global_state: Mapping[str, torch.Tensor],
    spec: SlicingSpec,
    rate: float,
    global_rate: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The state of the width-``rate`` sub-model: a copy of each tensor's slice."""
    missing = set(spec) - set(global_state)
    if missing:
        raise InternalError(f"global state lacks {sorted(missing)}")
    return {
        name: take(global_state[name], global_positions(rule, rate, global_rate)).clone()
        for name, rule in spec.items()
    }
