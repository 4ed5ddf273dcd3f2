"""Export -> load -> train -> compare with eager PyTorch, as a device would use the artifacts."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from exporter.config import ExportConfig, Format, Kernels
from exporter.errors import ExportError
from exporter.pipeline import export_level
from exporter.step import OptimizerSettings, reference_steps
from heterofl_edge.loss import label_mask
from heterofl_edge.models import build_model, get_architecture
from heterofl_edge.slicing import shapes_at

pytestmark = pytest.mark.slow
SETTINGS = OptimizerSettings()


def batches(sizes, classes=10, seed=5):
    g = torch.Generator().manual_seed(seed)
    mask = label_mask([0, 2, 3, 4, 5, 6, 8, 9], classes)  # a non-IID client without labels 1 and 7
    allowed = torch.tensor([0, 2, 3, 4, 5, 6, 8, 9])
    return [
        (
            torch.randn(b, 1, 28, 28, generator=g),
            allowed[torch.randint(0, 8, (b,), generator=g)],
            mask,
        )
        for b in sizes
    ]


def eager(rate, start, data, lr=0.05):
    model = build_model("conv", rate)
    model.load_state_dict(start, strict=False)
    return reference_steps(model, data, lr, SETTINGS)


def onnx_train(folder, manifest, start, data, lr=0.05):
    import onnxruntime as ort

    program = manifest["programs"]["onnx"]["train_step"]
    session = ort.InferenceSession(str(folder / program["file"]))
    names = [p["name"] for p in manifest["parameters"]]
    params = {n: start[n].numpy() for n in names}
    momenta = {n: np.zeros_like(v) for n, v in params.items()}
    losses = []
    for x, y, mask in data:
        feeds = {f"param.{n}": params[n] for n in names}
        feeds |= {f"momentum.{n}": momenta[n] for n in names}
        feeds |= {
            "x": x.numpy(),
            "y": y.numpy(),
            "label_mask": mask.numpy(),
            "lr": np.array(lr, np.float32),
        }
        outputs = dict(
            zip([o["name"] for o in program["outputs"]], session.run(None, feeds), strict=True)
        )
        params = {n: outputs[f"updated.param.{n}"] for n in names}
        momenta = {n: outputs[f"updated.momentum.{n}"] for n in names}
        losses.append(float(outputs["loss"]))
    return losses, params


@pytest.fixture(scope="module")
def conv_e(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    return export_level(ExportConfig(model="conv", rate=0.0625), out)


def test_manifest_describes_the_level_and_its_files(conv_e):
    manifest = json.loads((conv_e / "manifest.json").read_text())
    assert manifest["model"] == "conv" and manifest["level"] == "e" and manifest["rate"] == 0.0625
    shapes = shapes_at(get_architecture("conv").spec, 0.0625)
    assert [(p["name"], tuple(p["shape"])) for p in manifest["parameters"]] == [
        (n, shapes[n]) for n in shapes if not n.endswith(("running_mean", "running_var"))
    ]
    assert manifest["parameter_count"] == 6594
    for name, meta in manifest["files"].items():
        payload = (conv_e / name).read_bytes()
        assert (
            hashlib.sha256(payload).hexdigest() == meta["sha256"] and len(payload) == meta["bytes"]
        )
    assert set(manifest["programs"]) == {"onnx", "executorch"}
    train = manifest["programs"]["executorch"]["train"]
    assert train["kernels"] == "xnnpack" and train["backends"] == ["XnnpackBackend"]
    assert manifest["hyperparameters"]["momentum"] == 0.9
    assert manifest["hyperparameters"]["weight_decay"] == 5e-4
    for results in manifest["verification"]["results"].values():
        assert all(v <= results["bound"] for k, v in results.items() if k.endswith("diff"))


def test_onnx_ten_steps_match_eager_including_a_short_last_batch(conv_e):
    manifest = json.loads((conv_e / "manifest.json").read_text())
    torch.manual_seed(11)
    start = build_model("conv", 0.0625).state_dict()
    data = batches([10] * 9 + [4])
    ref_losses, ref_params = eager(0.0625, start, data)
    losses, params = onnx_train(conv_e, manifest, start, data)
    assert np.allclose(losses, ref_losses, atol=1e-5)
    worst = max(float(np.abs(params[n] - ref_params[n].numpy()).max()) for n in params)
    assert worst < 1e-4


def test_label_mask_removes_the_masked_labels_gradient(conv_e):
    manifest = json.loads((conv_e / "manifest.json").read_text())
    torch.manual_seed(12)
    start = build_model("conv", 0.0625).state_dict()
    data = batches([10])
    _, params = onnx_train(conv_e, manifest, start, data, lr=0.1)
    old = start["classifier.weight"].numpy()
    decay_only = (
        old - 0.1 * SETTINGS.weight_decay * old
    )  # first step: momentum buffer = gradient + decay
    new = params["classifier.weight"]
    assert np.allclose(new[[1, 7]], decay_only[[1, 7]], atol=1e-7)  # masked rows: no loss gradient
    assert not np.allclose(new[[0, 2]], decay_only[[0, 2]], atol=1e-4)  # held labels do learn
    _, unmasked = onnx_train(
        conv_e, manifest, start, [(data[0][0], data[0][1], torch.ones(10))], lr=0.1
    )
    assert not np.allclose(unmasked["classifier.weight"][[1, 7]], decay_only[[1, 7]], atol=1e-4)


def test_executorch_ten_steps_match_eager(conv_e):
    from exporter.executorch_backend import ExecuTorchTrainer

    names = [n for n, _ in build_model("conv", 0.0625).named_parameters()]
    torch.manual_seed(13)
    start = build_model("conv", 0.0625).state_dict()
    data = batches([10] * 10)
    trainer = ExecuTorchTrainer(conv_e / "executorch" / "train.pte", names, SETTINGS)
    trainer.load_weights(start, data[0])
    losses = [trainer.step(b, 0.05)[0] for b in data]
    ref_losses, ref_params = eager(0.0625, start, data)
    assert np.allclose(losses, ref_losses, atol=1e-5)
    got = trainer.weights()
    assert max(float((got[n] - ref_params[n]).abs().max()) for n in names) < 1e-4
    # Weights load in place: a second round starts from new weights, not the trained ones.
    trainer.load_weights(start, data[0])
    assert torch.equal(trainer.weights()["classifier.bias"], start["classifier.bias"])


def test_reexport_gives_identical_files(conv_e, tmp_path):
    # Verification reads the files and changes none of them: the second export skips it.
    again = export_level(ExportConfig(model="conv", rate=0.0625, verify=False), tmp_path)
    first = json.loads((conv_e / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    assert first == second


@pytest.mark.parametrize(
    ("model", "rate"),
    [("conv", 0.25), pytest.param("resnet18", 0.0625, marks=pytest.mark.heavy)],
)
def test_other_levels_export_and_verify_in_both_formats(model, rate, tmp_path):
    # The portable ExecuTorch path here (conv e above and the tiny models of
    # test_fast_training_programs cover XNNPACK): its export is 35 s shorter per level.
    config = ExportConfig(model=model, rate=rate, executorch_kernels=Kernels.portable)
    folder = export_level(config, tmp_path)
    results = json.loads((folder / "manifest.json").read_text())["verification"]["results"]
    assert set(results) == {"onnx", "executorch"}
    for result in results.values():
        weight_diff = next(v for k, v in result.items() if k.endswith("max_weight_diff"))
        assert weight_diff <= 1e-4  # well-conditioned models meet the plain tolerance


def test_a_backend_failure_is_a_clear_error_and_leaves_no_files(tmp_path, monkeypatch):
    import exporter.executorch_backend as executorch_backend
    import exporter.onnx_backend as onnx_backend

    written = []

    def onnx_files(function, args, inputs, outputs, batch_inputs, max_batch, path):
        path.write_bytes(b"an ONNX program")  # as fast as a stand-in can be
        written.append(path)
        return True

    def unsupported(*args, **kwargs):
        raise RuntimeError("Missing out variants: {'aten::some_op'}")

    monkeypatch.setattr(onnx_backend, "export_onnx_program", onnx_files)
    monkeypatch.setattr(executorch_backend, "export_training_program", unsupported)
    with pytest.raises(ExportError, match="executorch cannot export conv at level e"):
        export_level(
            ExportConfig(model="conv", rate=0.0625, formats=(Format.all,), verify=False), tmp_path
        )
    assert len(written) == 3  # the ONNX programs were written before ExecuTorch failed
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write to output folder"):
        export_level(ExportConfig(model="conv", rate=0.0625), blocker / "out")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--level", "f"], "unknown level 'f'"),
        (["--rate", "0"], "rate 0.0 is outside (0, 1]"),
        (["--rate", "1.5"], "rate 1.5 is outside (0, 1]"),
        (["--format", "tflite"], "unknown format 'tflite'"),
        (["--executorch-kernels", "vulkan"], "unknown ExecuTorch kernels 'vulkan'"),
    ],
)
def test_export_cli_rejects_bad_input(args, needle, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "heterofl_edge",
            "export",
            "--model",
            "conv",
            *args,
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert needle in " ".join(out.stderr.split())
    assert list(tmp_path.iterdir()) == []
