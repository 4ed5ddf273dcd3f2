"""The paper's pre-activation ResNet18 for CIFAR10.

Each residual block is Scaler -> sBN -> ReLU -> conv3x3 -> Scaler -> sBN ->
ReLU -> conv3x3, with a 1x1 convolution on the shortcut where the shape
changes, as in the official HeteroFL code. Hidden sizes [64, 128, 256, 512].
By default the stages hold [1, 1, 1, 2] blocks: the network the paper's Table 8
counts (9.6M parameters at level a); see ``PAPER_TABLE8_BLOCKS``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from heterofl_edge.levels import scaled_width
from heterofl_edge.models.architecture import Architecture
from heterofl_edge.models.layers import Scaler, StaticBatchNorm2d
from heterofl_edge.models.registry import register_architecture
from heterofl_edge.slicing import Dim, SlicingSpec, TensorRule

__all__ = [
    "PAPER_TABLE8_BLOCKS",
    "RESNET_HIDDEN",
    "STANDARD_RESNET18_BLOCKS",
    "ResNet18",
    "resnet18_spec",
]

RESNET_HIDDEN = (64, 128, 256, 512)
# Blocks per stage of the network the paper's Table 8 measured: the official code
# built "resnet18" with [1, 1, 1, 2] blocks until a later commit ("fix resnet18",
# March 2021) changed it to [2, 2, 2, 2]. Pass ``STANDARD_RESNET18_BLOCKS`` for that.
PAPER_TABLE8_BLOCKS = (1, 1, 1, 2)
STANDARD_RESNET18_BLOCKS = (2, 2, 2, 2)


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, scaler_rate: float) -> None:
        super().__init__()
        self.scaler = Scaler(scaler_rate)
        self.n1 = StaticBatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.n2 = StaticBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.scaler(x)))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.n2(self.scaler(out))))
        return out + shortcut


def _block_plan(stage_blocks: Sequence[int]) -> list[tuple[str, int, int, int]]:
    """(name, input stage, output stage, stride) per block; the stem counts as stage 0."""
    plan = []
    previous = 0
    for stage, count in enumerate(stage_blocks):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            plan.append((f"layers.{stage}.{block}", previous, stage, stride))
            previous = stage
    return plan


class ResNet18(nn.Module):
    """Width-scalable pre-activation ResNet18; see ``ConvNet`` for the arguments."""

    def __init__(
        self,
        width: float = 1.0,
        scaler_rate: float | None = None,
        in_channels: int = 3,
        num_classes: int = 10,
        hidden: Sequence[int] = RESNET_HIDDEN,
        stage_blocks: Sequence[int] = PAPER_TABLE8_BLOCKS,
    ) -> None:
        super().__init__()
        scaler_rate = width if scaler_rate is None else scaler_rate
        sizes = [scaled_width(h, width) for h in hidden]
        self.conv1 = nn.Conv2d(in_channels, sizes[0], 3, 1, 1, bias=False)
        stages: list[list[nn.Module]] = [[] for _ in sizes]
        for name, source, target, stride in _block_plan(stage_blocks):
            stage = int(name.split(".")[1])
            stages[stage].append(PreActBlock(sizes[source], sizes[target], stride, scaler_rate))
        self.layers = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.n4 = StaticBatchNorm2d(sizes[-1])
        self.scaler = Scaler(scaler_rate)
        self.linear = nn.Linear(sizes[-1], num_classes)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for stage in self.layers:
            out = stage(out)
        out = F.relu(self.n4(self.scaler(out)))
        return self.linear(out.mean(dim=(2, 3)))


def _norm_rules(prefix: str, dim: Dim) -> dict[str, TensorRule]:
    return {
        f"{prefix}.weight": TensorRule((dim,)),
        f"{prefix}.bias": TensorRule((dim,)),
        f"{prefix}.running_mean": TensorRule((dim,), trainable=False),
        f"{prefix}.running_var": TensorRule((dim,), trainable=False),
    }


def resnet18_spec(
    in_channels: int = 3,
    num_classes: int = 10,
    hidden: Sequence[int] = RESNET_HIDDEN,
    stage_blocks: Sequence[int] = PAPER_TABLE8_BLOCKS,
) -> SlicingSpec:
    k3, k1 = Dim.fixed(3), Dim.fixed(1)
    widths = [Dim.width(h) for h in hidden]
    spec: dict[str, TensorRule] = {
        "conv1.weight": TensorRule((widths[0], Dim.fixed(in_channels), k3, k3))
    }
    for name, source, target, stride in _block_plan(stage_blocks):
        src, dst = widths[source], widths[target]
        spec.update(_norm_rules(f"{name}.n1", src))
        spec[f"{name}.conv1.weight"] = TensorRule((dst, src, k3, k3))
        spec.update(_norm_rules(f"{name}.n2", dst))
        spec[f"{name}.conv2.weight"] = TensorRule((dst, dst, k3, k3))
        if stride != 1 or source != target:
            spec[f"{name}.shortcut.weight"] = TensorRule((dst, src, k1, k1))
    spec.update(_norm_rules("n4", widths[-1]))
    spec["linear.weight"] = TensorRule((Dim.labels(num_classes), widths[-1]))
    spec["linear.bias"] = TensorRule((Dim.labels(num_classes),))
    return spec


register_architecture(
    Architecture(
        "resnet18",
        "pre-activation ResNet18 for CIFAR10 (paper Table 8)",
        lambda w, s: ResNet18(w, s),
        resnet18_spec(),
        (3, 32, 32),
        torch.float32,
        10,
    )
)
