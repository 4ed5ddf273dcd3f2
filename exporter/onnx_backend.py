"""ONNX backend: step functions -> ``make_fx`` trace -> ONNX graph for plain onnxruntime.

Every workaround for this torch / ONNX stack lives here, so a release bump
touches one file:

* ``torch.export`` cannot capture ``torch.func.grad`` ("Cannot access data
  pointer of Tensor that doesn't have storage"); tracing the step with
  ``make_fx`` first and exporting the traced graph works.
* The ONNX exporter has no translation for ``aten.convolution_backward``; it is
  decomposed here into a transposed convolution (input gradient) and k*k
  matrix products over shifted slices of the padded input (weight gradient;
  onnxruntime ran the earlier single convolution with the batch as channels
  slower).
* 2x2 max-pooling and its backward are decomposed into the maximum of the
  four window positions and a first-maximum mask (exact, ties as PyTorch):
  onnxruntime ran MaxPool with indices plus a ScatterElements backward slower
  (17-27% of a conv c step).
* ``make_fx(tracing_mode="symbolic")`` on real tensors makes every dimension
  of every input a symbol (weights included) and spends most of an export in
  sympy; the inputs are fakified here with only the batch dimension symbolic
  (conv c: the trace 15.5 s -> 3.0 s).
* The exporter's optimizer spends seconds on one rewrite rule that never fires
  here (``_optimize``).
* ``F.pad`` (a composite op) reads sizes as plain ints and pins a symbolic
  batch; ``constant_pad_nd`` keeps it.
* The ONNX exporter turns ``nll_loss_forward``'s ``total_weight`` into 1.0
  instead of N; PyTorch's core decompositions of nll_loss avoid that op.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
)

from exporter.delegable_ops import window_maximum, window_positions

__all__ = ["export_onnx_program"]

aten = torch.ops.aten


def _convolution_backward(  # type: ignore[no-untyped-def]
    grad_out,
    x,
    weight,
    bias_sizes,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
):
    """``aten.convolution_backward`` for plain 2-d convolutions, from forward ops."""
    if transposed or groups != 1 or any(d != 1 for d in dilation) or x.dim() != 4:
        raise NotImplementedError("only plain 2-d convolutions are decomposed")
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        kernel = weight.shape[2:]
        extra = [
            x.shape[2 + i] - ((grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + kernel[i])
            for i in range(2)
        ]
        grad_input = F.conv_transpose2d(
            grad_out, weight, stride=stride, padding=padding, output_padding=extra
        )
    if output_mask[1]:
        grad_weight = _weight_gradient(grad_out, x, weight.shape, stride, padding)
    if output_mask[2]:
        grad_bias = grad_out.sum(dim=(0, 2, 3))
    return grad_input, grad_weight, grad_bias


def _weight_gradient(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> torch.Tensor:
    """A convolution's weight gradient as one matrix product per kernel position.

    For kernel position ``(i, j)`` the gradient is ``g^T @ x_ij`` where ``g`` is
    the output gradient with the batch and positions as rows and ``x_ij`` the
    padded input shifted by ``(i, j)`` (strided like the output) with the same
    rows. onnxruntime runs these k*k MatMuls faster than the equivalent single
    convolution with the batch as channels. Each product comes out as
    ``(out, in)``; stacked position-major, one transpose of the stack puts them
    in the weight's layout (stacking along the last axis instead copies single
    floats and was slower; an earlier ``(in, out)`` form needed a second
    weight-sized transpose: 6% of a level-a step natively, 8% in wasm).
    """
    out_channels, in_channels, kh, kw = shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = grad_out.shape[2], grad_out.shape[3]
    padded = torch.constant_pad_nd(x, (pw, pw, ph, ph)) if ph or pw else x
    pixels = padded.permute(0, 2, 3, 1)  # (n, h, w, c): rows of each slice in (n, y, x) order
    rows = grad_out.permute(1, 0, 2, 3).reshape(out_channels, -1)  # (o, n * oh * ow)
    per_position = [
        torch.mm(
            rows,
            pixels[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :].reshape(
                -1, in_channels
            ),
        )
        for i in range(kh)
        for j in range(kw)
    ]  # each (o, c)
    # conv a, batch 10: Concat + Transpose 2.1 ms against 2.7 ms for the last-axis stack.
    return torch.stack(per_position, dim=0).permute(1, 2, 0).reshape(shape)


def _plain_2x2(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int] | int,
    dilation: Sequence[int] | int,
    ceil_mode: bool,
) -> bool:
    def pair(value: Sequence[int] | int) -> tuple[int, int]:
        return (value, value) if isinstance(value, int) else (value[0], value[-1])

    return (
        x.dim() == 4
        and pair(kernel) == (2, 2)
        and pair(stride or kernel) == (2, 2)
        and pair(padding) == (0, 0)
        and pair(dilation) == (1, 1)
        and not ceil_mode
    )


def _first_maximum(positions: list[torch.Tensor], out: torch.Tensor) -> list[torch.Tensor]:
    """Per position, True where it holds its window's first maximum (PyTorch's choice on ties).

    Ties are common: a flat patch of the image gives equal activations.
    """
    first: list[torch.Tensor] = []
    taken: torch.Tensor | None = None  # an earlier position held the maximum
    for position in positions:
        is_max = position == out
        first.append(is_max if taken is None else is_max & ~taken)
        taken = is_max if taken is None else taken | is_max
    return first


def _max_pool_with_indices(  # type: ignore[no-untyped-def]
    x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False
):
    """2x2 max-pooling as the maximum of the four window positions.

    The indices (PyTorch's: the first maximum of each window, as ``h * w + x``)
    are computed for any other user; the step's backward below does not read
    them, and the trace drops what nobody reads. onnxruntime's MaxPool with
    indices, a second MaxPool for the index offsets and a ScatterElements
    backward took 17-27% of a conv step natively.
    """
    if not _plain_2x2(x, kernel_size, stride, padding, dilation, ceil_mode):
        return NotImplemented
    positions = window_positions(x)
    out = window_maximum(positions)
    width = x.shape[3]
    rows = torch.arange(out.shape[2], device=x.device).reshape(-1, 1) * (2 * width)
    base = rows + 2 * torch.arange(out.shape[3], device=x.device)
    indices = torch.zeros_like(out, dtype=torch.int64)
    for first, offset in zip(_first_maximum(positions, out), (0, 1, width, width + 1), strict=True):
        indices = torch.where(first, base + offset, indices)
    return out, indices


def _max_pool_backward(  # type: ignore[no-untyped-def]
    grad, x, kernel_size, stride, padding, dilation, ceil_mode, indices
):
    """The gradient to each window's first maximum, found from ``x`` (not ``indices``)."""
    if not _plain_2x2(x, kernel_size, stride, padding, dilation, ceil_mode):
        return NotImplemented
    n, c, h, w = x.shape
    positions = window_positions(x)
    out = window_maximum(positions)
    routed = [
        torch.where(first, grad, 0.0).reshape(n, c, h // 2, 1, w // 2, 1)
        for first in _first_maximum(positions, out)
    ]
    rows = [torch.cat(routed[i : i + 2], dim=5) for i in (0, 2)]  # (n, c, h/2, 1, w/2, 2)
    full = torch.cat(rows, dim=3).reshape(n, c, h - h % 2, w - w % 2)
    return torch.constant_pad_nd(full, (0, w % 2, 0, h % 2)) if h % 2 or w % 2 else full


def _decompositions() -> dict[Any, Callable[..., Any]]:
    table: dict[Any, Callable[..., Any]] = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.max_pool2d_with_indices.default] = _max_pool_with_indices
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool_backward
    return table


class _Traced(torch.nn.Module):
    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph

    def forward(self, *args: torch.Tensor) -> object:
        return self.graph_module(*args)


def export_onnx_program(
    function: Callable[..., object],
    example_args: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    batch_inputs: Sequence[int],
    max_batch: int,
    path: Path,
) -> bool:
    """Trace ``function`` on ``example_args`` and write an ONNX graph to ``path``.

    Inputs at positions ``batch_inputs`` get a dynamic first dimension (the
    batch: a device's last batch is short) unless tracing had to specialise
    it; returns whether the batch stayed dynamic.
    """
    traced = make_fx(function, decomposition_table=_decompositions(), tracing_mode="symbolic")(
        *_batch_symbolic(example_args, batch_inputs)
    )
    traced.graph.eliminate_dead_code()  # e.g. max-pooling indices that the backward does not read
    traced.recompile()
    batch = Dim("batch", min=1, max=max_batch)
    dynamic = tuple({0: batch} if i in batch_inputs else None for i in range(len(example_args)))
    with warnings.catch_warnings(), _quiet_onnx_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Traced(traced),
            tuple(example_args),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=(dynamic,),
            optimize=False,  # _optimize below: the exporter's default passes less one rule
            verbose=False,
        )
    assert program is not None
    _optimize(program.model)
    program.save(str(path))
    _strip_trace_metadata(path)
    # An op can make tracing pin the batch size (a Linear on 3-d activations did, in
    # the Transformer); the saved graph's inputs then say so, and the caller records it.
    return _first_dims_are_symbolic(path, batch_inputs)


def _optimize(model: Any) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs, less one rewrite rule.

    These are onnxscript's ``optimize_ir`` passes without ``SlicesSplit``.
    That rule matches pairs of Slices of one tensor and found nothing to rewrite
    in these graphs, yet took 4-5 s of a conv c export: the weight gradient and
    the max-pooling slice the same tensors many times.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    rules = [rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule.name != "SlicesSplit"]
    passes = ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                rewriter.RewritePass(rules),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )
    passes(model)


def _batch_symbolic(
    example_args: Sequence[torch.Tensor], batch_inputs: Sequence[int]
) -> list[torch.Tensor]:
    """Fake copies of ``example_args`` whose only symbolic sizes are the batch dimensions."""
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    fakes: list[torch.Tensor] = []
    for position, tensor in enumerate(example_args):
        sizes = [
            DimDynamic.DYNAMIC if position in batch_inputs and dim == 0 else DimDynamic.STATIC
            for dim in range(tensor.dim())
        ]
        context: StatelessSymbolicContext[Any, Any] = StatelessSymbolicContext(dynamic_sizes=sizes)
        fakes.append(mode.from_tensor(tensor, symbolic_context=context))
    return fakes


def _strip_trace_metadata(path: Path) -> None:
    """Drop the exporter's per-node stack traces and names of this process's tracer.

    They hold the exporting machine's file paths and counters that change from
    one export to the next in a process; without them re-exports are byte-identical.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph, *(f for f in model.functions)]
    for graph in graphs:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del model.graph.metadata_props[:]
    del model.metadata_props[:]
    onnx.save(model, str(path))


def _first_dims_are_symbolic(path: Path, positions: Sequence[int]) -> bool:
    import onnx

    inputs = onnx.load(str(path), load_external_data=False).graph.input
    return all(bool(inputs[i].type.tensor_type.shape.dim[0].dim_param) for i in positions)


class _quiet_onnx_logs:
    """Silence the exporter's INFO/WARNING chatter (e.g. 'torchvision is not installed')."""

    def __enter__(self) -> None:
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
