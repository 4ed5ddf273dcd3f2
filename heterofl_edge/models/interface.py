"""What a model tells the toolkit about itself: its input, its outputs, its task.

A built-in model's facts are written in its ``Architecture``. A model brought
by a user is a factory ``factory(rate: float, **options) -> nn.Module``; the
module it returns carries a ``ModelInterface`` in the attribute
``heterofl_interface``, set in ``__init__`` or on the class::

    class TinyMLP(nn.Module):
        def __init__(self, rate: float = 1.0) -> None:
            super().__init__()
            self.heterofl_interface = ModelInterface(input_shape=(16,), num_classes=4)
            ...

That is all the toolkit needs: the slicing spec is inferred from the shapes of
the model built at several rates (``heterofl_edge.models.autospec``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from heterofl_edge.slicing import Dim
from heterofl_edge.task_kind import TaskKind

__all__ = ["INTERFACE_ATTRIBUTE", "DimOverride", "ModelInterface", "TaskKind"]

INTERFACE_ATTRIBUTE = "heterofl_interface"

# One entry per tensor dimension: a ``Dim`` or one of the words "fixed", "labels",
# "width" or "heads:H" (the base size is then the tensor's size in the full model).
DimOverride = Dim | str


@dataclass(frozen=True)
class ModelInterface:
    """The facts about a model that its tensors' shapes do not tell.

    * ``input_shape``: one example, without the batch dimension: ``(1, 28, 28)``
      for MNIST, ``(64,)`` for 64-token sequences.
    * ``input_dtype``: ``torch.float32`` for images and features, ``torch.long``
      for token ids.
    * ``num_classes``: the length of the output's last dimension.
    * ``task``: classification (the default) or a masked language model.
    * ``overrides``: tensor name -> one entry per dimension, for what inference
      gets wrong (see ``heterofl_edge.models.autospec``). Label rows are
      inferred as dimension 0 of a tensor with ``num_classes`` rows that does
      not scale (the classifier's weight and bias) and, in a language model,
      the rows of a token embedding; anything else that should follow the
      label split is named here, e.g. ``{"head.weight": ("labels", "width")}``.
    * ``description``: one line for ``models list`` and ``models check``.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    input_dtype: torch.dtype = torch.float32
    task: TaskKind = TaskKind.classification
    overrides: Mapping[str, Sequence[DimOverride]] = field(default_factory=dict)
    description: str = ""
