import torch

from heterofl_edge.bn_stats import (
    ChannelMoments,
    apply_statistics,
    collect_moments,
    combine_moments,
)
from heterofl_edge.loss import label_mask, masked_cross_entropy
from heterofl_edge.models import build_model


def test_combining_client_statistics_equals_one_central_pass_over_the_same_batches():
    torch.manual_seed(0)
    model = build_model("conv", 0.125)
    data = [
        torch.randn(n, 1, 28, 28) * s + m
        for n, s, m in ((7, 1.0, 0.0), (20, 2.0, 1.0), (3, 0.5, -2.0))
    ]
    per_client = [collect_moments(model, [x]) for x in data]
    combined = combine_moments(per_client)
    central = collect_moments(model, data)
    assert set(combined) == {f"blocks.{i}.norm" for i in range(4)}
    for layer, moments in central.items():
        assert combined[layer].count == moments.count
        assert torch.allclose(combined[layer].mean, moments.mean, atol=1e-5)
        assert torch.allclose(combined[layer].var, moments.var, rtol=1e-4, atol=1e-6)


def test_hand_worked_merge():
    a = ChannelMoments(2, torch.tensor([1.0]), torch.tensor([1.0]))  # values 0, 2
    b = ChannelMoments(2, torch.tensor([5.0]), torch.tensor([1.0]))  # values 4, 6
    merged = combine_moments([{"n": a}, {"n": b}])["n"]
    assert merged.count == 4
    assert merged.mean.item() == 3.0 and merged.var.item() == 5.0  # var of 0, 2, 4, 6


def test_applied_statistics_drive_evaluation():
    model = build_model("conv", 0.0625)
    x = torch.randn(16, 1, 28, 28)
    stats = collect_moments(model, [x])
    state = apply_statistics(model.state_dict(), stats)
    assert torch.equal(state["blocks.0.norm.running_mean"], stats["blocks.0.norm"].mean)
    model.load_state_dict(state)
    # With the batch's own statistics, eval mode reproduces training mode's output.
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    assert torch.allclose(train_out, eval_out, atol=1e-3)


def test_mask_of_ones_is_plain_cross_entropy_and_mask_removes_absent_labels():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, requires_grad=True)
    target = torch.tensor([1, 3, 1, 3, 3, 1])
    plain = torch.nn.functional.cross_entropy(logits, target)
    assert torch.equal(masked_cross_entropy(logits, target, torch.ones(10)), plain)
    mask = label_mask([1, 3], 10)
    masked_cross_entropy(logits, target, mask).backward()
    grad = logits.grad
    assert (
        torch.count_nonzero(grad[:, [0, 2, 4, 5, 6, 7, 8, 9]]) == 0
    )  # absent labels get no gradient
    assert torch.count_nonzero(grad[:, [1, 3]]) == 12


def test_the_simulations_statistics_pass_is_exact_to_float32(mnist):
    """The statistics sessions equal a float64 reference over whole batches of 500.

    Guards against a fast path that accumulates batch moments in float32 (PyTorch's
    channels-last CPU batch norm does: 3e-4 off in the first layer's variance).
    """
    import numpy as np

    from heterofl_edge.models import get_architecture
    from heterofl_edge.models.layers import Scaler, StaticBatchNorm2d
    from heterofl_edge.sessions import ClientArrays, StatsJob, run_statistics

    arch = get_architecture("conv")
    torch.manual_seed(0)
    model = arch.build(1.0, 1.0)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    images = mnist.train_images[:1000].numpy()
    job = StatsJob("conv", 1.0, state, ("0",), (np.arange(1000),))
    [(_, report)] = run_statistics(job, ClientArrays(images, mnist.train_labels[:1000].numpy()))

    inputs: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, StaticBatchNorm2d):
            module.register_forward_hook(
                lambda m, i, o, name=name: inputs.setdefault(name, []).append(i[0].double())
            )
    model.train()
    for module in model.modules():
        if isinstance(module, Scaler):
            module.eval()
    with torch.no_grad():
        for start in (0, 500):
            model(torch.from_numpy(images[start : start + 500]))
    for name, parts in inputs.items():
        values = torch.cat(parts).transpose(0, 1).reshape(parts[0].shape[1], -1)
        count, mean, var = report[name]
        assert count % 1000 == 0  # examples, or positions (examples x height x width)
        assert np.abs(mean - values.mean(1).numpy()).max() < 1e-6
        assert np.abs(var - values.var(1, unbiased=False).numpy()).max() < 1e-6
