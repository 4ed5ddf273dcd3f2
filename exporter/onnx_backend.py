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
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

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
    ``(out, in)``, so the positions stack straight into the weight's layout
    (an earlier ``(in, out)`` form needed a weight-sized transpose per
    convolution: 6% of a level-a step natively, 8% in wasm).
    """
    out_channels, in_channels, kh, kw = shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = grad_out.shape[2], grad_out.shape[3]
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
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
    return torch.stack(per_position, dim=2).reshape(shape)


def _decompositions() -> dict[Any, Callable[..., Any]]:
    table: dict[Any, Callable[..., Any]] = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
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
        *example_args
    )
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
            optimize=True,
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    _strip_trace_metadata(path)
    # An op can make tracing pin the batch size (a Linear on 3-d activations did, in
    # the Transformer); the saved graph's inputs then say so, and the caller records it.
    return _first_dims_are_symbolic(path, batch_inputs)


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
