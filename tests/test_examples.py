"""The user project in examples/tiny_mlp: registered by entry point, checked, exported, trained."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from heterofl_edge.data import get_dataset, list_datasets
from heterofl_edge.models import get_architecture, list_models
from heterofl_edge.models.check import check_model
from heterofl_edge.partition import Split
from heterofl_edge.tasks import check_compatible, task_for
from heterofl_edge.training import LocalTrainingConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny_mlp"


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


@pytest.fixture
def blobs(tmp_path, example_on_path):
    from tiny_mlp.data import write_blobs

    write_blobs(tmp_path / "blobs", train=400, test=100)
    return tmp_path / "blobs"


def test_the_example_is_installed_through_its_entry_points(tmp_path, monkeypatch, blobs):
    # What pip writes for the example's pyproject.toml: a dist-info folder with its entry points.
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = tmp_path / "site" / "heterofl_tiny_mlp-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: 0.1.0\n"
    )
    groups = [
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
        for group, points in project["entry-points"].items()
    ]
    (info / "entry_points.txt").write_text("\n".join(groups))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert "tiny-mlp" in list_models() and "tiny-blobs" in list_datasets()
    arch = get_architecture("tiny-mlp")
    assert arch.source == "entry point (heterofl-tiny-mlp)"
    data = get_dataset("tiny-blobs", blobs)
    check_compatible(arch, data)


def test_the_example_model_passes_the_core_checks(example_on_path):
    results = check_model(get_architecture("tiny_mlp.model:build"))
    assert all(r.ok for r in results), results


def test_the_example_data_splits_and_trains(blobs):
    arch = get_architecture("tiny_mlp.model:build")
    data = get_dataset("tiny_mlp.data:load", blobs)
    check_compatible(arch, data)
    task = task_for(arch)
    split = task.split(data, num_clients=4, split=Split.non_iid, seed=0)
    assert all(len(labels) <= 2 for labels in split.train.labels)
    torch.manual_seed(0)
    model = arch.build(0.5, 0.5)
    before = task.evaluate(model, data.test_x, data.test_y)
    config = LocalTrainingConfig(epochs=2, batch_size=20)
    task.train_local(model, data.train_x, data.train_y, 0.05, config)
    after = task.evaluate(model, data.test_x, data.test_y)
    assert after.loss < before.loss and after.accuracy > 0.5, (before, after)
    assert np.isclose(task.metric_of(after), after.accuracy)


@pytest.mark.slow
def test_the_example_model_passes_models_check_and_exports(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)])}
    out = subprocess.run(
        [sys.executable, "-m", "heterofl_edge", "models", "check", "tiny_mlp.model:build"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "ok    onnx" in out.stdout and "tiny_mlp.model:build works with HeteroFL" in out.stdout
    assert "labels(4) x width(32)" in out.stdout  # the classifier, found by inference
