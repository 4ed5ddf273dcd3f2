"""ExecuTorch backend: ``.pte`` programs, and a trainer that runs the training one.

The training program is ExecuTorch's joint forward/backward graph of the
model's masked loss (``torch.export`` -> ``_export_forward_backward`` ->
``to_edge`` -> ``to_executorch``), trained with ExecuTorch's training API:
``forward_backward`` and its SGD with momentum and weight decay. The
evaluation and statistics programs take the weights as inputs.

With ``Kernels.xnnpack`` (the default) the model is traced with
``exporter.delegable_ops`` (convolutions as im2col plus ``linear``; ReLU, 2x2
max-pooling and batch-statistics batch norm as ops whose backward XNNPACK
runs too), and the training program is lowered with
``to_edge_transform_and_lower`` and the XNNPACK partitioner, told to treat
float32 ``linear`` weights as inputs (``force_non_static_weights_for_f32_linear``).
A plain convolution would not do: XNNPACK bakes its weight into the delegate
as a constant, so the program would train its named parameter while the
delegate kept computing with the weights it was exported with.
``check_no_frozen_state`` refuses any program where a delegate holds a
parameter or buffer.

Workarounds for ExecuTorch 1.4.1, all here:

* ``max_pool2d_with_indices_backward`` accumulates into a buffer it never
  zeroes (executorch issue 21686): it is replaced by PyTorch's decomposition
  after ``_export_forward_backward``.
* ExecuTorch's SGD has no gradient clipping: ``ExecuTorchTrainer.step`` scales
  the gradients by ``clip_grad_norm_``'s factor before the optimizer step.
* A program loaded from a temporary buffer can crash: programs are loaded from
  their file.
* ``avg_pool2d`` has no backward kernel; the models pool with ``mean``.
* The pip wheel's XNNPACK threadpool starts with one thread per core;
  ``set_threads`` resets it (the benchmark measures one thread).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._decomp import get_decompositions

from exporter.config import Kernels
from exporter.delegable_ops import DECOMPOSITIONS, delegable_training
from exporter.errors import FrozenWeightsError
from exporter.step import OptimizerSettings, clip_coefficient
from heterofl_edge.loss import masked_cross_entropy

__all__ = [
    "ExecuTorchTrainer",
    "check_no_frozen_state",
    "export_function_program",
    "export_training_program",
    "joint_program",
    "load_program",
    "lower_training_program",
    "lower_with_xnnpack",
    "portable_operators",
    "set_threads",
]

aten = torch.ops.aten
TRAIN_METHOD = "forward"


class _MaskedLoss(nn.Module):
    """The training program's graph: the loss first (ExecuTorch's convention), then correct."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        loss = masked_cross_entropy(logits, y, mask)
        correct = ((logits.detach() * mask).argmax(dim=-1) == y).sum()
        return loss, correct


class _Function(nn.Module):
    def __init__(self, function: Callable[..., object]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: torch.Tensor) -> object:
        return self.function(*args)


def _quiet_imports() -> None:
    """Import ExecuTorch once, without its import-time noise.

    It imports torchao, which logs a warning per optional CUDA kernel it lacks,
    and triggers deprecation warnings inside its dependencies.
    """
    logging.getLogger("torchao").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import executorch.exir
        import executorch.extension.pybindings.portable_lib
        import executorch.extension.training  # noqa: F401


def _lower(programs: torch.export.ExportedProgram, path: Path) -> None:
    _quiet_imports()
    from executorch.exir import to_edge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        executorch_program = to_edge(programs).to_executorch()
    path.write_bytes(executorch_program.buffer)


def joint_program(
    model: nn.Module, example: Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    """The joint forward/backward graph of ``model``'s masked loss, as the model is written."""
    from torch.export.experimental import _export_forward_backward

    _quiet_imports()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_MaskedLoss(model), tuple(example), strict=False)
        program = _export_forward_backward(program)
        # The delegable ops (if the model was traced with them) become the
        # operators they are written in, now that their backward is in the graph.
        return program.run_decompositions(
            get_decompositions([aten.max_pool2d_with_indices_backward]) | DECOMPOSITIONS
        )


def check_no_frozen_state(edge: Any) -> None:
    """Raise ``FrozenWeightsError`` if a delegate of ``edge`` holds a parameter or buffer.

    ``edge`` is an ``EdgeProgramManager`` after partitioning. A lowered module
    keeps the graph it replaced (``original_module``); the state that graph
    lifted is what the delegate serialised as its own constants.
    """
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    frozen: dict[str, str] = {}
    for method in edge.methods:
        for module in edge.exported_program(method).graph_module.modules():
            if isinstance(module, LoweredBackendModule):
                signature = module.original_module.graph_signature
                for name in [*signature.parameters, *signature.buffers]:
                    frozen[name] = module.backend_id
    if frozen:
        names = ", ".join(f"{name} ({backend})" for name, backend in sorted(frozen.items()))
        raise FrozenWeightsError(
            f"a delegate holds {names} as a constant: training would update the "
            "program's parameter while the delegate kept computing with the exported value",
            "write the layer so that the backend takes its weight as an input (plain "
            "convolutions become im2col plus linear by themselves), or export with "
            "--executorch-kernels portable",
        )


def lower_with_xnnpack(program: torch.export.ExportedProgram) -> Any:
    """``program`` as an ``EdgeProgramManager`` with what XNNPACK takes delegated to it."""
    _quiet_imports()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_edge_transform_and_lower(
            program,
            partitioner=[XnnpackPartitioner(force_non_static_weights_for_f32_linear=True)],
        )


def portable_operators(edge: Any) -> Counter[str]:
    """How many times each operator of ``edge`` runs outside a delegate (views excepted)."""
    counts: Counter[str] = Counter()
    for method in edge.methods:
        for node in edge.exported_program(method).graph.nodes:
            name = str(getattr(node.target, "_name", None) or getattr(node.target, "__name__", ""))
            if node.op == "call_function" and name not in _NOT_KERNELS:
                counts[name.removeprefix("aten::")] += 1
    return counts


# Graph bookkeeping rather than kernels that do work.
_NOT_KERNELS = {"getitem", "executorch_call_delegate", "aten::alias_copy", "aten::view_copy"}


def lower_training_program(
    program: torch.export.ExportedProgram, path: Path, kernels: Kernels
) -> None:
    """Write ``program`` (a joint graph) to ``path``, on ``kernels``; refuse frozen weights."""
    _quiet_imports()
    if kernels is Kernels.portable:
        _lower(program, path)
        return
    edge = lower_with_xnnpack(program)
    check_no_frozen_state(edge)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_bytes(edge.to_executorch().buffer)


def export_training_program(
    model: nn.Module,
    example: Sequence[torch.Tensor],
    path: Path,
    kernels: Kernels = Kernels.xnnpack,
) -> None:
    """Write the joint forward/backward program of ``model``'s masked loss to ``path``.

    The parameters live inside the program; ``ExecuTorchTrainer.load_weights``
    overwrites them in place with a round's weights. The batch size is fixed
    to ``example``'s. With ``Kernels.xnnpack`` the model is traced with
    ``exporter.delegable_ops`` (same parameters, same names).
    """
    if kernels is Kernels.xnnpack:
        with delegable_training(model):
            program = joint_program(model, example)
    else:
        program = joint_program(model, example)
    lower_training_program(program, path, kernels)


def export_function_program(
    function: Callable[..., object], example: Sequence[torch.Tensor], path: Path
) -> None:
    """Write a program computing ``function(*example)`` (weights as inputs) to ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_Function(function), tuple(example), strict=False)
    _lower(program, path)


def set_threads(count: int) -> None:
    """Size the threadpool XNNPACK runs on (the pip wheel starts with one per core)."""
    _quiet_imports()
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(count)


def load_program(path: Path) -> object:
    """An ExecuTorch module for the program in ``path``, loaded from the file itself."""
    _quiet_imports()
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    return _load_for_executorch(str(path))


class ExecuTorchTrainer:
    """Local training on a ``.pte`` training program with ExecuTorch's training API."""

    def __init__(self, path: Path, param_names: Sequence[str], settings: OptimizerSettings) -> None:
        _quiet_imports()
        from executorch.extension.training import _load_for_executorch_for_training

        self._module = _load_for_executorch_for_training(str(path))
        self._names = list(param_names)
        self._settings = settings
        self._params: dict[str, torch.Tensor] | None = None
        self._optimizer: Any = None

    def load_weights(
        self, weights: Mapping[str, torch.Tensor], warm_up: Sequence[torch.Tensor]
    ) -> None:
        """Overwrite the program's parameters in place; reset the optimizer.

        ExecuTorch exposes the parameters only after a first ``forward_backward``,
        so one is run on ``warm_up`` (any batch) when needed; its gradients are
        discarded.
        """
        if self._params is None:
            self._module.forward_backward(TRAIN_METHOD, tuple(warm_up))
            self._params = self._module.named_parameters()
        for name in self._names:
            self._params[f"model.{name}"].copy_(weights[name])
        self._optimizer = None

    def step(self, batch: Sequence[torch.Tensor], lr: float) -> tuple[float, int]:
        """One SGD step on ``(x, y, mask)``; returns (loss, correct predictions)."""
        from executorch.extension.training import get_sgd_optimizer

        if self._params is None:
            raise RuntimeError("load_weights must come before step")
        loss, correct = self._module.forward_backward(TRAIN_METHOD, tuple(batch))
        grads = self._module.named_gradients()
        if self._settings.clip_grad_norm is not None:
            coef = clip_coefficient(list(grads.values()), self._settings.clip_grad_norm)
            grads = {k: g * coef for k, g in grads.items()}
        if self._optimizer is None:
            self._optimizer = get_sgd_optimizer(
                self._params, lr, self._settings.momentum, 0.0, self._settings.weight_decay, False
            )
        self._optimizer.step(grads)
        return float(loss), int(correct)

    def weights(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            raise RuntimeError("load_weights must come before weights")
        return {name: self._params[f"model.{name}"].clone() for name in self._names}
