"""Faster training programs: ExecuTorch on XNNPACK (convolutions as matmuls, weights never
frozen into a delegate) and the ONNX convolution weight gradient as matmuls."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.config import Kernels
from exporter.errors import FrozenWeightsError
from exporter.im2col import MatmulConv2d, conv2d_as_matmul, matmul_convolutions
from exporter.step import OptimizerSettings, reference_steps
from heterofl_edge.loss import label_mask


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, 1, 1)
        self.down = nn.Conv2d(3, 4, 1, 2, 0, bias=False)
        self.linear = nn.Linear(4, 5)

    def forward(self, x):
        return self.linear(F.relu(self.down(F.relu(self.conv(x)))).mean(dim=(2, 3)))


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


@pytest.mark.slow
def test_a_plain_conv_lowered_with_xnnpack_is_refused_naming_the_frozen_weight(tmp_path):
    from exporter.executorch_backend import joint_program, lower_training_program

    model = TinyConvNet()
    program = joint_program(model, tiny_batches(1)[0])  # written the wrong way: nn.Conv2d kept
    with pytest.raises(FrozenWeightsError, match=r"model\.conv\.weight \(XnnpackBackend\)"):
        lower_training_program(program, tmp_path / "train.pte", Kernels.xnnpack)
    assert not (tmp_path / "train.pte").exists()


@pytest.mark.slow
def test_the_xnnpack_program_trains_like_eager_pytorch(tmp_path):
    from exporter.executorch_backend import ExecuTorchTrainer, export_training_program

    settings = OptimizerSettings()
    torch.manual_seed(4)
    model = TinyConvNet()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = tiny_batches(10)
    export_training_program(model, data[0], tmp_path / "train.pte", Kernels.xnnpack)
    trainer = ExecuTorchTrainer(tmp_path / "train.pte", list(start), settings)
    trainer.load_weights(start, data[0])
    losses = [trainer.step(batch, 0.05)[0] for batch in data]
    model.load_state_dict(start)
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
