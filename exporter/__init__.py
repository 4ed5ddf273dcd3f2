"""Exporter: per-level on-device training artifacts, verified against PyTorch.

``export_level(ExportConfig(model="conv", rate=0.125), out)`` writes
``out/conv-d/`` with, per format, a training program, an evaluation program
and (for models with sBN) a statistics program, plus ``manifest.json``:

* ``onnx/train_step.onnx``: one SGD step as a graph for plain onnxruntime;
* ``executorch/train.pte``: the joint forward/backward program for
  ExecuTorch's training API (``forward_backward`` and its SGD).

Stages: ``step`` (the programs as PyTorch functions) -> ``onnx_backend`` /
``executorch_backend`` (one module per backend, holding every workaround for
its release) -> ``verify`` (K steps against eager PyTorch) -> ``pipeline``
(manifest, atomic write).
"""

from exporter.config import ExportConfig, Format
from exporter.errors import ExportError, VerificationError
from exporter.pipeline import export_level
from exporter.step import OptimizerSettings

__all__ = [
    "ExportConfig",
    "ExportError",
    "Format",
    "OptimizerSettings",
    "VerificationError",
    "export_level",
]
