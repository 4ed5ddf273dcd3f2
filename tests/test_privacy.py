"""Client-level differential privacy for mixed widths: clipping, noise, accounting, budget."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from coordinator_helpers import (
    PROFILE,
    auth,
    constant_update,
    register,
    statistics_body,
    update_body,
)
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from heterofl_edge.bn_stats import ChannelMoments
from heterofl_edge.dp_noise import add_distributed_noise, holder_counts
from heterofl_edge.errors import ConfigError
from heterofl_edge.models import get_architecture
from heterofl_edge.privacy import (
    DpPlacement,
    DpSettings,
    PrivacyPlan,
    PrivateAggregator,
    RoundRelease,
    epsilon_of,
    noise_multiplier_for,
    noise_shape,
    private_statistics,
)
from heterofl_edge.slicing import extract_submodel_state, trainable_names

ARCH = get_architecture("conv")


def global_state(seed=0):
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in ARCH.build(1.0, 1.0).state_dict().items()}


def test_the_reported_epsilon_is_the_librarys_own_for_the_same_sampling_noise_and_rounds():
    """Five rounds: 10 of 100 clients sampled without replacement, statistics from them."""
    plan = PrivacyPlan(clip=1.0, delta=1e-5, statistics_clip=50.0, placement=DpPlacement.server,
                       total_rounds=5, noise_multiplier=1.3)  # fmt: skip
    for number in range(1, 6):
        assert plan.admit(number, 100, 10, "sampled") is None
        reported = plan.release(100, 10, "sampled")
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # Replace-one: a client's clipped contribution moves the sum by up to 2 C -> z / 2.
    round_event = dp_event.SampledWithoutReplacementDpEvent(
        100, 10, dp_event.GaussianDpEvent(1.3 / 2)
    )
    accountant.compose(dp_event.SelfComposedDpEvent(round_event, 10))  # updates + statistics
    assert reported["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert reported["epsilon"] == pytest.approx(plan.epsilon())

    every = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    every.compose(round_event, 3)
    every.compose(dp_event.GaussianDpEvent(1.3 / 2), 3)  # statistics from every live client
    assert epsilon_of([RoundRelease(100, 10, "all", 1.3)] * 3, 1e-5) == pytest.approx(
        every.get_epsilon(1e-5), rel=1e-9
    )


def test_a_target_epsilon_is_solved_over_the_planned_rounds_and_then_kept():
    planned = [RoundRelease(100, 10, "none", 1.0)] * 20
    z = noise_multiplier_for(8.0, planned, 1e-5)
    spent = epsilon_of([RoundRelease(100, 10, "none", z)] * 20, 1e-5)
    assert spent <= 8.0 and spent == pytest.approx(8.0, rel=1e-2)
    plan = PrivacyPlan(clip=1.0, delta=1e-5, statistics_clip=50.0, placement=DpPlacement.server,
                       total_rounds=20, target_epsilon=8.0)  # fmt: skip
    assert plan.admit(1, 100, 10, "none") is None
    assert plan.noise_multiplier == pytest.approx(z)
    with pytest.raises(ConfigError, match="no noise multiplier reaches epsilon"):
        noise_multiplier_for(1e-9, planned, 1e-5)


def test_a_round_over_the_budget_is_refused_before_it_runs():
    plan = PrivacyPlan(clip=1.0, delta=1e-5, statistics_clip=50.0, placement=DpPlacement.server,
                       total_rounds=100, noise_multiplier=2.0, max_epsilon=3.0)  # fmt: skip
    number = 1
    while (refusal := plan.admit(number, 100, 10, "sampled")) is None:
        plan.release(100, 10, "sampled")
        number += 1
    assert number > 1  # some rounds fit
    assert plan.epsilon() <= 3.0 < epsilon_of([*plan.releases, plan.releases[-1]], 1e-5)
    assert refusal.startswith(f"round {number} would spend epsilon")
    assert "over --dp-max-epsilon 3" in refusal


def test_clipping_bounds_each_clients_contribution_over_its_slice():
    before = global_state()
    settings = DpSettings(clip=0.5, noise_multiplier=0.0)
    aggregator = PrivateAggregator(before, ARCH.spec, 1.0, settings, torch.Generator())
    received = extract_submodel_state(before, ARCH.spec, 0.25)
    huge = {n: received[n] + 1000.0 for n in trainable_names(ARCH.spec)}
    aggregator.add(huge, 0.25)
    after = aggregator.finalize()
    moved = sum(float((after[n] - before[n]).double().square().sum()) for n in huge)
    assert math.sqrt(moved) == pytest.approx(0.5, rel=1e-5)  # C, not 1000 x sqrt(elements)
    assert aggregator.norms[0] > 1e5
    untouched = ARCH.spec["blocks.3.conv.weight"].dims[0].size(0.25)
    assert torch.equal(
        after["blocks.3.conv.weight"][untouched:], before["blocks.3.conv.weight"][untouched:]
    )


def test_the_noise_on_each_elements_sum_has_the_stated_scale():
    """Zero updates, z = 0.8, C = 1.5: every held element moves by N(0, (zC)^2) / k."""
    before = global_state()
    settings = DpSettings(clip=1.5, noise_multiplier=0.8)
    generator = torch.Generator().manual_seed(7)
    aggregator = PrivateAggregator(before, ARCH.spec, 1.0, settings, generator)
    names = trainable_names(ARCH.spec)
    for rate in (1.0, 0.0625):  # zero updates: a holds everything, e its slice (count 2)
        received = extract_submodel_state(before, ARCH.spec, rate)
        aggregator.add({n: received[n] for n in names}, rate)
    after = aggregator.finalize()
    once, twice = [], []
    for name in trainable_names(ARCH.spec):
        moved = (after[name].double() - before[name].double()).flatten()
        counts = torch.zeros_like(before[name], dtype=torch.int32)
        counts[
            tuple(
                slice(0, s) for s in extract_submodel_state(before, ARCH.spec, 0.0625)[name].shape
            )
        ] = 1
        counts = counts.flatten()
        once.append(moved[counts == 0])
        twice.append(moved[counts == 1])
    once_all, twice_all = torch.cat(once), torch.cat(twice)
    sigma = 0.8 * 1.5
    for values, held in ((once_all, 1), (twice_all, 2)):
        n = values.numel()
        assert abs(float(values.mean())) < 5 * sigma / held / math.sqrt(n)
        assert float(values.std()) == pytest.approx(sigma / held, rel=5 / math.sqrt(n) + 0.01)


def test_private_statistics_are_clipped_and_weigh_each_report_once():
    reports = [
        {"layer": ChannelMoments(1000, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))},
        {"layer": ChannelMoments(1, torch.tensor([3.0, 0.0]), torch.tensor([1.0, 4.0]))},
    ]
    quiet = DpSettings(clip=1.0, noise_multiplier=0.0, statistics_clip=1e6)
    combined = private_statistics(reports, quiet, torch.Generator())["layer"]
    assert torch.allclose(combined.mean, torch.tensor([2.0, 1.0]))  # unweighted: counts unused
    # second moments: (1 + 1, 1 + 4) and (1 + 9, 4 + 0), averaged; var = second - mean^2
    assert torch.allclose(combined.var, torch.tensor([6.0 - 4.0, 4.5 - 1.0]))
    tight = DpSettings(clip=1.0, noise_multiplier=0.0, statistics_clip=1.0)
    bounded = private_statistics(reports[:1], tight, torch.Generator())["layer"]
    vector = torch.cat([bounded.mean, bounded.var + bounded.mean**2])
    assert float(vector.norm()) == pytest.approx(1.0, rel=1e-6)


def test_distributed_noise_shares_add_up_to_the_servers_noise():
    """Hand-worked holders for two widths; the variances of k shares sum to (zC)^2 / rho."""
    sizes = {"w": [[4, 2, 2], [3, 1, 1]], "b": [[4, 2, 2]], "head": [[-1, -1, -1]]}
    blocks = {"w": [1, 1], "b": [1], "head": [0]}
    counts = holder_counts({"w": (4, 3), "b": (4,), "head": (10,)}, sizes, blocks)
    assert counts["w"].tolist() == [[3, 1, 1], [3, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert counts["b"].tolist() == [3, 3, 1, 1]
    assert counts["head"].tolist() == [3] * 10
    heads = holder_counts({"q": (8,)}, {"q": [[2, 1]]}, {"q": [2]})  # 2 heads of 4: blocks
    assert heads["q"].tolist() == [2, 1, 0, 0, 2, 1, 0, 0]  # block sizes 2 and 1 per head
    rng = np.random.default_rng(0)
    zero = {"w": np.zeros((4, 3)), "b": np.zeros(4), "head": np.zeros(10)}
    draws = np.stack(
        [add_distributed_noise(zero, 2.0, 0.5, 0.8, sizes, blocks, rng)["w"] for _ in range(20000)]
    )
    variance = draws.var(axis=0)
    expected = (0.5 * 2.0) ** 2 / (0.8 * counts["w"])
    assert np.allclose(variance, expected, rtol=0.05)
    shape = noise_shape(ARCH.spec, [1.0, 0.0625])
    assert (
        shape.sizes["blocks.0.conv.weight"][0] == [64, 4]
        and shape.blocks["classifier.weight"][0] == 0
    )


def test_a_private_coordinator_keeps_no_labels_metrics_or_counts(make_app):
    from coordinator.config import CoordinatorConfig  # noqa: F401  (the config is the spec's)

    app = make_app(dp_clip=5.0, dp_noise_multiplier=1.0, rounds=2)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    assert all(t["private"] is True and t["distributed_noise"] is None for t in tasks)
    for token, task in zip(tokens, tasks, strict=True):
        body = update_body(constant_update(task["rate"], 0.0), list(range(10)))
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
    assert coordinator.settle()
    for token in tokens:
        stats = client.get("/v1/task", headers=auth(token)).json
        assert stats["action"] == "statistics" and stats["private"] and stats["expected_count"] == 1
        reply = client.post(stats["upload_url"], data=statistics_body(1, 0.5), headers=auth(token))
        assert reply.status_code == 200, reply.json
    assert coordinator.settle()
    (first, *_) = client.get("/v1/rounds").json["rounds"]
    assert first["state"] == "finished"
    assert all(a["metrics"] is None and a["num_samples"] is None for a in first["assignments"])
    assert first["metrics"]["train_loss"] is None and first["metrics"]["train_samples"] == 0
    privacy = client.get("/v1/health").json["privacy"]
    assert privacy["epsilon"] == pytest.approx(
        epsilon_of([RoundRelease(3, 3, "all", 1.0)], 1e-5)  # statistics from every live device
    )
    assert "heterofl_dp_epsilon " in client.get("/metrics").text
    assert PROFILE  # the devices registered with the shared test profile


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--dp-clip", "0", "--dp-noise-multiplier", "1"], "--dp-clip must be positive, got 0.0"),
        (
            ["--dp-clip", "1", "--dp-noise-multiplier", "-1"],
            "--dp-noise-multiplier must be 0 or positive",
        ),
        (
            ["--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-delta", "1"],
            "--dp-delta must lie in (0, 1)",
        ),
        (["--dp-noise-multiplier", "1"], "--dp-noise-multiplier needs --dp-clip"),
        (["--dp-clip", "1"], "needs --dp-noise-multiplier or --dp-target-epsilon"),
        (
            ["--dp-clip", "1", "--dp-target-epsilon", "1e-9", "--rounds", "5"],
            "no noise multiplier reaches epsilon 1e-09",
        ),
    ],
)
def test_bad_privacy_settings_are_one_line_errors_and_nothing_starts(tmp_path, flags, problem):
    out = subprocess.run(
        [sys.executable, "-m", "heterofl_edge", "simulate", "--data-dir", str(tmp_path / "none"),
         "--clients", "10", "--out", str(tmp_path / "out"), *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert problem in out.stderr.splitlines()[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
