"""Faster training programs: ExecuTorch on XNNPACK (convolutions as matmuls, weights never
frozen into a delegate, ReLU, max-pooling and batch norm with a backward XNNPACK runs) and
the ONNX convolution weight gradient as matmuls."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.config import Kernels
from exporter.delegable_ops import (
    DECOMPOSITIONS,
    MatmulConv2d,
    conv2d_as_matmul,
    delegable_training,
    matmul_convolutions,
)
from exporter.errors import FrozenWeightsError
from exporter.step import OptimizerSettings, reference_steps
from heterofl_edge.loss import label_mask, masked_cross_entropy
from heterofl_edge.models import StaticBatchNorm2d


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, 1, 1)
        self.down = nn.Conv2d(3, 4, 1, 2, 0, bias=False)
        self.linear = nn.Linear(4, 5)

    def forward(self, x):
        return self.linear(F.relu(self.down(F.relu(self.conv(x)))).mean(dim=(2, 3)))


class TinyBlockNet(nn.Module):
    """The layers HeteroFL's models train with: conv, sBN, ReLU, 2x2 max-pool, a strided conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, 1, 1)
        self.norm = StaticBatchNorm2d(3)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(3, 4, 3, 2, 1, bias=False)
        self.linear = nn.Linear(4, 5)

    def forward(self, x):
        out = self.pool(self.act(self.norm(self.conv(x))))
        return self.linear(F.relu(self.down(out)).mean(dim=(2, 3)))


def tiny_batches(count, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = label_mask([0, 2, 3, 4], 5)
    return [
        (torch.randn(4, 2, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g), mask)
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "bias"),
    [(3, 1, 1, True), (3, 2, 1, False), (1, 2, 0, False), (3, 1, 0, True)],
)
def test_matmul_convolution_computes_conv2d(kernel, stride, padding, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=g)
    weight = torch.randn(4, 3, kernel, kernel, generator=g)
    b = torch.randn(4, generator=g) if bias else None
    expected = F.conv2d(x, weight, b, stride, padding)
    got = conv2d_as_matmul(x, weight, b, (stride, stride), (padding, padding))
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_matmul_convolutions_keep_the_parameters_and_their_names():
    model = TinyConvNet()
    before = list(model.named_parameters())
    with matmul_convolutions(model):
        assert isinstance(model.conv, MatmulConv2d) and isinstance(model.down, MatmulConv2d)
        during = list(model.named_parameters())
    assert [n for n, _ in during] == [n for n, _ in before]
    assert all(p is q for (_, p), (_, q) in zip(during, before, strict=True))
    assert type(model.conv) is nn.Conv2d  # restored


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(3, 1, 1), (3, 2, 1), (1, 2, 0), (2, 3, 0)]
)
def test_matmul_convolution_backward_matches_conv2d(kernel, stride, padding):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, kernel, kernel, generator=g, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, weight, None, stride, padding)
    got = conv2d_as_matmul(x, weight, None, (stride, stride), (padding, padding))
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    for want, have in zip(
        torch.autograd.grad(expected, (x, weight), grad),
        torch.autograd.grad(got, (x, weight), grad),
        strict=True,
    ):
        assert torch.allclose(have, want, atol=1e-12)


def _pool_input(height, width):
    """Values on a coarse grid after a ReLU: windows with tied maxima, zeros among them."""
    g = torch.Generator().manual_seed(6)
    return torch.relu(torch.randint(-2, 3, (2, 3, height, width), generator=g).double())


@pytest.mark.parametrize(("height", "width"), [(6, 8), (7, 5)])
def test_delegable_max_pool_routes_the_gradient_like_pytorch_even_on_ties(height, width):
    x = _pool_input(height, width).requires_grad_()
    grad = torch.randn(2, 3, height // 2, width // 2, dtype=torch.float64)
    want = torch.autograd.grad(F.max_pool2d(x, 2), x, grad)[0]
    with delegable_training(nn.Identity()):
        routed = F.max_pool2d(x, 2)
    assert "heterofl_export" in type(routed.grad_fn).__name__
    assert torch.equal(routed, F.max_pool2d(x, 2))
    assert torch.equal(torch.autograd.grad(routed, x, grad)[0], want)
    # The form the exported program computes, as written for XNNPACK:
    decomposed = DECOMPOSITIONS[torch.ops.heterofl_export.max_pool_2x2_backward.default]
    assert torch.equal(decomposed(grad, x.detach(), routed.detach()), want)


def test_delegable_training_leaves_other_calls_as_they_are():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    with delegable_training(nn.Identity()):
        overlapping = F.max_pool2d(x, 3, 1)
        running = F.batch_norm(x, torch.zeros(2), torch.ones(2), training=False)
        in_place = F.relu(x.clone(), inplace=True)
    for out in (overlapping, running, in_place):
        assert "heterofl_export" not in type(out.grad_fn).__name__


def test_a_model_trains_the_same_with_the_delegable_operators():
    """Eager float64 SGD steps of TinyBlockNet with and without them: the same weights."""
    torch.manual_seed(7)
    plain = TinyBlockNet().double()
    routed = TinyBlockNet().double()
    routed.load_state_dict(plain.state_dict())
    mask = label_mask([0, 2, 3, 4], 5).double()
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        x = torch.randn(4, 2, 7, 7, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=g)
        for model, delegable in ((plain, False), (routed, True)):
            model.zero_grad()
            if delegable:
                with delegable_training(model):
                    loss = masked_cross_entropy(model(x), y, mask)
            else:
                loss = masked_cross_entropy(model(x), y, mask)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    for (name, want), (_, got) in zip(
        plain.named_parameters(), routed.named_parameters(), strict=True
    ):
        assert torch.allclose(got, want, atol=1e-12), name


@pytest.mark.slow
def test_a_plain_conv_lowered_with_xnnpack_is_refused_naming_the_frozen_weight(tmp_path):
    from exporter.executorch_backend import joint_program, lower_training_program

    model = TinyConvNet()
    program = joint_program(model, tiny_batches(1)[0])  # written the wrong way: nn.Conv2d kept
    with pytest.raises(FrozenWeightsError, match=r"model\.conv\.weight \(XnnpackBackend\)"):
        lower_training_program(program, tmp_path / "train.pte", Kernels.xnnpack)
    assert not (tmp_path / "train.pte").exists()


@pytest.mark.slow
@pytest.mark.parametrize("net", [TinyConvNet, TinyBlockNet])
def test_the_xnnpack_program_trains_like_eager_pytorch(tmp_path, net):
    from exporter.executorch_backend import ExecuTorchTrainer, export_training_program

    settings = OptimizerSettings()
    torch.manual_seed(4)
    model = net()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = tiny_batches(10)
    export_training_program(model, data[0], tmp_path / "train.pte", Kernels.xnnpack)
    trainer = ExecuTorchTrainer(tmp_path / "train.pte", list(start), settings)
    trainer.load_weights(start, data[0])
    losses = [trainer.step(batch, 0.05)[0] for batch in data]
    model.load_state_dict(start, strict=False)  # parameters; sBN buffers are not trained
    ref_losses, ref_params = reference_steps(model, data, 0.05, settings)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) < 1e-5
    got = trainer.weights()
    assert max(float((got[n] - ref_params[n]).abs().max()) for n in start) < 1e-5


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_onnx_convolution_backward_matches_autograd(kernel, stride, padding):
    from exporter.onnx_backend import _convolution_backward

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g, requires_grad=True)
    weight = torch.randn(5, 4, kernel, kernel, generator=g, requires_grad=True)
    out = F.conv2d(x, weight, None, stride, padding)
    grad_out = torch.randn(out.shape, generator=g)
    want_x, want_w = torch.autograd.grad(out, (x, weight), grad_out)
    got_x, got_w, _ = _convolution_backward(
        grad_out,
        x.detach(),
        weight.detach(),
        None,
        [stride] * 2,
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        1,
        [True, True, False],
    )
    assert torch.allclose(got_x, want_x, atol=1e-5)
    assert torch.allclose(got_w, want_w, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 2, 5, 4)])
def test_onnx_max_pool_decomposition_matches_pytorch_ties_included(shape):
    """Values, indices (the first maximum of each window) and the gradient, exactly."""
    from exporter.onnx_backend import _max_pool_backward, _max_pool_with_indices

    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, shape, generator=g).float()  # three values: ties in most windows
    want_out, want_index = F.max_pool2d_with_indices(x, 2)
    got_out, got_index = _max_pool_with_indices(x, [2, 2], [2, 2])
    assert torch.equal(got_out, want_out) and torch.equal(got_index, want_index)
    grad_out = torch.randn(want_out.shape, generator=g)
    leaf = x.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(F.max_pool2d(leaf, 2), leaf, grad_out)
    got_grad = _max_pool_backward(grad_out, x, [2, 2], [2, 2], [0, 0], [1, 1], False, want_index)
    assert torch.equal(got_grad, want_grad)
    # Any other pooling keeps onnxruntime's MaxPool.
    assert _max_pool_with_indices(x, [3, 3], [2, 2]) is NotImplemented
    assert _max_pool_with_indices(x, [2, 2], [2, 2], 0, 1, True) is NotImplemented


@pytest.mark.slow
def test_the_xnnpack_program_leaves_no_convolution_norm_relu_or_pool_work_to_portable_kernels():
    from exporter.executorch_backend import joint_program, lower_with_xnnpack, portable_operators

    model = TinyBlockNet()
    with delegable_training(model):
        program = joint_program(model, tiny_batches(1)[0])
    left = portable_operators(lower_with_xnnpack(program))
    slow = ("slice_scatter", "batch_norm", "max_pool", "scatter_add", "le.", "convolution")
    assert not [name for name in left if any(word in name for word in slow)], left
