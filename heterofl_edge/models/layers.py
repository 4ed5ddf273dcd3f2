"""The two HeteroFL building blocks every width-scalable model uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Scaler", "StaticBatchNorm2d"]


class Scaler(nn.Module):
    """Divides by the sub-model's rate while training, identity in evaluation.

    Placed right after a parametric layer (paper section 3.3), it keeps the
    scale of a width-``r`` sub-model's representations close to the global
    model's, like inverted dropout.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.rate if self.training else x

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class StaticBatchNorm2d(nn.Module):
    """Static batch normalisation (sBN, paper section 3.2).

    While training it normalises with the batch's own statistics and tracks
    nothing. In evaluation it uses ``running_mean`` / ``running_var``, which are
    set after training from statistics gathered over the clients' data (see
    ``heterofl_edge.bn_stats``), never from a running average.

    ``gathered`` is None except during ``bn_stats.collect_moments``: then every
    training-mode forward appends ``(count, mean, invstd)`` of its batch, the
    statistics it normalised with (computed once, by the same kernel).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.gathered: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.gathered is not None:
                out, mean, invstd = torch.native_batch_norm(
                    x, self.weight, self.bias, None, None, True, 0.0, self.eps
                )
                self.gathered.append((x.numel() // x.shape[1], mean, invstd))
                return out
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
