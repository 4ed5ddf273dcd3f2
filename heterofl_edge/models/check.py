"""Does a model work with HeteroFL? The checks behind ``heterofl-edge models check``.

Each check returns a ``CheckResult`` rather than raising, so that a report
shows everything at once:

* **spec**: the slicing spec inferred from the model's shapes, and for a
  built-in, that it equals the hand-written one;
* **sub-models**: at every rate, the model built at that width has exactly the
  tensors the spec predicts (the upper-left slices of the global ones, per head
  for attention), the slices extracted from the global state load into it, and
  it trains (forward, loss, backward with finite gradients);
* **aggregation**: every level uploading its unchanged slice gives back the
  global model, label split included;
* **sBN**: statistics gathered with ``bn_stats`` apply to the model, which then
  evaluates to finite outputs; plain ``torch.nn`` batch norms are refused (their
  running averages cannot be aggregated across widths).

The ONNX export with parity is checked by the command line, which may import
the exporter (this core may not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from heterofl_edge.aggregation import HeteroFLAggregator
from heterofl_edge.bn_stats import apply_statistics, collect_moments
from heterofl_edge.errors import HeteroFLError
from heterofl_edge.levels import Level, rate_label
from heterofl_edge.loss import masked_cross_entropy
from heterofl_edge.models.architecture import Architecture
from heterofl_edge.models.autospec import SpecInference, infer_spec
from heterofl_edge.models.interface import ModelInterface, TaskKind
from heterofl_edge.models.layers import StaticBatchNorm2d
from heterofl_edge.slicing import Dim, DimKind, extract_submodel_state, shapes_at, trainable_names

__all__ = ["CheckResult", "check_model", "describe_dims", "run_check", "spec_inference"]

LEVEL_RATES = tuple(level.rate for level in Level)


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, whether it passed, what it found, and what to do if it failed."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


def spec_inference(arch: Architecture) -> SpecInference:
    """The evidence for ``arch``'s spec: stored for a user model, inferred anew for a built-in."""
    if arch.inference is not None:
        return arch.inference
    interface = ModelInterface(arch.input_shape, arch.num_classes, arch.input_dtype, arch.task)
    return infer_spec(lambda rate: arch.build(rate), interface, arch.name)


def describe_dims(dims: Sequence[Dim]) -> str:
    """``width(64) x fixed(3)``: one tensor's dimensions as a table cell."""
    parts = []
    for d in dims:
        parts.append(
            f"heads({d.base}/{d.heads})" if d.kind is DimKind.heads else f"{d.kind.value}({d.base})"
        )
    return " x ".join(parts) if parts else "scalar"


def _example_batch(
    arch: Architecture, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if arch.input_dtype.is_floating_point:
        x = torch.randn((batch, *arch.input_shape), generator=generator).to(arch.input_dtype)
    else:
        x = torch.randint(0, arch.num_classes, (batch, *arch.input_shape), generator=generator)
        x = x.to(arch.input_dtype)
    if arch.task is TaskKind.language_model:
        y = torch.randint(0, arch.num_classes, (batch, *arch.input_shape), generator=generator)
    else:
        y = torch.randint(0, arch.num_classes, (batch,), generator=generator)
    return x, y


def run_check(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; an exception is a failed check, not a crash of the report."""
    try:
        return check()
    except HeteroFLError as exc:
        return CheckResult(name, False, exc.message, exc.hint)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return CheckResult(
            name,
            False,
            f"{type(exc).__name__}: {text[0][:300] if text else 'no message'}",
            "run the same step on the model in Python to see the traceback",
        )


def _check_spec(arch: Architecture, inference: SpecInference) -> CheckResult:
    found = dict(inference.spec)
    probes = ", ".join(f"{r:g}" for r in inference.rates[1:])
    if arch.inference is not None:
        return CheckResult(
            "spec", True, f"inferred from shapes at rate 1 and {probes}: {len(found)} tensors"
        )
    differ = [n for n in arch.spec if found.get(n) != arch.spec[n]] + sorted(
        set(found) - set(arch.spec)
    )
    if differ:
        return CheckResult(
            "spec",
            False,
            f"the hand-written spec and the inferred one differ for {', '.join(differ[:3])}",
            "one of them is wrong: compare the table above with the model's code",
        )
    return CheckResult(
        "spec", True, f"hand-written spec equals the one inferred at rate 1 and {probes}"
    )


def _check_submodels(arch: Architecture, rates: Sequence[float]) -> CheckResult:
    generator = torch.Generator().manual_seed(0)
    global_state = arch.build(1.0).state_dict()
    for rate in rates:
        where = f"level {rate_label(rate)}"
        model = arch.build(rate)
        built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        expected = shapes_at(arch.spec, rate)
        if list(built) != list(expected):
            missing = sorted(set(expected) - set(built))
            extra = sorted(set(built) - set(expected))
            return CheckResult(
                "sub-models",
                False,
                f"at {where} the model's tensors differ from the spec's "
                f"(missing {missing[:3]}, extra {extra[:3]})",
                "build the same layers at every rate",
            )
        wrong = [k for k in built if built[k] != expected[k]]
        if wrong:
            k = wrong[0]
            return CheckResult(
                "sub-models",
                False,
                f"at {where} {k!r} has shape {built[k]}, the slice of the global tensor "
                f"{tuple(global_state[k].shape)} is {expected[k]}",
                "sizes must follow the rules of the spec at every rate (see the table)",
            )
        model.load_state_dict(extract_submodel_state(global_state, arch.spec, rate))
        model.train()
        x, y = _example_batch(arch, 2, generator)
        out = model(x)
        if tuple(out.shape) != (*y.shape, arch.num_classes):
            return CheckResult(
                "sub-models",
                False,
                f"at {where} the output has shape {tuple(out.shape)} for an input of "
                f"{tuple(x.shape)}; expected {(*y.shape, arch.num_classes)}",
                "a classifier returns logits [N, num_classes]; a language model [N, S, vocabulary]",
            )
        masked_cross_entropy(out, y).backward()
        bad = [
            n
            for n, p in model.named_parameters()
            if p.grad is not None and not p.grad.isfinite().all()
        ]
        if bad:
            return CheckResult(
                "sub-models", False, f"at {where} the gradient of {bad[0]!r} is not finite"
            )
    levels = " ".join(rate_label(r) for r in rates)
    return CheckResult(
        "sub-models",
        True,
        f"levels {levels}: every tensor is the upper-left slice of the global one; "
        "the slices load, run forward and backward",
    )


def _check_aggregation(arch: Architecture, rates: Sequence[float]) -> CheckResult:
    global_state = {k: v.detach().clone() for k, v in arch.build(1.0).state_dict().items()}
    names = trainable_names(arch.spec)
    aggregator = HeteroFLAggregator(global_state, arch.spec)
    has_labels = any(d.kind is DimKind.labels for r in arch.spec.values() for d in r.dims)
    for i, rate in enumerate(rates):
        sliced = extract_submodel_state(global_state, arch.spec, rate)
        labels = None
        if has_labels:  # alternate halves of the labels: the label split is exercised too
            labels = range(i % 2, arch.num_classes, 2)
        aggregator.add({n: sliced[n] for n in names}, rate, labels)
    merged = aggregator.finalize()
    changed = [n for n in global_state if not torch.equal(merged[n], global_state[n])]
    if changed:
        return CheckResult(
            "aggregation",
            False,
            f"unchanged uploads from levels {len(rates)} changed {changed[0]!r}",
            "the spec's slices do not match the aggregator's positions: please report this",
        )
    return CheckResult(
        "aggregation",
        True,
        f"unchanged uploads from {len(rates)} levels give back the global model exactly",
    )


def _check_bn(arch: Architecture, rate: float) -> CheckResult:
    model = arch.build(rate)
    plain = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if plain:
        return CheckResult(
            "sBN",
            False,
            f"{plain[0]!r} is a torch.nn batch norm with running statistics, which HeteroFL "
            "cannot aggregate across widths",
            "use heterofl_edge.models.StaticBatchNorm2d (sBN, paper section 3.2)",
        )
    layers = [n for n, m in model.named_modules() if isinstance(m, StaticBatchNorm2d)]
    if not layers:
        return CheckResult("sBN", True, "no sBN layers (nothing to gather)")
    generator = torch.Generator().manual_seed(1)
    batches = [_example_batch(arch, 4, generator)[0] for _ in range(2)]
    moments = collect_moments(model, batches)
    if sorted(moments) != sorted(layers):
        return CheckResult(
            "sBN", False, f"statistics reached {len(moments)} of {len(layers)} sBN layers"
        )
    model.load_state_dict(apply_statistics(model.state_dict(), moments))
    model.eval()
    with torch.no_grad():
        out = model(batches[0])
    if not out.isfinite().all():
        return CheckResult(
            "sBN", False, "the model evaluates to non-finite outputs with gathered statistics"
        )
    return CheckResult(
        "sBN",
        True,
        f"statistics of {len(layers)} sBN layers gathered at level {rate_label(rate)} and applied",
    )


def check_model(arch: Architecture, rates: Sequence[float] = LEVEL_RATES) -> list[CheckResult]:
    """Every core check of ``arch`` at ``rates`` (levels a..e by default), in order."""
    inference = spec_inference(arch)
    torch.manual_seed(0)
    return [
        run_check("spec", lambda: _check_spec(arch, inference)),
        run_check("sub-models", lambda: _check_submodels(arch, rates)),
        run_check("aggregation", lambda: _check_aggregation(arch, rates)),
        run_check("sBN", lambda: _check_bn(arch, min(rates))),
    ]
