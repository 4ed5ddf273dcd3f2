"""`simulate` beyond conv on MNIST: the transformer, resnet18 and a user's own model."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from image_helpers import write_mnist_as_images
from safetensors.torch import load_file

from heterofl_edge.errors import ConfigError
from heterofl_edge.simulation import (
    Execution,
    SimulationConfig,
    Split,
    load_data,
    local_training,
    run_simulation,
)
from heterofl_edge.training import LocalTrainingConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny_mlp"


def test_each_built_in_gets_the_papers_settings_and_data():
    transformer = SimulationConfig(model="transformer")
    assert transformer.data_name == "wikitext2" and transformer.metric == "perplexity"
    assert (transformer.learning_rate, transformer.total_rounds) == (0.1, 100)
    assert transformer.lr_milestones == (25, 50)
    assert (transformer.local_training.epochs, transformer.local_training.batch_size) == (1, 100)
    resnet = SimulationConfig(model="resnet18", split=Split.non_iid)
    assert (resnet.data_name, resnet.learning_rate) == ("imagefolder", 0.1)
    assert resnet.total_rounds == 800
    conv = SimulationConfig()
    assert (conv.data_name, conv.learning_rate, conv.total_rounds) == ("mnist", 0.01, 200)
    assert conv.to_json()["local"]["batch_size"] == 10 and conv.metric == "accuracy"
    assert local_training("transformer", epochs=2).batch_size == 100


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"model": "transformer", "split": Split.non_iid}, "split IID only"),
        ({"model": "conv", "data": "wikitext2"}, "data set 'wikitext2' is for language-model"),
        ({"model": "transformer", "data": "mnist"}, "data set 'mnist' is for classification"),
    ],
)
def test_settings_a_model_cannot_run_are_refused_before_any_data_is_read(settings, needle):
    with pytest.raises(ConfigError, match=needle):
        SimulationConfig(**settings)


@pytest.mark.slow
def test_a_short_transformer_run_on_wikitext2_lowers_perplexity(wikitext2):
    # Paper settings (lr 0.1, E 1, masked LM) on 80 rows of 64 tokens, B 10 for speed.
    config = SimulationConfig(
        model="transformer",
        mode="d1-e1",
        rounds=2,
        num_clients=2,
        fraction=1.0,
        local=LocalTrainingConfig(epochs=1, batch_size=10),
        train_examples=80,
        test_examples=40,
    )
    result = run_simulation(config, wikitext2, execution=Execution(workers=1))
    first, last = result.rounds[0], result.rounds[-1]
    assert first.levels == {"d": 1, "e": 1}
    assert result.initial_perplexity is not None and first.global_perplexity is not None
    assert last.global_perplexity is not None
    assert last.global_perplexity < 0.9 * first.global_perplexity < result.initial_perplexity
    assert first.seconds["statistics"] < 0.1  # no sBN layers: no statistics pass
    assert last.local_accuracy is None  # IID


@pytest.mark.slow
def test_resnet18_trains_on_an_image_folder(mnist_dir, tmp_path):
    write_mnist_as_images(mnist_dir, tmp_path / "digits", train=600, test=200)
    config = SimulationConfig(
        model="resnet18",
        mode="d1-e1",
        rounds=2,
        num_clients=2,
        fraction=1.0,
        local=LocalTrainingConfig(epochs=1, batch_size=10),  # lr 0.1 (paper)
    )
    data = load_data(config, tmp_path / "digits")  # the image folder, sized for resnet18
    assert tuple(data.train_x.shape) == (600, 3, 32, 32) and data.num_classes == 10
    grey = load_data(replace(config, model="conv", data="imagefolder"), tmp_path / "digits")
    assert tuple(grey.train_x.shape) == (600, 1, 28, 28)  # read at conv's input size
    result = run_simulation(config, data, execution=Execution(workers=1))
    first, last = result.rounds[0], result.rounds[-1]
    assert result.initial_accuracy < 0.2
    assert last.global_accuracy > 0.3  # chance: 0.1
    assert last.global_loss < first.global_loss
    assert first.seconds["statistics"] > 0  # sBN statistics gathered


@pytest.mark.slow
def test_a_users_model_and_data_run_from_the_command_line_on_two_workers(tmp_path, monkeypatch):
    """examples/tiny_mlp by package.module references, non-IID, two worker processes: the
    same model bits as one session after another in this process."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from tiny_mlp.data import write_blobs

    write_blobs(tmp_path / "blobs", train=400, test=200)
    command = [sys.executable, "-m", "heterofl_edge", "simulate"]
    command += ["--model", "tiny_mlp.model:build", "--data", "tiny_mlp.data:load"]
    command += ["--data-dir", str(tmp_path / "blobs"), "--split", "non-iid", "--lr", "0.05"]
    command += ["--mode", "a-e", "--clients", "4", "--fraction", "1", "--rounds", "2"]
    command += ["--local-epochs", "1", "--batch-size", "20", "--workers", "2"]
    command += ["--accelerator", "cpu", "--out", str(tmp_path / "run")]
    # Run from the project's folder, as a user would: references are imported from there.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(command, cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["config"]["data"] == "tiny_mlp.data:load"
    assert report["rounds"][-1]["local_accuracy"] > 0.5  # each client's two labels

    config = SimulationConfig(
        model="tiny_mlp.model:build",
        data="tiny_mlp.data:load",
        mode="a-e",
        split=Split.non_iid,
        rounds=2,
        num_clients=4,
        fraction=1.0,
        lr=0.05,
        local=LocalTrainingConfig(epochs=1, batch_size=20),
    )
    inline = run_simulation(
        config, load_data(config, tmp_path / "blobs"), execution=Execution(workers=1)
    )
    pooled = load_file(tmp_path / "run" / "model.safetensors")
    assert set(pooled) == set(inline.global_state)
    for name, tensor in inline.global_state.items():
        assert torch.equal(pooled[name], tensor), name
    assert [r["global_accuracy"] for r in report["rounds"]] == [
        r.global_accuracy for r in inline.rounds
    ]


def test_a_users_model_resumes_from_its_journal_to_the_same_bits(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from tiny_mlp.data import write_blobs

    write_blobs(tmp_path / "blobs", train=200, test=100)
    config = SimulationConfig(
        model="tiny_mlp.model:build",
        data="tiny_mlp.data:load",
        mode="a-e",
        rounds=3,
        num_clients=4,
        fraction=0.5,
        lr=0.05,
        local=LocalTrainingConfig(epochs=1, batch_size=20),
    )
    data = load_data(config, tmp_path / "blobs")
    one = Execution(workers=1)
    journal = tmp_path / "run" / "journal"
    run_simulation(replace(config, rounds=1), data, execution=one, journal_dir=journal)
    resumed = run_simulation(config, data, execution=one, journal_dir=journal, resume=True)
    uninterrupted = run_simulation(config, data, execution=one)
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    for name, tensor in uninterrupted.global_state.items():
        assert torch.equal(resumed.global_state[name], tensor), name
