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
    training-mode forward appends ``(count, mean, var)`` of its batch (biased
    variance), the statistics it normalised with (computed once, see ``_gather``).
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
                return self._gather(self.gathered, x)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _gather(
        self, gathered: list[tuple[int, torch.Tensor, torch.Tensor]], x: torch.Tensor
    ) -> torch.Tensor:
        """Normalise ``x`` with its own moments and append ``(count, mean, var)`` to ``gathered``.

        Channels-last on a CPU (the statistics pass's fast layout), PyTorch's
        batch-norm kernel accumulates the moments in float32 (3e-4 off in the
        first layer's variance over 500 x 28 x 28 values, measured): the moments
        are taken here instead, on the (pixels, channels) view of the batch with
        torch's cascaded sums (the mean, then the mean squared deviation from it),
        which agree with a double accumulation to 3e-7, and the batch is
        normalised with them. In the default layout, or on a GPU, the kernel's own
        moments (accumulated in double on a CPU) serve.
        """
        channels = x.shape[1]
        if x.dim() == 4 and x.device.type == "cpu" and _channels_last_only(x):
            rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: one row per pixel
            count = rows.shape[0]
            mean = rows.sum(0) / count
            var = (rows - mean).square_().sum(0) / count
            gathered.append((count, mean, var))
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        out, mean, invstd = torch.native_batch_norm(
            x, self.weight, self.bias, None, None, True, 0.0, self.eps
        )
        # var + eps back from 1 / sqrt(var + eps) in double: float32 precision, as evaluation
        # uses it; a constant channel (var 0) can come back a rounding error below 0, clamped.
        var = (invstd.double().reciprocal().square() - self.eps).clamp(min=0.0).float()
        gathered.append((x.numel() // channels, mean, var))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _channels_last_only(x: torch.Tensor) -> bool:
    """``x`` is laid out channels-last and not also contiguous (as 1 x 1 images are both)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
