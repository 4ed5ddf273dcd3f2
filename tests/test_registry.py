"""The model registry and automatic slicing specs: built-ins, references, entry points, refusals."""

import sys

import pytest
import torch
from torch import nn

from heterofl_edge.errors import ConfigError, ModelError
from heterofl_edge.levels import scaled_width
from heterofl_edge.models import (
    ModelInterface,
    Scaler,
    TaskKind,
    get_architecture,
    infer_spec,
    list_models,
)
from heterofl_edge.slicing import Dim, DimKind, TensorRule, shapes_at

INTERFACE = ModelInterface(input_shape=(6,), num_classes=3)


class MLP(nn.Module):
    """A user model as the README describes it: sizes from scaled_width, a Scaler, an interface."""

    def __init__(self, rate: float = 1.0, width=scaled_width) -> None:
        super().__init__()
        self.heterofl_interface = INTERFACE
        self.fc1 = nn.Linear(6, width(20, rate))
        self.scaler = Scaler(rate)
        self.fc2 = nn.Linear(width(20, rate), 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.scaler(self.fc1(x))))


def build_mlp(rate: float) -> nn.Module:
    """An MLP for the registry tests."""
    return MLP(rate)


def floor_width(n, rate):
    return max(1, int(rate * n))


def round_width(n, rate):
    return max(1, round(rate * n))


def test_builtins_are_registered_first():
    assert list_models()[:3] == ["conv", "resnet18", "transformer"]
    assert get_architecture("transformer").task is TaskKind.language_model


@pytest.mark.parametrize("name", ["conv", "resnet18", "transformer"])
def test_inferred_spec_equals_the_hand_written_one(name):
    arch = get_architecture(name)
    interface = ModelInterface(arch.input_shape, arch.num_classes, arch.input_dtype, arch.task)
    inferred = infer_spec(lambda rate: arch.build(rate), interface, name).spec
    assert list(inferred) == list(arch.spec)
    assert dict(inferred) == dict(arch.spec)


def test_transformer_attention_is_found_to_be_sliced_per_head():
    arch = get_architecture("transformer")
    interface = ModelInterface(arch.input_shape, arch.num_classes, arch.input_dtype, arch.task)
    inference = infer_spec(lambda rate: arch.build(rate), interface, "transformer")
    spec = inference.spec
    assert spec["layers.0.mha.linear_q.weight"].dims == (Dim.per_head(256, 8), Dim.width(256))
    assert spec["embedding.weight"].dims == (Dim.labels(33280), Dim.width(256))
    assert spec["positional_embedding.weight"].dims == (Dim.fixed(64), Dim.width(256))
    assert len(inference.rates) <= 3  # rate 1 and at most two probes


def test_a_reference_names_a_factory_and_its_spec_is_inferred(monkeypatch):
    monkeypatch.setitem(sys.modules, "user_models", sys.modules[__name__])
    arch = get_architecture("user_models:build_mlp")
    assert arch.name == "user_models:build_mlp" and arch.source == "module:factory"
    assert arch.description == "An MLP for the registry tests."
    assert (arch.input_shape, arch.num_classes, arch.task) == ((6,), 3, TaskKind.classification)
    assert dict(arch.spec) == {
        "fc1.weight": TensorRule((Dim.width(20), Dim.fixed(6))),
        "fc1.bias": TensorRule((Dim.width(20),)),
        "fc2.weight": TensorRule((Dim.labels(3), Dim.width(20))),
        "fc2.bias": TensorRule((Dim.labels(3),)),
    }
    # The toolkit sets the Scaler to rate / global rate, whatever the factory passed it.
    sub = arch.build(0.125, 0.5)
    assert sub.scaler.rate == 0.25
    assert {k: tuple(v.shape) for k, v in sub.state_dict().items()} == shapes_at(arch.spec, 0.125)


@pytest.mark.parametrize(
    ("name", "message", "hint"),
    [
        ("vgg", "unknown model 'vgg'", "conv, resnet18, transformer"),
        ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'", "PYTHONPATH"),
        ("heterofl_edge.levels:nothing_here", "has no 'nothing_here'", "after the colon"),
        ("a:b:c", "not of the form package.module:factory", ""),
        ("heterofl_edge.levels:Level", "does not build at rate 1", ""),
    ],
)
def test_bad_model_names_are_refused_clearly(name, message, hint):
    with pytest.raises((ConfigError, ModelError)) as info:
        get_architecture(name)
    assert message in info.value.message
    assert hint in info.value.hint


def infer(factory, interface=INTERFACE):
    return infer_spec(factory, interface, "user model")


@pytest.mark.parametrize("width", [floor_width, round_width])
def test_a_width_that_is_not_ceil_is_refused_naming_the_tensor(width):
    with pytest.raises(ModelError) as info:
        infer(lambda rate: MLP(rate, width=width))
    assert "'fc1.weight'" in info.value.message
    assert "follows no slicing rule" in info.value.message
    assert "scaled_width" in info.value.hint


def test_a_size_that_grows_as_the_rate_shrinks_is_refused_as_non_monotonic():
    def inverted(n, rate):
        return scaled_width(n, 1.0 - rate / 2)

    with pytest.raises(ModelError, match="non-monotonic") as info:
        infer(lambda rate: MLP(rate, width=inverted))
    assert "dimension 0 of 'fc1.weight'" in info.value.message


def test_lazy_layers_are_refused_as_data_dependent():
    class Lazy(MLP):
        def __init__(self, rate):
            super().__init__(rate)
            self.fc2 = nn.LazyLinear(3)

    with pytest.raises(ModelError, match="lazy layer") as info:
        infer(Lazy)
    assert "nn.Linear(in, out)" in info.value.hint


def test_a_model_that_creates_tensors_in_forward_is_refused():
    class Growing(MLP):
        def forward(self, x):
            self.register_buffer("seen", torch.zeros(x.shape[0]))
            return super().forward(x)

    with pytest.raises(ModelError, match="a forward pass changes"):
        infer(Growing)


def test_layers_that_exist_at_some_rates_only_are_refused():
    class Optional(MLP):
        def __init__(self, rate):
            super().__init__(rate)
            if rate > 0.5:
                self.extra = nn.Linear(3, 3)

    with pytest.raises(ModelError, match="other tensors than at rate 1"):
        infer(Optional)


def test_a_model_that_fails_at_a_probe_rate_is_refused_with_the_rate():
    def even_only(rate):
        if scaled_width(20, rate) % 2:
            raise ValueError("width must be even")
        return MLP(rate)

    with pytest.raises(ModelError, match=r"does not build at rate 0\.\d+: ValueError"):
        infer(even_only)


def test_a_model_without_an_interface_is_told_how_to_declare_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "user_models2", sys.modules[__name__])
    monkeypatch.setattr(MLP, "__init__", lambda self, rate=1.0: nn.Module.__init__(self))
    with pytest.raises(ModelError) as info:
        get_architecture("user_models2:build_mlp")
    assert "heterofl_interface" in info.value.message
    assert "ModelInterface(" in info.value.hint


def test_overrides_set_what_shapes_cannot_tell_and_must_agree_with_them():
    labelled = ModelInterface((6,), 3, overrides={"fc1.weight": ("width", "labels")})
    spec = infer(MLP, labelled).spec
    assert spec["fc1.weight"].dims == (Dim.width(20), Dim.labels(6))
    wrong = ModelInterface((6,), 3, overrides={"fc2.bias": ("width",)})
    with pytest.raises(ModelError, match="says width, but its sizes are 3 at rate 1"):
        infer(MLP, wrong)
    with pytest.raises(ModelError, match="does not have"):
        infer(MLP, ModelInterface((6,), 3, overrides={"fc9.weight": ("fixed",)}))


def test_a_language_model_token_embedding_follows_the_label_split():
    class TinyLM(nn.Module):
        def __init__(self, rate):
            super().__init__()
            self.tokens = nn.Embedding(11, scaled_width(8, rate))  # 10 words and the mask token
            self.positions = nn.Embedding(4, scaled_width(8, rate))
            self.out = nn.Linear(scaled_width(8, rate), 10)

        def forward(self, x):
            return self.out(self.tokens(x) + self.positions(torch.arange(x.shape[1])))

    interface = ModelInterface((4,), 10, torch.long, TaskKind.language_model)
    spec = infer(TinyLM, interface).spec
    assert [d.kind for d in spec["tokens.weight"].dims] == [DimKind.labels, DimKind.width]
    assert [d.kind for d in spec["positions.weight"].dims] == [DimKind.fixed, DimKind.width]
    assert [d.kind for d in spec["out.weight"].dims] == [DimKind.labels, DimKind.width]
