"""The command line as a user runs it: exit codes and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "heterofl_edge", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_models_summary_prints_the_paper_columns():
    out = run("models", "summary", "--model", "conv")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["level", "rate", "parameters", "FLOPs", "space", "(MB)"]
    assert lines[3].split() == ["b", "0.5", "391.4", "K", "20.5", "M", "1.49"]


def test_models_summary_json_includes_extra_rates():
    out = run("models", "summary", "--model", "resnet18", "--rate", "0.3", "--json")
    rows = json.loads(out.stdout)
    assert [r["level"] for r in rows] == ["a", "b", "c", "d", "e", "0.3"]
    assert rows[4]["parameters"] == 38350


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["models", "summary", "--model", "vgg"], "unknown model 'vgg'"),
        (["export", "--model", "nope:nope"], "cannot import 'nope'"),
        (["data", "check", "--data", "cifar"], "unknown data set 'cifar'"),
        (["models", "summary", "--rate", "0"], "rate '0' is outside (0, 1]"),
        (["models", "summary", "--rate", "1.5"], "rate '1.5' is outside (0, 1]"),
        (["simulate", "--mode", "a-x"], "bad level 'x' in mode 'a-x'"),
        (["simulate", "--mode", "a2-b"], "gives weights to some levels only"),
        (
            ["simulate", "--data-dir", "/nonexistent/mnist"],
            "MNIST directory /nonexistent/mnist does not exist",
        ),
        (
            ["simulate", "--model", "resnet18", "--data-dir", "/nonexistent/images"],
            "image folder /nonexistent/images/train does not exist",
        ),
        (["simulate", "--model", "transformer", "--split", "non-iid"], "split IID only"),
        (["simulate", "--model", "conv", "--data", "wikitext2"], "data set 'wikitext2' is for"),
        (
            ["device", "--coordinator", "http://127.0.0.1:9", "--data", "cifar"],
            "unknown data 'cifar'",
        ),
        (
            [
                "device",
                "--coordinator",
                "http://127.0.0.1:9",
                "--data",
                "imagefolder",
                "--data-dir",
                "/nonexistent/images",
            ],
            "image folder /nonexistent/images/train does not exist",
        ),
        (["coordinator", "serve", "--data", "cifar"], "unknown data set 'cifar'"),
        (
            [
                "coordinator",
                "serve",
                "--state-dir",
                "/nonexistent/state",
                "--data",
                "wikitext2",
                "--data-dir",
                "/nonexistent",
            ],
            "data set 'wikitext2' is for language-model",
        ),
        (
            [
                "coordinator",
                "serve",
                "--state-dir",
                "/nonexistent/state",
                "--model",
                "transformer",
                "--data",
                "mnist",
            ],
            "data set 'mnist' is for classification",
        ),
        (["data", "export", "--out", "/proc/not-here", "--data", "cifar"], "unknown data set"),
    ],
)
def test_bad_input_gets_a_clear_error_and_exit_code_2(args, needle, tmp_path):
    out = run(*args)
    assert out.returncode == 2
    assert needle in " ".join(out.stderr.split())
    assert "Traceback" not in out.stderr


def test_corrupt_data_dir_is_reported_without_traceback(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    out = run("simulate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert "error: cannot read" in out.stderr and "hint:" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_data_check_verifies_md5s(mnist_dir):
    out = run("data", "check", "--data-dir", str(mnist_dir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": ok") == 4


@pytest.fixture
def without_extras(tmp_path):
    """An environment in which torch, flask and onnx are missing, as in a device install."""
    shim = tmp_path / "no-extras"
    for name in ("torch", "flask", "onnx"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'
        )
    path = [str(shim), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["export", "--level", "e"], "heterofl-edge export"),
        (["models", "summary"], "heterofl-edge models summary"),
        (["coordinator", "serve", "--state-dir", "x"], "heterofl-edge coordinator serve"),
        (["simulate"], "heterofl-edge simulate"),
    ],
)
def test_a_command_needing_a_missing_extra_says_which_in_one_line(args, command, without_extras):
    out = run(*args, env=without_extras)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"error: '{command}' needs the 'server' extra: pip install 'heterofl-edge[server]'"
    ]


def test_the_device_command_works_without_extras(without_extras):
    out = run("device", "--help", env=without_extras)
    assert out.returncode == 0, out.stderr
    assert "--coordinator" in out.stdout


def test_the_coordinator_takes_the_papers_settings_for_its_model_unless_given(
    monkeypatch, tmp_path
):
    from coordinator.config import CoordinatorConfig
    from heterofl_edge.cli.spec_options import spec_settings
    from heterofl_edge.errors import ConfigError

    def resolved(**flags):
        config = CoordinatorConfig(**spec_settings(None, **flags), state_dir=tmp_path)
        local = config.local_training
        return config.data_name, config.learning_rate, local.epochs, local.batch_size

    assert resolved(model="transformer") == ("wikitext2", 0.1, 1, 100)
    assert resolved(model="conv") == ("mnist", 0.01, 5, 10)
    assert resolved(model="resnet18", data="imagefolder", lr=0.05, local_epochs=1) == (
        "imagefolder",
        0.05,
        1,
        10,
    )
    monkeypatch.syspath_prepend(str(REPO / "examples" / "tiny_mlp"))
    with pytest.raises(ConfigError, match="data set 'mnist' is for classification"):
        resolved(model="transformer", data="mnist")
    with pytest.raises(ConfigError, match="no default data set"):  # a user's model
        resolved(model="tiny_mlp.model:build")
