"""Models against the paper's Tables 7-9, and the specs against the models."""

import pytest
import torch

from heterofl_edge.complexity import format_count, measure_complexity
from heterofl_edge.levels import Level
from heterofl_edge.models import Scaler, StaticBatchNorm2d, build_model, get_architecture
from heterofl_edge.slicing import shapes_at

# (parameters, FLOPs, space MB) per level a..e, as printed in the paper.
PAPER = {
    "conv": [
        ("1.6 M", "80.5 M", 5.94),
        ("391.4 K", "20.5 M", 1.49),
        ("98.9 K", "5.3 M", 0.38),
        ("25.3 K", "1.4 M", 0.10),
        ("6.6 K", "400.5 K", 0.03),
    ],
    "resnet18": [
        ("9.6 M", "330.2 M", 36.71),
        ("2.4 M", "83.3 M", 9.19),
        ("603.8 K", "21.2 M", 2.30),
        ("151.8 K", "5.5 M", 0.58),
        ("38.4 K", "1.5 M", 0.15),
    ],
    "transformer": [
        ("19.3 M", "1.4 B", 73.49),
        ("9.1 M", "614.8 M", 34.74),
        ("4.4 M", "290.1 M", 16.92),
        ("2.2 M", "140.7 M", 8.39),
        ("1.1 M", "69.3 M", 4.23),
    ],
}
UNITS = {"K": 1e3, "M": 1e6, "B": 1e9}


def printed_matches(value: int, printed: str) -> bool:
    number, unit = printed.split()
    scale = UNITS[unit]
    return abs(value / scale - float(number)) <= 0.05 + 1e-9


@pytest.mark.parametrize("model", sorted(PAPER))
@pytest.mark.parametrize("index", range(5))
def test_parameters_flops_and_space_match_the_paper(model, index):
    level = list(Level)[index]
    params, flops, space = PAPER[model][index]
    measured = measure_complexity(get_architecture(model), level.rate)
    assert printed_matches(measured.parameters, params), (measured.parameters, params)
    assert printed_matches(measured.flops, flops), (measured.flops, flops)
    assert round(measured.space_mb, 2) == pytest.approx(space)


def test_exact_conv_counts():
    # conv a by hand: convs 640 + 73,856 + 295,168 + 1,180,160;
    # sBN 2 * (64 + 128 + 256 + 512); linear 5,130.
    assert measure_complexity(get_architecture("conv"), 1.0).parameters == 1_556_874
    assert format_count(391_370) == "391.4 K"


@pytest.mark.parametrize("model", ["conv", "resnet18", "transformer"])
@pytest.mark.parametrize("rate", [1.0, 0.5, 0.0625, 0.3, 0.01])
def test_spec_describes_every_tensor_of_the_model(model, rate):
    arch = get_architecture(model)
    state = arch.build(rate).state_dict()
    assert list(state) == list(arch.spec)
    shapes = shapes_at(arch.spec, rate)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes


@pytest.mark.parametrize("model", ["conv", "resnet18", "transformer"])
def test_submodels_run_forward_and_backward_at_any_rate(model):
    arch = get_architecture(model)
    for rate in (1.0, 0.3, 0.0625):
        net = arch.build(rate)
        x = arch.example_input(2)
        if x.dtype == torch.long:
            x = torch.randint(0, 100, x.shape)
        out = net(x)
        assert out.shape[-1] == arch.num_classes
        out.float().mean().backward()


def test_scaler_divides_by_rate_only_in_training():
    scaler = Scaler(0.25)
    x = torch.ones(3)
    assert torch.equal(scaler.train()(x), torch.full((3,), 4.0))
    assert torch.equal(scaler.eval()(x), x)


def test_static_batch_norm_tracks_nothing_while_training():
    norm = StaticBatchNorm2d(4)
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    y = norm.train()(x)
    assert torch.equal(norm.running_mean, torch.zeros(4))
    assert torch.equal(norm.running_var, torch.ones(4))
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # normalised with the batch's statistics
    # In evaluation it uses the buffers: zeros and ones leave x unchanged.
    assert torch.allclose(norm.eval()(x), x / (1 + 1e-5) ** 0.5)


def test_global_model_scaler_is_identity_and_submodel_scaler_is_one_over_rate():
    sub = build_model("conv", rate=0.125)
    rates = {m.rate for m in sub.modules() if isinstance(m, Scaler)}
    assert rates == {0.125}
    assert {m.rate for m in build_model("conv").modules() if isinstance(m, Scaler)} == {1.0}
    # With a global model at level b, a level-e client scales by e/b = 1/8.
    assert {
        m.rate for m in build_model("conv", 0.0625, 0.5).modules() if isinstance(m, Scaler)
    } == {0.125}
