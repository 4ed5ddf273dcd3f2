"""Slicing specs inferred from a model's shapes at several rates.

A HeteroFL model is built at any width rate r in (0, 1]. Comparing the shapes
of its state at r = 1 and at one or more probe rates tells, for every
dimension of every tensor, how it follows the rate:

* its size never changes: ``fixed`` (input channels, kernel sizes, sequence
  positions), or ``labels`` when it is dimension 0 of a tensor with
  ``num_classes`` rows (the classifier's weight and bias) or, in a language
  model, the rows of a token embedding (an ``nn.Embedding`` with at least as many
  rows as the vocabulary: the words and the mask token);
* its size is ``ceil(r * n)``: ``width`` (a hidden size);
* its size is ``h * ceil(r * n / h)`` for a divisor ``h`` of ``n``: ``heads``
  (attention projections, sliced per head).

Probe rates are chosen so that the rules a dimension could follow predict
different sizes, and so that every scaled size is seen at least once at a rate
where ``ceil`` differs from ``floor`` and ``round`` (a model that rounds its
widths another way would slice wrongly): one to three probes.
Shapes cannot tell everything: whether a fixed dimension holds label rows is
a meaning, not a size, and two rules may agree at every probe. For those, a
model lists explicit ``overrides`` in its ``ModelInterface``.

A model is refused with a ``ModelError`` that names the tensor and says what
to do when it does not build at a probe rate, has layers whose shapes are only
known after a forward pass (lazy layers) or change in it, or has a dimension
that follows none of the rules (``floor`` or ``round`` instead of ``ceil``, a size
that grows as the rate shrinks).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from heterofl_edge.errors import ModelError
from heterofl_edge.levels import scaled_width
from heterofl_edge.models.interface import DimOverride, ModelInterface, TaskKind
from heterofl_edge.slicing import Dim, DimKind, SlicingSpec, TensorRule

__all__ = ["PROBE_RATES", "SpecInference", "TensorFinding", "infer_spec"]

# Candidate probe rates, each a multiple of 0.005 in [0.05, 0.95]. The rates
# actually used are picked from these, most informative first.
PROBE_RATES = tuple(round(0.05 + 0.005 * i, 4) for i in range(181))
MAX_PROBES = 3
SCALING_HINT = (
    "compute every hidden size as heterofl_edge.levels.scaled_width(n, rate) = ceil(rate * n) "
    "(attention widths as heads * scaled_width(n // heads, rate)), keep input and output "
    "sizes independent of the rate, or declare the dimension in ModelInterface.overrides"
)

# A rule one dimension could follow: ("fixed",), ("width",) or ("heads", h).
Rule = tuple[str, ...]


@dataclass(frozen=True)
class TensorFinding:
    """What inference found for one state tensor: its shape per rate and its dimensions."""

    name: str
    trainable: bool
    shapes: tuple[tuple[int, ...], ...]
    dims: tuple[Dim, ...]
    overridden: bool = False


@dataclass(frozen=True)
class SpecInference:
    """The inferred spec with its evidence: the rates built and every tensor's shapes."""

    rates: tuple[float, ...]
    tensors: tuple[TensorFinding, ...]

    @property
    def spec(self) -> SlicingSpec:
        return {t.name: TensorRule(t.dims, t.trainable) for t in self.tensors}


def _size(rule: Rule, n: int, rate: float) -> int:
    if rule[0] == "fixed":
        return n
    if rule[0] == "width":
        return scaled_width(n, rate)
    heads = int(rule[1])
    return heads * scaled_width(n // heads, rate)


def _rules_for(n: int) -> list[Rule]:
    if n == 1:  # width(1) is 1 at every rate: the same slicing as fixed(1)
        return [("fixed",)]
    return [("fixed",), ("width",), *[("heads", str(h)) for h in range(2, n) if n % h == 0]]


def _separated_pairs(candidates: Sequence[tuple[int, list[Rule]]], rate: float) -> int:
    """How many pairs of still-possible rules predict different sizes at ``rate``."""
    total = 0
    for n, rules in candidates:
        groups: dict[int, int] = {}
        for rule in rules:
            size = _size(rule, n, rate)
            groups[size] = groups.get(size, 0) + 1
        total += (len(rules) ** 2 - sum(c * c for c in groups.values())) // 2
    return total


def _telling(x: float) -> bool:
    """Whether ``ceil(x)`` differs from both ``floor(x)`` and ``round(x)``: 0 < frac(x) < 1/2."""
    frac = round(x, 9) % 1.0
    return 0.0 < frac < 0.5


def _quantities(rules: Sequence[Rule], n: int) -> set[tuple[int, int]]:
    """(n, h) of every scaling rule in ``rules``: its size is ``h * ceil(rate * n / h)``."""
    return {(n, 1 if r[0] == "width" else int(r[1])) for r in rules if r[0] != "fixed"}


def _next_probe(
    remaining: Mapping[tuple[str, int], list[Rule]],
    sizes_at_1: Mapping[str, tuple[int, ...]],
    untold: set[tuple[int, int]],
    used: Sequence[float],
) -> float | None:
    """The candidate rate that separates the most rules, then tells ceil from floor most often.

    None when no candidate adds anything.
    """
    ambiguous = {
        (sizes_at_1[name][d], tuple(rules))
        for (name, d), rules in remaining.items()
        if len(rules) > 1
    }
    candidates = [(n, list(rules)) for n, rules in ambiguous]
    best, best_score = None, (0, 0)
    for rate in PROBE_RATES:
        if rate in used:
            continue
        score = (
            _separated_pairs(candidates, rate),
            sum(1 for n, h in untold if _telling(rate * n / h)),
        )
        if score > best_score:
            best, best_score = rate, score
    return best


def _shapes(model: nn.Module, name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key, tensor in model.state_dict().items():
        if is_lazy(tensor):
            raise ModelError(
                f"{name}: tensor {key!r} has no shape until the first forward pass (a lazy layer); "
                "data-dependent shapes cannot be sliced",
                "give the layer its sizes (e.g. nn.Linear(in, out) instead of nn.LazyLinear(out))",
            )
        shapes[key] = tuple(tensor.shape)
    return shapes


def _build(build: Callable[[float], nn.Module], rate: float, name: str) -> nn.Module:
    try:
        model = build(rate)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"{name} does not build at rate {rate:g}: {type(exc).__name__}: {_first_line(exc)}",
            "a HeteroFL model must build at every rate in (0, 1]; " + SCALING_HINT,
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{name}'s factory returned {type(model).__name__}, not a torch.nn.Module",
            "the factory is factory(rate: float, **options) -> nn.Module",
        )
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def _check_forward(model: nn.Module, interface: ModelInterface, rate: float, name: str) -> None:
    """A forward pass must run on the declared input and leave every shape as it was."""
    before = _shapes(model, name)
    x = torch.zeros((2, *interface.input_shape), dtype=interface.input_dtype)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:
        raise ModelError(
            f"{name} at rate {rate:g} fails on an input of shape {tuple(x.shape)} "
            f"({x.dtype}): {type(exc).__name__}: {_first_line(exc)}",
            "check ModelInterface.input_shape and input_dtype (one example, no batch dimension)",
        ) from exc
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise ModelError(
            f"{name}: a forward pass changes the state's tensors ({', '.join(changed[:3])}): "
            "data-dependent shapes cannot be sliced",
            "create every parameter in __init__ with sizes that depend on the rate alone",
        )


def _describe(name: str, d: int, n: int, observed: Mapping[float, int]) -> str:
    sizes = ", ".join(f"{observed[r]} at rate {r:g}" for r in sorted(observed, reverse=True))
    ordered = [observed[r] for r in sorted(observed)]
    if any(a > b for a, b in itertools.pairwise(ordered)):
        why = "its size shrinks as the rate grows (non-monotonic)"
    else:
        ceil = ", ".join(
            f"{scaled_width(n, r)} at {r:g}" for r in sorted(observed, reverse=True) if r < 1
        )
        why = f"it follows no slicing rule (ceil(rate * {n}) gives {ceil})"
    return f"dimension {d} of {name!r} has size {sizes}: {why}"


def _parse_override(entry: DimOverride, n: int, where: str) -> Dim:
    if isinstance(entry, Dim):
        if entry.base != n:
            raise ModelError(f"override for {where} has base {entry.base}, the tensor has {n}")
        return entry
    word = str(entry).strip().lower()
    if word == "fixed":
        return Dim.fixed(n)
    if word == "labels":
        return Dim.labels(n)
    if word == "width":
        return Dim.width(n)
    if word.startswith("heads:") and word[6:].isdigit() and int(word[6:]) > 0:
        heads = int(word[6:])
        if n % heads:
            raise ModelError(f"override for {where}: {n} does not split into {heads} heads")
        return Dim.per_head(n, heads)
    raise ModelError(
        f"override for {where} is {entry!r}",
        "use a Dim or one of 'fixed', 'labels', 'width', 'heads:H'",
    )


def _rule_dim(rule: Rule, n: int) -> Dim:
    if rule[0] == "width":
        return Dim.width(n)
    if rule[0] == "heads":
        return Dim.per_head(n, int(rule[1]))
    return Dim.fixed(n)


def _label_rows(model: nn.Module, interface: ModelInterface) -> set[str]:
    """Tensors whose fixed dimension 0 holds label rows, beyond the classifier's."""
    if interface.task is not TaskKind.language_model:
        return set()
    return {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, nn.Embedding) and module.num_embeddings >= interface.num_classes
    }


def infer_spec(
    build: Callable[[float], nn.Module],
    interface: ModelInterface | Callable[[nn.Module], ModelInterface],
    name: str = "model",
    max_probes: int = MAX_PROBES,
) -> SpecInference:
    """Infer the slicing spec of the model ``build(rate)`` returns; ``ModelError`` if it cannot.

    ``build(rate)`` must return the model of width ``rate``; ``interface`` is the
    model's ``ModelInterface``, or a function that reads it from the full model.
    Overrides in ``interface.overrides`` replace what inference finds, and must
    agree with the observed sizes.
    """
    full = _build(build, 1.0, name)
    if not isinstance(interface, ModelInterface):
        interface = interface(full)
    sizes_at_1 = _shapes(full, name)
    trainable = {n for n, _ in full.named_parameters()}
    observed: dict[tuple[str, int], dict[float, int]] = {}
    remaining: dict[tuple[str, int], list[Rule]] = {}
    for key, shape in sizes_at_1.items():
        for d, n in enumerate(shape):
            observed[(key, d)] = {1.0: n}
            remaining[(key, d)] = _rules_for(n)
    shapes_per_rate = {1.0: sizes_at_1}
    smallest = full
    # Scaled sizes not yet seen at a rate where ceil differs from floor and round:
    # a probe there refuses a model that rounds its widths another way.
    untold = {
        q for (key, d), rules in remaining.items() for q in _quantities(rules, sizes_at_1[key][d])
    }
    while len(shapes_per_rate) - 1 < max_probes:
        rate = _next_probe(remaining, sizes_at_1, untold, list(shapes_per_rate))
        if rate is None:
            if len(shapes_per_rate) > 1:
                break
            rate = 0.3  # nothing to separate or tell (every size is 1?): still check one rate
        model = _build(build, rate, name)
        shapes = _shapes(model, name)
        missing, extra = (
            sorted(set(sizes_at_1) - set(shapes)),
            sorted(set(shapes) - set(sizes_at_1)),
        )
        if missing or extra:
            raise ModelError(
                f"{name} at rate {rate:g} has other tensors than at rate 1 "
                f"(missing {missing[:3]}, extra {extra[:3]})",
                "build the same layers at every rate; only their sizes may change",
            )
        for key, shape in shapes.items():
            if len(shape) != len(sizes_at_1[key]):
                raise ModelError(
                    f"{key!r} has {len(shape)} dimensions at rate {rate:g} and "
                    f"{len(sizes_at_1[key])} at rate 1",
                    "a tensor must keep its number of dimensions at every rate",
                )
            for d, size in enumerate(shape):
                observed[(key, d)][rate] = size
                n = sizes_at_1[key][d]
                remaining[(key, d)] = [r for r in remaining[(key, d)] if _size(r, n, rate) == size]
        shapes_per_rate[rate] = shapes
        smallest = model
        still = {
            q
            for (key, d), rules in remaining.items()
            for q in _quantities(rules, sizes_at_1[key][d])
        }
        untold = {(n, h) for n, h in untold & still if not _telling(rate * n / h)}
    _check_forward(smallest, interface, min(shapes_per_rate), name)

    label_rows = _label_rows(full, interface)
    for key in interface.overrides:
        if key not in sizes_at_1:
            raise ModelError(
                f"override names {key!r}, which {name} does not have",
                f"its tensors are: {', '.join(list(sizes_at_1)[:8])}, ...",
            )
    findings = []
    rates = tuple(shapes_per_rate)
    for key, shape in sizes_at_1.items():
        override = interface.overrides.get(key)
        if override is not None and len(override) != len(shape):
            raise ModelError(
                f"override for {key!r} has {len(override)} entries, "
                f"the tensor {len(shape)} dimensions"
            )
        dims = []
        for d, n in enumerate(shape):
            rules = remaining[(key, d)]
            if override is not None:
                dim = _parse_override(override[d], n, f"dimension {d} of {key!r}")
                wrong = {r: s for r, s in observed[(key, d)].items() if dim.size(r) != s}
                if wrong:
                    raise ModelError(
                        f"override for dimension {d} of {key!r} says {dim.kind.value}, "
                        f"but its sizes are {_sizes_text(observed[(key, d)])}",
                        "an override chooses among the rules the sizes allow",
                    )
            elif not rules:
                raise ModelError(_describe(key, d, n, observed[(key, d)]), SCALING_HINT)
            elif len(rules) > 1:
                options = ", ".join(
                    _rule_dim(r, n).kind.value + (f":{r[1]}" if len(r) > 1 else "") for r in rules
                )
                raise ModelError(
                    f"cannot tell how dimension {d} of {key!r} scales: sizes "
                    f"{_sizes_text(observed[(key, d)])} fit {options}",
                    f"declare it in ModelInterface.overrides, e.g. {{{key!r}: (...)}}",
                )
            else:
                dim = _rule_dim(rules[0], n)
                if (
                    dim.kind is DimKind.fixed
                    and d == 0
                    and (n == interface.num_classes or key in label_rows)
                ):
                    dim = Dim.labels(n)
            dims.append(dim)
        findings.append(
            TensorFinding(
                key,
                key in trainable,
                tuple(shapes_per_rate[r][key] for r in rates),
                tuple(dims),
                override is not None,
            )
        )
    return SpecInference(rates, tuple(findings))


def _sizes_text(observed: Mapping[float, int]) -> str:
    return ", ".join(f"{observed[r]} at rate {r:g}" for r in sorted(observed, reverse=True))
