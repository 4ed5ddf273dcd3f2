"""Parallel, resumable and Ray-backed simulation: the same model bits whatever carries the work."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from heterofl_edge.backends import split_clients
from heterofl_edge.bn_stats import collect_moments, combine_moments, merge_moments
from heterofl_edge.errors import ConfigError
from heterofl_edge.models import get_architecture
from heterofl_edge.partition import federated_split
from heterofl_edge.sessions import session_threads
from heterofl_edge.simulation import (
    Backend,
    Execution,
    SimulationConfig,
    Split,
    StatisticsClients,
    Submodel,
    run_simulation,
)
from heterofl_edge.training import LocalTrainingConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small but real: MNIST subsets, levels a and e, every client reporting statistics.
TINY = SimulationConfig(
    mode="a-e",
    split=Split.iid,
    rounds=2,
    num_clients=6,
    fraction=0.5,
    local=LocalTrainingConfig(epochs=1),
    train_examples=720,
    test_examples=300,
    statistics=StatisticsClients.all,
    seed=5,
)


def assert_same_state(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_split_clients_makes_consecutive_runs_of_about_equal_size():
    assert split_clients([100] * 6, 2) == [range(0, 3), range(3, 6)]
    assert split_clients([100] * 5, 4) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert split_clients([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert split_clients([3], 4) == [range(0, 1)]


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_model_bits(mnist):
    inline = run_simulation(TINY, mnist, execution=Execution(workers=1))
    pooled = run_simulation(TINY, mnist, execution=Execution(workers=2))
    assert_same_state(inline.global_state, pooled.global_state)
    assert [r.global_accuracy for r in inline.rounds] == [r.global_accuracy for r in pooled.rounds]
    assert inline.rounds[-1].global_accuracy > 0.2  # it trained (chance: 0.1)


@pytest.mark.slow
def test_statistics_are_fresh_every_round_never_accumulated(mnist, tmp_path):
    """After round 2 the sBN statistics are those of one pass of the round-2 model over every
    client's data: not a running mixture with round 1's (Flower's HeteroFL baseline keeps
    accumulating them across rounds)."""
    config = replace(TINY, mode="a", fraction=0.34)
    one = Execution(workers=1)
    first = run_simulation(
        replace(config, rounds=1), mnist, execution=one, journal_dir=tmp_path / "run"
    )
    second = run_simulation(config, mnist, execution=one, journal_dir=tmp_path / "run", resume=True)
    arch = get_architecture("conv")
    split = federated_split(
        mnist.train_labels.numpy(),
        mnist.test_labels.numpy(),
        config.num_clients,
        config.split,
        10,
        config.seed,
        train_examples=config.train_examples,
        test_examples=config.test_examples,
    )
    # One pass over every client's examples, in batches of 500, with the same arithmetic
    # (one thread, the default memory format) as the simulation's statistics pass.
    images = mnist.train_images[torch.from_numpy(split.train_keep)].contiguous()
    model = arch.build(1.0, 1.0)
    model.load_state_dict(second.global_state)
    with session_threads(1):
        fresh = combine_moments(
            collect_moments(
                model,
                [images[idx][s : s + 500].contiguous() for s in range(0, len(idx), 500)],
            )
            for idx in (torch.from_numpy(i) for i in split.train.indices)
        )
    for layer, moments in fresh.items():
        mean = second.global_state[f"{layer}.running_mean"]
        var = second.global_state[f"{layer}.running_var"]
        assert torch.allclose(mean, moments.mean, rtol=1e-5, atol=1e-7), layer
        assert torch.allclose(var, moments.var, rtol=1e-5, atol=1e-7), layer
        # What accumulating across rounds would have given is far from it.
        before = first.global_state
        kept = merge_moments(
            replace(
                moments, mean=before[f"{layer}.running_mean"], var=before[f"{layer}.running_var"]
            ),
            moments,
        )
        assert not torch.allclose(var, kept.var, rtol=1e-2), layer


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_model_of_an_uninterrupted_run(mnist, mnist_dir, tmp_path):
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "heterofl_edge",
        "simulate",
        "--data-dir",
        str(mnist_dir),
        "--mode",
        TINY.mode,
        "--rounds",
        "3",
        "--clients",
        str(TINY.num_clients),
        "--fraction",
        str(TINY.fraction),
        "--local-epochs",
        "1",
        "--train-examples",
        str(TINY.train_examples),
        "--test-examples",
        str(TINY.test_examples),
        "--seed",
        str(TINY.seed),
        "--submodel",
        "rolling",
        "--workers",
        "1",
        "--accelerator",
        "cpu",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("round   1/3"):
                break
        process.send_signal(signal.SIGKILL)  # mid-way through round 2, in training or statistics
        process.wait(timeout=60)
    journal = json.loads((out / "journal" / "journal.json").read_text())
    assert journal["completed"] in (1, 2)
    assert not (out / "results.json").exists()
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, env=env, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = run_simulation(
        replace(TINY, rounds=3, submodel=Submodel.rolling), mnist, execution=Execution(workers=1)
    )
    assert_same_state(load_file(out / "model.safetensors"), uninterrupted.global_state)
    report = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert [r["global_accuracy"] for r in report["rounds"]] == [
        r.global_accuracy for r in uninterrupted.rounds
    ]


def test_a_journal_refuses_other_settings(mnist, tmp_path):
    config = replace(TINY, rounds=1, mode="e", statistics=StatisticsClients.round)
    run_simulation(config, mnist, journal_dir=tmp_path / "run", execution=Execution(workers=1))
    with pytest.raises(ConfigError, match="seed"):
        run_simulation(replace(config, seed=6), mnist, journal_dir=tmp_path / "run", resume=True)
    with pytest.raises(ConfigError, match="--resume"):
        run_simulation(config, mnist, journal_dir=tmp_path / "run")


def listening_addresses(pids):
    """Local addresses on which these processes, or Ray's, listen (from ``ss -tlnp``)."""
    table = subprocess.run(["ss", "-tlnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        owners = line[line.find("users:") :]
        ours = any(f"pid={pid}," in owners for pid in pids)
        if ours or any(name in owners for name in ('"raylet"', '"gcs_server"', '"ray::')):
            found.append(fields[3].rsplit(":", 1)[0])
    return found


@pytest.mark.slow
def test_ray_backend_gives_the_local_model_bits_on_loopback_only(mnist):
    if importlib.util.find_spec("ray") is None:
        pytest.skip("the optional 'ray' extra is not installed (pip install 'heterofl-edge[ray]')")
    from heterofl_edge.ray_backend import LOCAL_RAY_ENVIRONMENT, import_ray

    config = replace(TINY, rounds=1)
    local = run_simulation(config, mnist, execution=Execution(workers=1))
    saved = {k: os.environ.get(k) for k in LOCAL_RAY_ENVIRONMENT}
    try:
        ray = import_ray(local=True)  # sets the private-Ray environment before Ray reads it
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": REPO}},
        )
        try:
            remote = run_simulation(config, mnist, execution=Execution(backend=Backend.ray))
            assert ray.is_initialized()  # a Ray it did not start is left running
            if shutil.which("ss"):
                addresses = listening_addresses([os.getpid()])
                assert addresses, "no Ray listener found"
                assert set(addresses) <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, addresses
        finally:
            ray.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert_same_state(local.global_state, remote.global_state)
