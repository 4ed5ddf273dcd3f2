"""Convolutions as im2col plus a matrix product, for backends that delegate matmuls.

ExecuTorch's XNNPACK delegate trains a ``linear`` whose weight is a program
input, but bakes a convolution's weight into the delegate as a constant.
``matmul_convolutions(model)`` makes every ``nn.Conv2d`` of ``model`` compute
the same function as pad -> the k*k shifted (strided) slices -> concatenate ->
``linear`` with the weight viewed as a matrix. The ``Parameter`` objects stay
the ones of the original layers, under the same names, so the program's state
has the same names, shapes and order as the model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MatmulConv2d", "conv2d_as_matmul", "matmul_convolutions"]


def conv2d_as_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (no dilation, no groups) as a ``linear``.

    The patches are gathered channels-last, ``(n, oh, ow, kh * kw * c)``, and
    multiplied by the weight permuted to ``(o, kh, kw, c)``: one matrix product
    with ``n * oh * ow`` rows.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    rows = _zero_pad(_zero_pad(x.permute(0, 2, 3, 1).contiguous(), ph, dim=1), pw, dim=2)
    slices = [
        rows[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = torch.cat(slices, dim=3) if len(slices) > 1 else slices[0]
    matrix = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)
    out = F.linear(patches.reshape(n * oh * ow, kh * kw * c), matrix, bias)
    return out.reshape(n, oh, ow, o).permute(0, 3, 1, 2).contiguous()


def _zero_pad(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``x`` with ``size`` zeros on both sides of ``dim``.

    A concatenation rather than ``F.pad``: the backward of a pad is a pad with
    negative sizes, which ExecuTorch's portable ``constant_pad_nd`` rejects;
    a concatenation's backward is slices.
    """
    if size == 0:
        return x
    shape = list(x.shape)
    shape[dim] = size
    zeros = x.new_zeros(shape)
    return torch.cat([zeros, x, zeros], dim=dim)


class MatmulConv2d(nn.Module):
    """Stands in for an ``nn.Conv2d``, holding that layer's own ``weight`` and ``bias``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if (
            conv.groups != 1
            or any(d != 1 for d in conv.dilation)
            or isinstance(conv.padding, str)
            or conv.padding_mode != "zeros"
        ):
            raise ValueError(f"only plain convolutions become matmuls, not {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = (int(conv.stride[0]), int(conv.stride[1]))
        self.padding = (int(conv.padding[0]), int(conv.padding[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding)


@contextmanager
def matmul_convolutions(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``nn.Conv2d`` of ``model`` computes as ``MatmulConv2d``."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Conv2d:
                    setattr(parent, name, MatmulConv2d(child))
                    swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
