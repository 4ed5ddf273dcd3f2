"""The paper's CNN for MNIST: four 3x3 conv blocks and a linear classifier.

Each block is conv -> Scaler -> sBN -> ReLU -> max-pool (no pool after the
last block), then global average pooling and a linear layer, as in the
official HeteroFL code. Hidden sizes [64, 128, 256, 512] at width 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from heterofl_edge.levels import scaled_width
from heterofl_edge.models.architecture import Architecture
from heterofl_edge.models.layers import Scaler, StaticBatchNorm2d
from heterofl_edge.models.registry import register_architecture
from heterofl_edge.slicing import Dim, SlicingSpec, TensorRule

__all__ = ["CONV_HIDDEN", "ConvNet", "conv_spec"]

CONV_HIDDEN = (64, 128, 256, 512)


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, scaler_rate: float, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.scaler = Scaler(scaler_rate)
        self.norm = StaticBatchNorm2d(out_channels)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.scaler(self.conv(x)))))


class ConvNet(nn.Module):
    """Width-scalable CNN; ``width`` is the rate r, ``scaler_rate`` the Scaler's divisor."""

    def __init__(
        self,
        width: float = 1.0,
        scaler_rate: float | None = None,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden: Sequence[int] = CONV_HIDDEN,
    ) -> None:
        super().__init__()
        scaler_rate = width if scaler_rate is None else scaler_rate
        sizes = [scaled_width(h, width) for h in hidden]
        blocks = []
        previous = in_channels
        for i, size in enumerate(sizes):
            blocks.append(ConvBlock(previous, size, scaler_rate, pool=i < len(sizes) - 1))
            previous = size
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(previous, num_classes)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(x).mean(dim=(2, 3))
        return self.classifier(features)


def conv_spec(
    in_channels: int = 1, num_classes: int = 10, hidden: Sequence[int] = CONV_HIDDEN
) -> SlicingSpec:
    spec: dict[str, TensorRule] = {}
    previous = Dim.fixed(in_channels)
    for i, size in enumerate(hidden):
        out = Dim.width(size)
        k = Dim.fixed(3)
        spec[f"blocks.{i}.conv.weight"] = TensorRule((out, previous, k, k))
        spec[f"blocks.{i}.conv.bias"] = TensorRule((out,))
        spec[f"blocks.{i}.norm.weight"] = TensorRule((out,))
        spec[f"blocks.{i}.norm.bias"] = TensorRule((out,))
        spec[f"blocks.{i}.norm.running_mean"] = TensorRule((out,), trainable=False)
        spec[f"blocks.{i}.norm.running_var"] = TensorRule((out,), trainable=False)
        previous = out
    spec["classifier.weight"] = TensorRule((Dim.labels(num_classes), previous))
    spec["classifier.bias"] = TensorRule((Dim.labels(num_classes),))
    return spec


register_architecture(
    Architecture(
        "conv",
        "CNN for MNIST (paper Table 7)",
        lambda w, s: ConvNet(w, s),
        conv_spec(),
        (1, 28, 28),
        torch.float32,
        10,
    )
)
