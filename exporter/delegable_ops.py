"""Training operators written so that XNNPACK runs their forward and their backward.

ExecuTorch's XNNPACK delegate takes matmuls, elementwise arithmetic,
``clamp``/``ceil``, concatenations, stride-1 slices, positive pads, views and
means over the two innermost dimensions. The backward PyTorch derives for a
convolution written as im2col (``slice_scatter`` into zero tensors), for ReLU
(``le`` + ``where``), for max-pooling (``max_pool2d_with_indices`` +
``scatter_add``) and for batch normalisation with batch statistics
(``_native_batch_norm_legit`` and its ``sum`` reductions) uses none of them,
so those ran on ExecuTorch's portable kernels and dominated the step.

Each operator here is a ``torch.library`` custom op with its own backward op,
so that ``torch.export`` keeps both as single nodes of the joint graph; after
``_export_forward_backward``, ``DECOMPOSITIONS`` rewrites them into operators
XNNPACK takes:

* ``patches`` (im2col, channels last) backs onto a col2im made of stride-1
  channel slices, positive pads and adds (for a strided convolution, into one
  grid per stride phase, interleaved once at the end).
* ``relu``'s backward is ``grad * ceil(clamp(out, 0, 1))``: 1 where the output
  is positive, 0 where it is 0.
* ``max_pool_2x2`` (kernel 2, stride 2, no padding) is the maximum of the four
  window positions; its backward routes each gradient to the first maximum of
  its window in row-major order, PyTorch's rule.
* ``batch_norm_training`` normalises with the batch's mean and biased
  variance, computed as global average pools; its backward is the usual
  closed form, from the same means.

For finite values they compute what PyTorch computes, up to the order of
float32 sums (the exporter's verification compares 10 training steps against
eager PyTorch). ``delegable_training(model)`` routes a model's ``F.relu``,
2x2 ``F.max_pool2d`` and training-mode ``F.batch_norm`` without running
statistics to them, and swaps its plain ``nn.Conv2d`` layers for
``MatmulConv2d`` (im2col plus ``linear``: XNNPACK bakes a convolution's weight
into the delegate as a constant, but takes a ``linear``'s weight as an input);
other calls are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "DECOMPOSITIONS",
    "MatmulConv2d",
    "batch_norm_training",
    "conv2d_as_matmul",
    "delegable_training",
    "matmul_convolutions",
    "max_pool_2x2",
    "patches",
    "relu",
]

LIBRARY = "heterofl_export"


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# -- im2col ------------------------------------------------------------------


def gather_patches(
    x: torch.Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int
) -> torch.Tensor:
    """``(n, h, w, c)`` -> ``(n, oh, ow, kh*kw*c)``: the zero-padded input's k*k shifted slices."""
    _, h, w, _ = x.shape
    oh, ow = _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)
    # With a stride s, s - 1 more zeros at the end keep every window's s*o span in range.
    pads = (0, 0, pw, pw + sw - 1, ph, ph + sh - 1)
    rows = F.pad(x, pads) if any(pads) else x
    slices = [
        _every(_every(rows, i, oh, sh, dim=1), j, ow, sw, dim=2)
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.cat(slices, dim=3) if len(slices) > 1 else slices[0].contiguous()


def _every(x: torch.Tensor, start: int, count: int, stride: int, dim: int) -> torch.Tensor:
    """``x``'s entries ``start, start + stride, ...`` (``count`` of them) along ``dim``.

    A strided slice would run on portable kernels; this is a stride-1 slice, a
    view that splits ``dim`` into (count, stride), and a stride-1 slice of it.
    """
    span = x.narrow(dim, start, count * stride)
    if stride == 1:
        return span
    shape = list(span.shape)
    split = span.reshape([*shape[:dim], count, stride, *shape[dim + 1 :]])
    return split.narrow(dim + 1, 0, 1).reshape([*shape[:dim], count, *shape[dim + 1 :]])


def scatter_patches(
    grad: torch.Tensor, h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int
) -> torch.Tensor:
    """The gradient of ``gather_patches`` (col2im): ``(n, oh, ow, kh*kw*c)`` -> ``(n, h, w, c)``.

    Kernel offset (i, j) sends its block to the padded input's rows ``i + sh*t``
    and columns ``j + sw*u``. Those rows are phase ``i % sh`` of the input,
    starting at row ``i // sh`` of that phase: each block is padded into its
    phase grid (1 / (sh*sw) of the input) and added there, and the phases are
    interleaved once at the end, with no zeros spread between gradient entries.
    """
    n, oh, ow, _ = grad.shape
    channels = grad.shape[3] // (kh * kw)
    height, width = h + 2 * ph, w + 2 * pw
    gh, gw = -(-height // sh), -(-width // sw)  # rows and columns per phase
    phases: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(kh):
        for j in range(kw):
            start = (i * kw + j) * channels
            block = grad[:, :, :, start : start + channels]
            di, dj = i // sh, j // sw
            placed = F.pad(block, (0, 0, dj, gw - dj - ow, di, gh - di - oh))
            key = (i % sh, j % sw)
            phases[key] = placed + phases[key] if key in phases else placed
    if (sh, sw) == (1, 1):
        total = phases[(0, 0)]
    else:
        zeros = grad.new_zeros((n, gh, gw, channels))
        rows = [
            torch.stack([phases.get((a, b), zeros) for b in range(sw)], dim=3).reshape(
                n, gh, gw * sw, channels
            )
            for a in range(sh)
        ]
        total = torch.stack(rows, dim=2).reshape(n, gh * sh, gw * sw, channels)
    return total[:, ph : ph + h, pw : pw + w, :]


@torch.library.custom_op(f"{LIBRARY}::patches", mutates_args=())
def patches(x: torch.Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> torch.Tensor:
    """im2col of a channels-last ``x`` (see ``gather_patches``)."""
    return gather_patches(x, kh, kw, sh, sw, ph, pw).clone()


@patches.register_fake
def _(x: torch.Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> torch.Tensor:
    n, h, w, c = x.shape
    return x.new_empty((n, _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw), kh * kw * c))


@torch.library.custom_op(f"{LIBRARY}::patches_backward", mutates_args=())
def patches_backward(
    grad: torch.Tensor, h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int
) -> torch.Tensor:
    return scatter_patches(grad, h, w, kh, kw, sh, sw, ph, pw).clone()


@patches_backward.register_fake
def _(
    grad: torch.Tensor, h: int, w: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int
) -> torch.Tensor:
    return grad.new_empty((grad.shape[0], h, w, grad.shape[3] // (kh * kw)))


def _patches_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, *geometry = inputs
    ctx.geometry = (x.shape[1], x.shape[2], *geometry)


def _patches_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    return (patches_backward(grad, *ctx.geometry), None, None, None, None, None, None)


patches.register_autograd(_patches_grad, setup_context=_patches_setup)


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
    with ``n * oh * ow`` rows, whose weight XNNPACK takes as an input.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = _output_size(h, kh, sh, ph), _output_size(w, kw, sw, pw)
    columns = patches(x.permute(0, 2, 3, 1).contiguous(), kh, kw, sh, sw, ph, pw)
    matrix = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)
    out = F.linear(columns.reshape(n * oh * ow, kh * kw * c), matrix, bias)
    return out.reshape(n, oh, ow, o).permute(0, 3, 1, 2).contiguous()


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
    """Within the block, every plain ``nn.Conv2d`` of ``model`` computes as ``MatmulConv2d``.

    The ``Parameter`` objects stay the original layers', under the same names,
    so the program's state has the model's names, shapes and order.
    """
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


# -- ReLU --------------------------------------------------------------------


def _positive(x: torch.Tensor) -> torch.Tensor:
    """1 where ``x > 0``, else 0 (finite ``x``), from ops XNNPACK runs."""
    return torch.ceil(torch.clamp(x, 0.0, 1.0))


def relu_backward_decomposed(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return grad * _positive(out)


@torch.library.custom_op(f"{LIBRARY}::relu", mutates_args=())
def relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


relu.register_fake(lambda x: torch.empty_like(x))


@torch.library.custom_op(f"{LIBRARY}::relu_backward", mutates_args=())
def relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return relu_backward_decomposed(grad, out)


relu_backward.register_fake(lambda grad, out: torch.empty_like(grad))


def _relu_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(output)


def _relu_grad(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (out,) = ctx.saved_tensors
    return relu_backward(grad, out)


relu.register_autograd(_relu_grad, setup_context=_relu_setup)


# -- 2x2 max-pooling ---------------------------------------------------------


def window_positions(x: torch.Tensor) -> list[torch.Tensor]:
    """The four positions of every 2x2 window of ``x`` (n, c, h, w), row-major.

    Each is (n, c, h/2, w/2); an odd last row or column is dropped, as ``max_pool2d`` does.
    """
    n, c, h, w = x.shape
    windows = x[:, :, : h - h % 2, : w - w % 2].reshape(n, c, h // 2, 2, w // 2, 2)
    return [
        windows[:, :, :, i : i + 1, :, j : j + 1].reshape(n, c, h // 2, w // 2)
        for i in (0, 1)
        for j in (0, 1)
    ]


def window_maximum(positions: list[torch.Tensor]) -> torch.Tensor:
    """The maximum of the four ``window_positions``: 2x2 max-pooling."""
    first, second, third, fourth = positions
    return torch.maximum(torch.maximum(first, second), torch.maximum(third, fourth))


def max_pool_2x2_decomposed(x: torch.Tensor) -> torch.Tensor:
    return window_maximum(window_positions(x))


def max_pool_2x2_backward_decomposed(
    grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    n, c, h, w = x.shape
    half = (n, c, h // 2, w // 2)
    unclaimed: torch.Tensor | None = None  # 1 where no earlier position held the maximum
    routed = []
    for position in window_positions(x):
        is_max = 1.0 - _positive(out - position)
        first = is_max if unclaimed is None else is_max * unclaimed
        unclaimed = 1.0 - is_max if unclaimed is None else unclaimed * (1.0 - is_max)
        routed.append((grad * first).reshape(*half, 1))
    top = torch.cat(routed[:2], dim=4).reshape(n, c, h // 2, 1, w // 2, 2)
    bottom = torch.cat(routed[2:], dim=4).reshape(n, c, h // 2, 1, w // 2, 2)
    full = torch.cat([top, bottom], dim=3).reshape(n, c, h - h % 2, w - w % 2)
    return F.pad(full, (0, w % 2, 0, h % 2)) if h % 2 or w % 2 else full


@torch.library.custom_op(f"{LIBRARY}::max_pool_2x2", mutates_args=())
def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


max_pool_2x2.register_fake(
    lambda x: x.new_empty((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2))
)


@torch.library.custom_op(f"{LIBRARY}::max_pool_2x2_backward", mutates_args=())
def max_pool_2x2_backward(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return max_pool_2x2_backward_decomposed(grad, x, out)


max_pool_2x2_backward.register_fake(lambda grad, x, out: torch.empty_like(x))


def _pool_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0], output)


def _pool_grad(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    x, out = ctx.saved_tensors
    return max_pool_2x2_backward(grad, x, out)


max_pool_2x2.register_autograd(_pool_grad, setup_context=_pool_setup)


# -- batch normalisation with the batch's statistics -------------------------


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) -> (1, c, 1, 1): the mean over all but channels, as a global average pool."""
    n, c, h, w = x.shape
    return x.permute(1, 0, 2, 3).reshape(1, c, n, h * w).mean(dim=(2, 3), keepdim=True)


def _normalised(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    centred = x - _channel_mean(x)
    invstd = torch.rsqrt(_channel_mean(centred * centred) + eps)
    return centred * invstd, invstd


def batch_norm_training_decomposed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    normalised, _ = _normalised(x, eps)
    return normalised * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def batch_norm_training_backward_decomposed(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    normalised, invstd = _normalised(x, eps)
    grad_mean = _channel_mean(grad)
    grad_normalised_mean = _channel_mean(grad * normalised)
    grad_x = (grad - grad_mean - normalised * grad_normalised_mean) * (
        invstd * weight.reshape(1, -1, 1, 1)
    )
    count = n * h * w
    return grad_x, (grad_normalised_mean * count).reshape(c), (grad_mean * count).reshape(c)


@torch.library.custom_op(f"{LIBRARY}::batch_norm_training", mutates_args=())
def batch_norm_training(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


batch_norm_training.register_fake(lambda x, weight, bias, eps: torch.empty_like(x))


@torch.library.custom_op(f"{LIBRARY}::batch_norm_training_backward", mutates_args=())
def batch_norm_training_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch_norm_training_backward_decomposed(grad, x, weight, eps)


batch_norm_training_backward.register_fake(
    lambda grad, x, weight, eps: (
        torch.empty_like(x),
        torch.empty_like(weight),
        torch.empty_like(weight),
    )
)


def _norm_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, _, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _norm_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = batch_norm_training_backward(grad, x, weight, ctx.eps)
    return grad_x, grad_weight, grad_bias, None


batch_norm_training.register_autograd(_norm_grad, setup_context=_norm_setup)


# -- the joint graph's rewrite, and the routing ------------------------------

_ops = torch.ops.heterofl_export
DECOMPOSITIONS: dict[Any, Callable[..., Any]] = {
    _ops.patches.default: gather_patches,
    _ops.patches_backward.default: scatter_patches,
    _ops.relu.default: torch.relu,
    _ops.relu_backward.default: relu_backward_decomposed,
    _ops.max_pool_2x2.default: max_pool_2x2_decomposed,
    _ops.max_pool_2x2_backward.default: max_pool_2x2_backward_decomposed,
    _ops.batch_norm_training.default: batch_norm_training_decomposed,
    _ops.batch_norm_training_backward.default: batch_norm_training_backward_decomposed,
}

_MAX_POOL_ARGS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
)
_BATCH_NORM_ARGS = (
    "input",
    "running_mean",
    "running_var",
    "weight",
    "bias",
    "training",
    "momentum",
    "eps",
)


def _pair(value: Any) -> tuple[Any, Any]:
    return (value[0], value[1]) if isinstance(value, (tuple, list)) else (value, value)


def _routed_max_pool(bound: dict[str, Any]) -> torch.Tensor | None:
    kernel = _pair(bound.get("kernel_size"))
    stride = _pair(bound.get("stride") or bound.get("kernel_size"))
    plain = (
        kernel == (2, 2)
        and stride == (2, 2)
        and _pair(bound.get("padding", 0)) == (0, 0)
        and _pair(bound.get("dilation", 1)) == (1, 1)
        and not bound.get("ceil_mode", False)
        and not bound.get("return_indices", False)
        and bound["input"].dim() == 4
    )
    return max_pool_2x2(bound["input"]) if plain else None


def _routed_batch_norm(bound: dict[str, Any]) -> torch.Tensor | None:
    routable = (
        bound.get("training", False)
        and bound.get("running_mean") is None
        and bound.get("running_var") is None
        and bound.get("weight") is not None
        and bound.get("bias") is not None
        and bound["input"].dim() == 4
    )
    if not routable:
        return None
    return batch_norm_training(
        bound["input"], bound["weight"], bound["bias"], float(bound.get("eps", 1e-5))
    )


class _DelegableOps(TorchFunctionMode):
    """Routes ReLU, 2x2 max-pooling and batch-statistics batch norm to this module's ops."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        routed: torch.Tensor | None = None
        if func in (F.relu, torch.relu) and not kwargs.get("inplace", args[1:2] == (True,)):
            routed = relu(args[0])
        elif func is F.max_pool2d:
            routed = _routed_max_pool(dict(zip(_MAX_POOL_ARGS, args, strict=False)) | kwargs)
        elif func is F.batch_norm:
            routed = _routed_batch_norm(dict(zip(_BATCH_NORM_ARGS, args, strict=False)) | kwargs)
        return func(*args, **kwargs) if routed is None else routed


@contextmanager
def delegable_training(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` trains with the operators of this module (same parameters)."""
    with matmul_convolutions(model), _DelegableOps():
        yield model
