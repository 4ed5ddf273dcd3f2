"""HeteroFL aggregation (paper equations (1)-(3)), streaming.

Every element of the global model is averaged over the clients whose
sub-model holds it; elements no client holds keep their previous value. Rows
of a ``labels`` dimension (the classifier's outputs) are averaged only over the
clients that hold that label. Uploads are added one at a time into a running
sum and count per element, so memory stays O(global model) however many
clients upload, and the order of uploads does not change the result beyond
float64 rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from heterofl_edge.errors import UpdateError
from heterofl_edge.slicing import (
    DimKind,
    Positions,
    SlicingSpec,
    global_positions,
    shapes_at,
    trainable_names,
)

__all__ = [
    "HeteroFLAggregator",
    "accumulate",
    "check_layout",
    "not_finite_error",
    "validate_update",
]


def check_layout(
    layout: Mapping[str, tuple[str, tuple[int, ...]]],
    spec: SlicingSpec,
    rate: float,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Raise ``UpdateError`` unless ``layout`` (name -> dtype name, shape) is the sub-model's.

    It must name exactly the trainable tensors of the width-``rate`` sub-model,
    each float32 and of the right shape. ``shapes`` may pass ``shapes_at(spec,
    rate)`` computed once for many updates. The values are not looked at: see
    ``validate_update``.
    """
    expected = trainable_names(spec)
    missing = [n for n in expected if n not in layout]
    extra = [n for n in layout if n not in spec or not spec[n].trainable]
    if missing or extra:
        raise UpdateError(
            f"update does not match the level's tensors "
            f"(missing {missing[:3]}, unexpected {extra[:3]})",
            "upload every trainable tensor of your assigned level, named as in the manifest",
            code="wrong_tensors",
        )
    shapes = shapes if shapes is not None else shapes_at(spec, rate)
    for name in expected:
        dtype, shape = layout[name]
        if dtype != "float32":
            raise UpdateError(f"{name} has dtype {dtype}, expected float32", code="bad_dtype")
        if shape != shapes[name]:
            raise UpdateError(
                f"{name} has shape {shape}, expected {shapes[name]} for rate {rate:g}",
                "upload the shapes your level's manifest lists",
                code="bad_shape",
            )


def not_finite_error(name: str) -> UpdateError:
    """The error for an update whose tensor ``name`` holds NaN or Inf."""
    return UpdateError(
        f"{name} holds NaN or Inf values", "check the client's training", code="not_finite"
    )


def validate_update(
    update: Mapping[str, torch.Tensor],
    spec: SlicingSpec,
    rate: float,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Raise ``UpdateError`` unless ``update`` fits the width-``rate`` sub-model.

    It must hold exactly the trainable tensors of that sub-model, as finite
    float32 tensors of the right shapes (``check_layout``).
    """
    check_layout(
        {n: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in update.items()},
        spec,
        rate,
        shapes,
    )
    # One pass over all values (per-tensor calls dominate for small levels); name the culprit
    # only when there is one.
    expected = trainable_names(spec)
    if not torch.isfinite(torch.cat([update[n].reshape(-1) for n in expected])).all():
        raise not_finite_error(next(n for n in expected if not torch.isfinite(update[n]).all()))


class HeteroFLAggregator:
    """Accumulates sub-model updates into per-element sums and counts.

    ``add`` validates and adds one client's update; ``finalize`` returns the
    new global state (trainable tensors averaged, everything else unchanged).
    """

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        spec: SlicingSpec,
        global_rate: float = 1.0,
    ) -> None:
        self._spec = spec
        self._global_rate = global_rate
        self._previous = dict(global_state)
        self._names = trainable_names(spec)
        self._sums = {
            n: torch.zeros_like(global_state[n], dtype=torch.float64) for n in self._names
        }
        self._counts = {
            n: torch.zeros_like(global_state[n], dtype=torch.int32) for n in self._names
        }
        self.num_updates = 0

    def add(
        self,
        update: Mapping[str, torch.Tensor],
        rate: float,
        labels: Iterable[int] | None = None,
        offset: int = 0,
        checked: bool = False,
    ) -> None:
        """Add one client's trained sub-model of width ``rate``.

        ``labels`` are the labels present in the client's data; ``None`` means all.
        ``offset`` is where its rolling window started (0: HeteroFL's static slice):
        each element is counted over the indices the client held. ``checked``: the
        update already passed ``validate_update`` (on the request path, say) and
        comes from a record it could not have changed in since; it is not checked
        again.
        """
        if rate > self._global_rate:
            raise UpdateError(
                f"rate {rate:g} exceeds the global model's rate {self._global_rate:g}"
            )
        if not checked:
            validate_update(update, self._spec, rate)
        label_index = (
            None if labels is None else torch.tensor(sorted(set(labels)), dtype=torch.long)
        )
        if label_index is not None and label_index.numel():
            label_sizes = [
                d.base for r in self._spec.values() for d in r.dims if d.kind is DimKind.labels
            ]
            low, high = int(label_index.min()), int(label_index.max())
            if label_sizes and (low < 0 or high >= min(label_sizes)):
                raise UpdateError(
                    f"labels must lie in 0..{min(label_sizes) - 1}, got {low}..{high}",
                    "report the labels present in the client's data",
                    code="bad_labels",
                )
        for name in self._names:
            rule = self._spec[name]
            positions = list(global_positions(rule, rate, self._global_rate, offset))
            values = update[name].to(torch.float64)
            for dim, d in enumerate(rule.dims):
                if d.kind is DimKind.labels and label_index is not None:
                    positions[dim] = label_index
                    values = values.index_select(dim, label_index)
            accumulate(self._sums[name], positions, values)
            accumulate(self._counts[name], positions, torch.ones_like(values, dtype=torch.int32))
        self.num_updates += 1

    def finalize(self) -> dict[str, torch.Tensor]:
        """The new global state: averages where any client contributed, else the old value."""
        new_state = dict(self._previous)
        for name in self._names:
            counts = self._counts[name]
            old = self._previous[name]
            average = (self._sums[name] / counts.clamp(min=1)).to(old.dtype)
            new_state[name] = torch.where(counts > 0, average, old)
        return new_state


def accumulate(target: torch.Tensor, positions: list[Positions], values: torch.Tensor) -> None:
    """``target[positions] += values``: views for slices, ``index_add_`` for one index."""
    view = target
    indexed = []
    for dim, where in enumerate(positions):
        if isinstance(where, slice):
            view = view.narrow(dim, where.start, where.stop - where.start)
        else:
            indexed.append(dim)
    if not indexed:
        view.add_(values)
    elif len(indexed) == 1:
        view.index_add_(indexed[0], positions[indexed[0]], values)  # type: ignore[arg-type]
    else:
        grids = [
            torch.arange(view.shape[d]) if isinstance(p, slice) else p
            for d, p in enumerate(positions)
        ]
        mesh = tuple(
            g.reshape([-1 if j == d else 1 for j in range(len(grids))]) for d, g in enumerate(grids)
        )
        view.index_put_(mesh, values, accumulate=True)
