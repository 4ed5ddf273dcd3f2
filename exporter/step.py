"""The on-device programs as pure PyTorch functions of flat tensor lists.

Backends trace these; verification runs them against eager PyTorch.

* ``train_step(*params, *momenta, x, y, mask, lr) -> (loss, *params', *momenta', correct)``
  is one local SGD step exactly as ``heterofl_edge.training`` takes it with
  ``torch.optim.SGD`` and ``clip_grad_norm_``: masked cross-entropy, gradient
  norm clipped, weight decay added to the clipped gradient, momentum
  ``buf = m * buf + d`` and ``p = p - lr * buf``.
* ``evaluate(*params, *stats, x) -> logits`` in evaluation mode.
* ``statistics(*params, x) -> (mean_1, var_1, ..., mean_L, var_L)``: per sBN
  layer, the mean and biased variance of its input over the batch's positions,
  with batch-statistics normalisation and the Scaler as identity (see
  ``heterofl_edge.bn_stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad

from heterofl_edge.loss import masked_cross_entropy
from heterofl_edge.models import Scaler, StaticBatchNorm2d

__all__ = ["OptimizerSettings", "StepFunctions", "make_step_functions", "reference_steps"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class OptimizerSettings:
    """The local optimizer the training programs implement (paper / official code)."""

    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float | None = 1.0


@dataclass(frozen=True)
class StepFunctions:
    train_step: Callable[..., tuple[torch.Tensor, ...]]
    evaluate: Callable[..., torch.Tensor]
    statistics: Callable[..., tuple[torch.Tensor, ...]]
    param_names: list[str]
    stat_names: list[str]
    bn_layers: list[str]


def clip_coefficient(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_``'s factor: ``min(1, max_norm / (||g|| + 1e-6))``."""
    total = torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def make_step_functions(model: nn.Module, settings: OptimizerSettings) -> StepFunctions:
    """The three programs of ``model`` (a sub-model built at its level)."""
    param_names = [n for n, _ in model.named_parameters()]
    stat_names = [n for n, _ in model.named_buffers()]
    bn_layers = [n for n, m in model.named_modules() if isinstance(m, StaticBatchNorm2d)]
    scalers = [m for m in model.modules() if isinstance(m, Scaler)]
    n = len(param_names)

    def train_step(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params, momenta = list(args[:n]), list(args[n : 2 * n])
        x, y, mask, lr = args[2 * n :]
        model.train()

        def loss_fn(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            logits = functional_call(model, p, (x,))
            return masked_cross_entropy(logits, y, mask), logits.detach()

        grads, logits = grad(loss_fn, has_aux=True)(dict(zip(param_names, params, strict=True)))
        loss = masked_cross_entropy(logits, y, mask)  # the same value, outside the grad transform
        grad_list = [grads[name] for name in param_names]
        if settings.clip_grad_norm is not None:
            coef = clip_coefficient(grad_list, settings.clip_grad_norm)
            grad_list = [g * coef for g in grad_list]
        new_momenta = [
            settings.momentum * buf + (g + settings.weight_decay * p)
            for p, g, buf in zip(params, grad_list, momenta, strict=True)
        ]
        new_params = [p - lr * buf for p, buf in zip(params, new_momenta, strict=True)]
        correct = ((logits * mask).argmax(dim=-1) == y).sum()
        return (loss, *new_params, *new_momenta, correct)

    def evaluate(*args: torch.Tensor) -> torch.Tensor:
        model.eval()
        state = dict(zip(param_names + stat_names, args[:-1], strict=True))
        return functional_call(model, state, (args[-1],))

    def statistics(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model.train()
        for scaler in scalers:
            scaler.eval()
        captured: dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_hook(_capture(name, captured))
            for name, module in model.named_modules()
            if isinstance(module, StaticBatchNorm2d)
        ]
        try:
            functional_call(model, dict(zip(param_names, args[:-1], strict=True)), (args[-1],))
        finally:
            for handle in handles:
                handle.remove()
            for scaler in scalers:
                scaler.train()
        out: list[torch.Tensor] = []
        for name in bn_layers:
            values = captured[name]
            mean = values.mean(dim=(0, 2, 3))
            var = (values - mean[None, :, None, None]).pow(2).mean(dim=(0, 2, 3))
            out += [mean, var]
        return tuple(out)

    return StepFunctions(train_step, evaluate, statistics, param_names, stat_names, bn_layers)


def _capture(
    name: str, into: dict[str, torch.Tensor]
) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        into[name] = inputs[0]

    return hook


def reference_steps(
    model: nn.Module, batches: Sequence[Batch], lr: float, settings: OptimizerSettings
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Eager PyTorch: the same steps with ``torch.optim.SGD`` and ``clip_grad_norm_``."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    model.train()
    losses = []
    for x, y, mask in batches:
        loss = masked_cross_entropy(model(x), y, mask)
        optimizer.zero_grad()
        loss.backward()
        if settings.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}
