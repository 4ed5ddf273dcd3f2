"""Tasks: classification as before, the masked language model on real WikiText-2."""

import numpy as np
import pytest
import torch

from heterofl_edge.device_runtime import TrainingRequest
from heterofl_edge.errors import ConfigError
from heterofl_edge.loss import label_mask
from heterofl_edge.masking import TokenMasker
from heterofl_edge.models import get_architecture
from heterofl_edge.partition import Split
from heterofl_edge.tasks import (
    IGNORE_INDEX,
    ClassificationTask,
    LanguageModelTask,
    ScoredPositions,
    check_compatible,
    task_for,
)
from heterofl_edge.training import LocalTrainingConfig, train_local


def test_each_architecture_gets_its_task():
    assert isinstance(task_for(get_architecture("conv")), ClassificationTask)
    lm = task_for(get_architecture("transformer"))
    assert isinstance(lm, LanguageModelTask) and lm.num_tokens == 33279
    assert (lm.metric, lm.higher_is_better) == ("perplexity", False)


def test_masking_replaces_about_15_percent_and_scores_only_those():
    task = LanguageModelTask(num_tokens=50)
    rows = torch.randint(0, 50, (200, 64), generator=torch.Generator().manual_seed(0))
    batch = task.corrupt(rows, task.masker(1))
    masked = batch.inputs == 50
    assert 0.14 < masked.float().mean() < 0.16
    assert torch.equal(batch.targets[masked], rows[masked])
    assert (batch.targets[~masked] == IGNORE_INDEX).all() and batch.scored == int(masked.sum())
    everywhere = LanguageModelTask(50, positions=ScoredPositions.all)
    all_scored = everywhere.corrupt(rows, everywhere.masker(1))
    assert torch.equal(all_scored.inputs, batch.inputs) and torch.equal(all_scored.targets, rows)


def test_a_device_masks_the_same_tokens_as_the_simulation_from_the_same_seed():
    """Devices corrupt numpy rows with TokenMasker; the simulation corrupts torch rows."""
    task = LanguageModelTask(num_tokens=50)
    rows = torch.randint(0, 50, (2, 10, 64), generator=torch.Generator().manual_seed(0))
    simulation, device = task.masker(7), TokenMasker(50, 0.15, seed=7)
    for batch in rows:  # two consecutive batches of one session
        expected = task.corrupt(batch, simulation)
        found = device.corrupt(batch.numpy())
        assert np.array_equal(found.inputs, expected.inputs.numpy())
        assert np.array_equal(found.targets, expected.targets.numpy())
        assert found.scored == expected.scored
    other_seed = TokenMasker(50, 0.15, seed=8).hidden((10, 64))
    assert not np.array_equal(other_seed, TokenMasker(50, 0.15, seed=7).hidden((10, 64)))


def test_classification_task_is_the_existing_training(mnist):
    arch = get_architecture("conv")
    x, y = mnist.train_images[:40], mnist.train_labels[:40]
    config = LocalTrainingConfig(epochs=1, batch_size=10)
    results = []
    for train in (train_local, ClassificationTask().train_local):
        torch.manual_seed(0)
        model = arch.build(0.0625)
        results.append((train(model, x, y, 0.01, config, None, 3), model.state_dict()))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_the_language_model_is_split_iid_only(wikitext2):
    task = task_for(get_architecture("transformer"))
    with pytest.raises(ConfigError, match="IID only"):
        task.split(wikitext2, 100, Split.non_iid, seed=0)
    split = task.split(wikitext2, 100, Split.iid, seed=0, train_examples=2000)
    assert [len(i) for i in split.train.indices] == [20] * 100
    held = np.sort(np.concatenate(split.train.indices))
    assert held.tolist() == list(range(2000))  # every row once
    stretch = split.train.indices[7]
    assert np.array_equal(stretch, np.arange(stretch[0], stretch[0] + 20))  # consecutive text
    rows = wikitext2.train_x[torch.from_numpy(split.train_keep[stretch])]
    assert split.train.labels[7] == sorted(np.unique(rows.numpy()).tolist())
    assert len(split.test_keep) == len(wikitext2.test_x) and split.test is None


def test_short_transformer_training_on_wikitext2_lowers_the_loss(wikitext2):
    arch = get_architecture("transformer")
    task = task_for(arch)
    rows = wikitext2.train_x[:8]  # 512 tokens
    mask = label_mask(torch.unique(rows).tolist(), arch.num_classes)
    torch.manual_seed(0)
    model = arch.build(0.0625, 0.0625)  # level e as the global width: Scaler 1
    before = task.evaluate(model, rows, rows, mask)
    config = LocalTrainingConfig(epochs=3, batch_size=4)  # 6 steps, lr 0.1 (paper Table 6)
    result = task.train_local(model, rows, rows, 0.1, config, mask, seed=0)
    after = task.evaluate(model, rows, rows, mask)
    assert result.steps == 6 and result.num_examples == 8
    assert after.loss < before.loss - 0.2, (before, after)
    assert after.perplexity < before.perplexity


def test_a_model_and_data_of_different_tasks_are_refused(mnist):
    with pytest.raises(ConfigError, match="language-model model") as info:
        check_compatible(get_architecture("transformer"), mnist)
    assert "wikitext2" in info.value.hint


@pytest.mark.slow
def test_exported_training_step_skips_ignored_targets(tmp_path, artifact_cache):
    # A device trains the masked positions only by sending IGNORE_INDEX elsewhere.
    import onnxruntime as ort

    from exporter.step import OptimizerSettings, reference_steps

    artifact_cache(tmp_path, ("e",))  # conv e at global rate 1, as exported for devices
    folder = tmp_path / "artifacts" / "conv-e"
    session = ort.InferenceSession(str(folder / "onnx" / "train_step.onnx"))
    model = get_architecture("conv").build(0.0625)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, IGNORE_INDEX, 5, IGNORE_INDEX, 1, 0])
    feeds = {f"param.{n}": t.numpy() for n, t in start.items()}
    feeds |= {f"momentum.{n}": np.zeros_like(t.numpy()) for n, t in start.items()}
    feeds |= {"x": x.numpy(), "y": y.numpy(), "label_mask": np.ones(10, np.float32)}
    out = session.run(None, feeds | {"lr": np.array(0.05, np.float32)})
    losses, params = reference_steps(model, [(x, y, torch.ones(10))], 0.05, OptimizerSettings())
    assert abs(float(out[0]) - losses[0]) < 1e-5
    for got, name in zip(out[1 : 1 + len(start)], start, strict=True):
        assert np.abs(got - params[name].numpy()).max() < 1e-5


@pytest.mark.slow
def test_a_device_trains_the_language_model_as_the_simulation_does(
    tmp_path, wikitext2, artifact_cache
):
    """The ONNX device (numpy masks, the exported step) against LanguageModelTask.train_local."""
    from device_sim.onnx_backend import OnnxLevel

    artifact_cache(tmp_path, ("e",), global_rate=0.0625, model="transformer")
    level = OnnxLevel(tmp_path / "artifacts" / "transformer-e")
    settings = level.manifest["masked_language_model"]
    assert (settings["mask_token"], settings["mask_rate"]) == (33279, 0.15)
    model = get_architecture("transformer").build(0.0625, 0.0625)
    for module in model.modules():  # the exported programs train without dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    rows = wikitext2.train_x[:25]  # batches of 10, 10 and a short one of 5
    labels = sorted(np.unique(rows.numpy()).tolist())
    weights = {k: v.numpy() for k, v in start.items()}
    device = level.train(
        TrainingRequest(weights, rows.numpy(), rows.numpy(), labels, 0.1, 2, 10, 5)
    )
    simulated = LanguageModelTask(33279).train_local(
        model, rows, rows, 0.1, LocalTrainingConfig(epochs=2), label_mask(labels, 33279), seed=5
    )
    assert device.steps == simulated.steps == 6
    assert abs(device.loss - simulated.mean_loss) < 1e-4
    assert device.accuracy == simulated.accuracy
    worst = max(
        float(np.abs(device.weights[k] - v.detach().numpy()).max())
        for k, v in model.named_parameters()
    )
    moved = max(float((v.detach() - start[k]).abs().max()) for k, v in model.named_parameters())
    assert worst < 1e-5 < moved, (worst, moved)
