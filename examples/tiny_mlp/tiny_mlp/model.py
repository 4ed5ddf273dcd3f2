"""A width-scalable MLP: 16 features -> 64 -> 32 -> 4 classes at rate 1.

Everything heterofl-edge needs from a model is here:

* the factory takes the width rate and builds every hidden layer with
  ``scaled_width(n, rate)`` (= ceil(rate * n)), so that the model at rate r
  is the upper-left slice of the model at rate 1;
* a ``Scaler`` after each hidden layer (paper section 3.3; the toolkit sets its
  divisor to the client's rate over the global model's);
* inputs and outputs do not depend on the rate;
* ``heterofl_interface`` says what the shapes cannot: one example's shape and
  dtype, the number of classes, the task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from heterofl_edge.levels import scaled_width
from heterofl_edge.models import ModelInterface, Scaler

NUM_FEATURES = 16
NUM_CLASSES = 4


class TinyMLP(nn.Module):
    def __init__(self, rate: float = 1.0, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        self.heterofl_interface = ModelInterface(
            input_shape=(NUM_FEATURES,),
            num_classes=NUM_CLASSES,
            description="tiny MLP for 16-feature vectors, 4 classes (heterofl-edge example)",
        )
        layers: list[nn.Module] = []
        previous = NUM_FEATURES
        for size in hidden:
            width = scaled_width(size, rate)
            layers += [nn.Linear(previous, width), Scaler(rate), nn.ReLU()]
            previous = width
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(x))


def build(rate: float, **options: object) -> TinyMLP:
    """Tiny MLP for 16-feature vectors, 4 classes (heterofl-edge example)."""
    return TinyMLP(rate, **options)  # type: ignore[arg-type]
