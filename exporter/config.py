"""What one export produces, as one commented dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from exporter.step import OptimizerSettings

__all__ = ["VERIFY_TOLERANCE", "ExportConfig", "Format", "Kernels"]

# Largest weight difference allowed after the verification steps. float32 has a
# relative precision of 1.2e-7; the artifacts sum in other orders than eager
# PyTorch (reductions over up to ~1e5 terms, fused kernels), which after 10
# steps with momentum leaves differences of about 1e-7 to 1e-5 on weights of
# magnitude <= 1. A real error (a wrong gradient kernel, a missed clip or decay
# term) shows as 1e-3 and above. 1e-4 sits between the two.
VERIFY_TOLERANCE = 1e-4


class Format(StrEnum):
    onnx = "onnx"
    executorch = "executorch"
    all = "all"

    def expand(self) -> list[Format]:
        return [Format.onnx, Format.executorch] if self is Format.all else [self]


class Kernels(StrEnum):
    """How the ExecuTorch training program runs its operators.

    ``xnnpack``: convolutions written as im2col plus ``linear``, ReLU, 2x2
    max-pooling and batch norm written so that their backward is XNNPACK's too
    (``exporter.delegable_ops``), and every operator XNNPACK takes delegated to
    it, with the weights as program state (never baked into the delegate); the
    rest on portable kernels. ``portable``: ExecuTorch's portable kernels only,
    kept for comparison.
    """

    xnnpack = "xnnpack"
    portable = "portable"


@dataclass(frozen=True)
class ExportConfig:
    model: str = "conv"
    # Width of the sub-model (a level's rate or any rate in (0, 1]) and of the global model.
    rate: float = 1.0
    global_rate: float = 1.0
    formats: tuple[Format, ...] = (Format.onnx, Format.executorch)
    # ONNX programs take any batch up to max_batch; ExecuTorch ones exactly batch_size.
    batch_size: int = 10
    max_batch: int = 4096
    # Kernels of the ExecuTorch training program (evaluation and statistics stay portable).
    executorch_kernels: Kernels = Kernels.xnnpack
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    # Verification: this many SGD steps (momentum, weight decay, a label mask) on
    # each artifact and in eager PyTorch from the same start, compared weight by weight.
    verify: bool = True
    verify_steps: int = 10
    verify_lr: float = 0.01
    tolerance: float = VERIFY_TOLERANCE
    seed: int = 0
