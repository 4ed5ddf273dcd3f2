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

Which entries of a ``width`` (or per-head) dimension a sub-model keeps is the
``Submodel`` rule: ``static`` keeps the first ones (HeteroFL's upper-left
slice); ``rolling`` (FedRolex, Alam et al., NeurIPS 2022) keeps a window that
starts at ``offset`` and wraps around the global width, the offset rolling by
one each round. The sub-model holds the kept entries in increasing global
order, so offset 0 is the static slice and a full-width dimension is never
permuted. Devices never see the offset: they train a sub-model of their width.
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
    "Positions",
    "SlicingSpec",
    "Submodel",
    "TensorRule",
    "extract_submodel_state",
    "global_positions",
    "shapes_at",
    "trainable_names",
]


class Submodel(StrEnum):
    """How a sub-model's entries are chosen in each width dimension (see the module doc)."""

    static = "static"
    rolling = "rolling"

    def offset(self, round_number: int) -> int:
        """Where the window of round ``round_number`` (from 1) starts: 0, or one more per round."""
        return 0 if self is Submodel.static else max(0, round_number - 1)


Positions = slice | torch.Tensor  # a range (step 1) or increasing indices


def window(size: int, total: int, offset: int) -> Positions:
    """The ``size`` entries of ``0..total-1`` from ``offset`` on, wrapping, in increasing order."""
    start = offset % total
    if size >= total or start == 0:
        return slice(0, min(size, total))
    if start + size <= total:
        return slice(start, start + size)
    wrapped = start + size - total
    return torch.cat([torch.arange(0, wrapped), torch.arange(start, total)])


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

    def positions(self, rate: float, global_rate: float, offset: int = 0) -> Positions:
        """Where the sub-model's entries sit along this dimension of the global tensor.

        ``offset`` is the start of a rolling window (``Submodel.offset``); 0 is
        the static upper-left slice.
        """
        if self.kind in (DimKind.fixed, DimKind.labels):
            return slice(0, self.base)
        if self.kind is DimKind.width:
            return window(self.size(rate), self.size(global_rate), offset)
        global_head = scaled_width(self.base // self.heads, global_rate)
        local_head = scaled_width(self.base // self.heads, rate)
        kept = window(local_head, global_head, offset)
        grid = torch.arange(self.heads * global_head).reshape(self.heads, global_head)
        return grid[:, kept].reshape(-1)


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
    rule: TensorRule, rate: float, global_rate: float = 1.0, offset: int = 0
) -> tuple[Positions, ...]:
    """Per-dimension positions of a sub-model tensor inside its global tensor."""
    if rate > global_rate:
        raise InternalError(f"sub-model rate {rate} exceeds the global rate {global_rate}")
    return tuple(d.positions(rate, global_rate, offset) for d in rule.dims)


def take(tensor: torch.Tensor, positions: tuple[Positions, ...]) -> torch.Tensor:
    """The entries of ``tensor`` at ``positions`` (one entry per dimension)."""
    out = tensor
    for dim, where in enumerate(positions):
        if isinstance(where, slice):
            out = out.narrow(dim, where.start, where.stop - where.start)
        else:
            out = out.index_select(dim, where)
    return out


def extract_submodel_state(
    global_state: Mapping[str, torch.Tensor],
    spec: SlicingSpec,
    rate: float,
    global_rate: float = 1.0,
    offset: int = 0,
) -> dict[str, torch.Tensor]:
    """The state of the width-``rate`` sub-model: a copy of each tensor's slice.

    ``offset`` starts a rolling window (``Submodel.rolling``); 0 is HeteroFL's slice.
    """
    missing = set(spec) - set(global_state)
    if missing:
        raise InternalError(f"global state lacks {sorted(missing)}")
    return {
        name: take(global_state[name], global_positions(rule, rate, global_rate, offset)).clone()
        for name, rule in spec.items()
    }
