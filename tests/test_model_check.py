"""``models check``: the core checks on good and broken models, and the command's exit codes."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from heterofl_edge.levels import scaled_width
from heterofl_edge.models import Architecture, ModelInterface, Scaler, get_architecture
from heterofl_edge.models.check import check_model
from heterofl_edge.models.conv import ConvNet, conv_spec
from heterofl_edge.slicing import Dim, TensorRule


def by_name(results):
    return {r.name: r for r in results}


def test_conv_passes_every_core_check():
    results = by_name(check_model(get_architecture("conv")))
    assert [r.ok for r in results.values()] == [True] * 4, results
    assert "hand-written spec equals the one inferred" in results["spec"].detail
    assert "4 sBN layers" in results["sBN"].detail


@pytest.mark.slow
def test_transformer_passes_every_core_check():
    results = check_model(get_architecture("transformer"))
    assert all(r.ok for r in results), results


def test_a_wrong_hand_written_spec_is_caught():
    spec = dict(conv_spec())
    spec["classifier.bias"] = TensorRule((Dim.fixed(10),))  # should follow the label split
    arch = Architecture(
        "bad-conv", "conv with a wrong spec", ConvNet, spec, (1, 28, 28), torch.float32, 10
    )
    results = by_name(check_model(arch, rates=(1.0, 0.0625)))
    assert not results["spec"].ok and "classifier.bias" in results["spec"].detail


class WithBatchNorm(nn.Module):
    def __init__(self, rate: float = 1.0) -> None:
        super().__init__()
        self.heterofl_interface = ModelInterface((3, 8, 8), 4)
        width = scaled_width(16, rate)
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.scaler = Scaler(rate)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.scaler(self.conv(x)))).mean(dim=(2, 3)))


def test_torch_batch_norm_is_refused_in_favour_of_sbn(monkeypatch):
    monkeypatch.setitem(sys.modules, "check_models", sys.modules[__name__])
    results = by_name(check_model(get_architecture("check_models:WithBatchNorm")))
    assert results["sub-models"].ok and results["aggregation"].ok
    assert not results["sBN"].ok
    assert "'norm' is a torch.nn batch norm" in results["sBN"].detail
    assert "StaticBatchNorm2d" in results["sBN"].hint


BROKEN = textwrap.dedent(
    """
    import math
    from torch import nn
    from heterofl_edge.models import ModelInterface

    class Floors(nn.Module):
        def __init__(self, rate=1.0):
            super().__init__()
            self.heterofl_interface = ModelInterface((5,), 2)
            self.fc = nn.Linear(5, max(1, math.floor(rate * 40)))
            self.out = nn.Linear(max(1, math.floor(rate * 40)), 2)

        def forward(self, x):
            return self.out(self.fc(x))
    """
)


def test_the_command_refuses_an_unsliceable_model_in_one_line(tmp_path):
    (tmp_path / "broken_models.py").write_text(BROKEN)
    out = subprocess.run(
        [sys.executable, "-m", "heterofl_edge", "models", "check", "broken_models:Floors"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the user's module is in the current folder
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=600,
    )
    assert out.returncode == 2, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error and "dimension 0 of 'fc.weight'" in error[0]
    assert "follows no slicing rule" in error[0]
    assert "hint: compute every hidden size" in out.stderr
    assert "Traceback" not in out.stderr
