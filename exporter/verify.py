"""Checking every artifact against eager PyTorch.

Training programs: ``steps`` SGD steps (momentum, weight decay, clipping, a
label mask) from the same start and on the same batches as ``torch.optim.SGD``
in eager mode, then the largest weight difference. Evaluation and statistics
programs: their outputs on one batch against the eager functions. A result
beyond the bound raises ``VerificationError`` naming the program.

The bound is ``max(tolerance, 10 * noise)``, where ``noise`` is how far eager
float32 training itself lands from the same steps in float64. For the conv
and ResNet models the noise is about 1e-7, so the bound is the tolerance. Some
models are ill-conditioned: at small widths the Transformer's Scaler
multiplies queries and keys by 1/r, attention scores by 1/r^2, and float32
reordering differences grow step by step for every runtime, eager PyTorch
included; there the bound follows the measured noise, which the manifest
records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.errors import VerificationError
from exporter.step import Batch, OptimizerSettings, StepFunctions, reference_steps

__all__ = ["check", "verify_executorch", "verify_onnx"]


def bound(tolerance: float, noise: float) -> float:
    """The largest difference accepted: the tolerance, or 10x eager float32's own error."""
    return max(tolerance, 10.0 * noise)


def check(program: str, difference: float, tolerance: float) -> float:
    if not np.isfinite(difference) or difference > tolerance:
        raise VerificationError(
            f"{program} differs from eager PyTorch by {difference:.3g} (bound {tolerance:.3g})",
            "this is a bug in the exporter or the runtime: export with --no-verify only to "
            "inspect the files, and report it",
        )
    return difference


def _max_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    return max(
        (float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b, strict=True)),
        default=0.0,
    )


def _reference(
    model: torch.nn.Module,
    start: Mapping[str, torch.Tensor],
    batches: Sequence[Batch],
    lr: float,
    settings: OptimizerSettings,
) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """Eager float32 losses and weights, and their distance from the float64 steps."""
    model.float().load_state_dict(start, strict=False)
    losses, params = reference_steps(model, batches, lr, settings)
    model.double().load_state_dict(start, strict=False)
    as64 = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    _, params64 = reference_steps(model, as64, lr, settings)  # type: ignore[arg-type]
    model.float()
    noise = max(float((params[n].double() - params64[n]).abs().max()) for n in params)
    return losses, params, noise


def verify_onnx(
    folder: Path,
    fns: StepFunctions,
    model: torch.nn.Module,
    start: dict[str, torch.Tensor],
    batches: Sequence[Batch],
    stats: Sequence[torch.Tensor],
    lr: float,
    settings: OptimizerSettings,
    tolerance: float,
) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    names = fns.param_names
    train = ort.InferenceSession(str(folder / "train_step.onnx"), options)
    params = [start[n].numpy() for n in names]
    momenta = [np.zeros_like(p) for p in params]
    onnx_losses = []
    for x, y, mask in batches:
        inputs = [*params, *momenta, x.numpy(), y.numpy(), mask.numpy(), np.array(lr, np.float32)]
        out = train.run(None, dict(zip([i.name for i in train.get_inputs()], inputs, strict=True)))
        onnx_losses.append(float(out[0]))
        params, momenta = out[1 : 1 + len(names)], out[1 + len(names) : 1 + 2 * len(names)]
    ref_losses, ref_params, noise = _reference(model, start, batches, lr, settings)
    limit = bound(tolerance, noise)
    result = {
        "eager_float32_noise": noise,
        "bound": limit,
        "train_step_max_weight_diff": check(
            "ONNX train_step", _max_diff(params, [ref_params[n] for n in names]), limit
        ),
        "train_step_max_loss_diff": check(
            "ONNX train_step loss", _max_diff(onnx_losses, ref_losses), limit
        ),
    }
    x = batches[0][0]
    weights = [start[n] for n in names]
    evaluate = ort.InferenceSession(str(folder / "evaluate.onnx"), options)
    logits = evaluate.run(None, _feeds(evaluate, [*weights, *stats, x]))[0]
    expected = fns.evaluate(*weights, *stats, x).detach()
    result["evaluate_max_diff"] = check("ONNX evaluate", _max_diff([logits], [expected]), tolerance)
    if fns.bn_layers:
        statistics = ort.InferenceSession(str(folder / "statistics.onnx"), options)
        got = statistics.run(None, _feeds(statistics, [*weights, x]))
        want = [t.detach() for t in fns.statistics(*weights, x)]
        result["statistics_max_diff"] = check("ONNX statistics", _max_diff(got, want), tolerance)
    return result


def _feeds(session: Any, values: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    return {i.name: v.numpy() for i, v in zip(session.get_inputs(), values, strict=True)}


def verify_executorch(
    folder: Path,
    fns: StepFunctions,
    model: torch.nn.Module,
    start: dict[str, torch.Tensor],
    batches: Sequence[Batch],
    stats: Sequence[torch.Tensor],
    lr: float,
    settings: OptimizerSettings,
    tolerance: float,
) -> dict[str, float]:
    from exporter.executorch_backend import ExecuTorchTrainer, load_program

    trainer = ExecuTorchTrainer(folder / "train.pte", fns.param_names, settings)
    trainer.load_weights(start, batches[0])
    et_losses = [trainer.step(batch, lr)[0] for batch in batches]
    ref_losses, ref_params, noise = _reference(model, start, batches, lr, settings)
    limit = bound(tolerance, noise)
    got = trainer.weights()
    names = fns.param_names
    result = {
        "eager_float32_noise": noise,
        "bound": limit,
        "train_max_weight_diff": check(
            "ExecuTorch train",
            _max_diff([got[n] for n in names], [ref_params[n] for n in names]),
            limit,
        ),
        "train_max_loss_diff": check(
            "ExecuTorch train loss", _max_diff(et_losses, ref_losses), limit
        ),
    }
    x = batches[0][0]
    weights = [start[n] for n in names]
    evaluate = load_program(folder / "evaluate.pte")
    logits = evaluate.forward((*weights, *stats, x))[0]  # type: ignore[attr-defined]
    expected = fns.evaluate(*weights, *stats, x).detach()
    result["evaluate_max_diff"] = check(
        "ExecuTorch evaluate", _max_diff([logits], [expected]), tolerance
    )
    if fns.bn_layers:
        statistics = load_program(folder / "statistics.pte")
        got_stats = statistics.forward((*weights, x))  # type: ignore[attr-defined]
        want = [t.detach() for t in fns.statistics(*weights, x)]
        result["statistics_max_diff"] = check(
            "ExecuTorch statistics", _max_diff(got_stats, want), tolerance
        )
    return result
