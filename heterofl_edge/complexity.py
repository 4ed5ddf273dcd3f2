"""Parameters, FLOPs and space per level, counted as the paper's Tables 7-9 are.

The paper's convention (its authors' summary tool), which this module follows:

* one forward pass in training mode with a batch of one example;
* only modules that hold a weight or a bias are counted;
* a module's FLOPs: convolution ``k*k*C_in*C_out*H_out*W_out`` (+ ``C_out*H_out*W_out``
  with a bias), linear ``C_in*C_out`` per position, batch/layer norm twice the
  input size; and that figure is counted once per weight or bias tensor the
  module holds (so a conv with a bias counts twice, one without once);
* Space (MB) is ``4 * parameters / 2**20`` (float32).

With it, every parameter and FLOPs figure of levels a..e in Tables 7, 8 and 9
is reproduced to the printed precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from heterofl_edge.models import Architecture, StaticBatchNorm2d

__all__ = ["LevelComplexity", "format_count", "measure_complexity"]


@dataclass(frozen=True)
class LevelComplexity:
    rate: float
    parameters: int
    flops: int
    space_mb: float


def _module_flops(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        out_positions = y.shape[0] * y.shape[2] * y.shape[3]
        kh, kw = module.kernel_size
        flops = kh * kw * x.shape[1] * (y.shape[1] // module.groups) * out_positions
        if module.bias is not None:
            flops += y.shape[1] * out_positions
        return int(flops)
    if isinstance(module, nn.Linear):
        return int(x.numel() // x.shape[-1] * x.shape[-1] * y.shape[-1])
    if isinstance(module, StaticBatchNorm2d | nn.BatchNorm2d | nn.LayerNorm):
        return int(2 * x.numel())
    return 0


def measure_complexity(arch: Architecture, rate: float) -> LevelComplexity:
    """Parameters, FLOPs and space of ``arch`` at width ``rate`` (paper convention)."""
    model = arch.build(rate)
    flops = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal flops
        tensors = [n for n, _ in module.named_parameters(recurse=False) if n in ("weight", "bias")]
        if tensors and isinstance(inputs[0], torch.Tensor):
            flops += len(tensors) * _module_flops(module, inputs[0], output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    model.train()
    with torch.no_grad():
        model(arch.example_input(1))
    for handle in handles:
        handle.remove()
    parameters = sum(p.numel() for p in model.parameters())
    return LevelComplexity(rate, parameters, flops, parameters * 4 / 2**20)


def format_count(value: float) -> str:
    """A count the way the paper prints it: ``391.4 K``, ``1.6 M``, ``1.4 B``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f}"
