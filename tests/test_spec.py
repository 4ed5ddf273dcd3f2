"""One federation spec for simulate and serve: the same options, defaults, file and engine."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import requests
import typer

from coordinator.config import CoordinatorConfig
from coordinator.process import start_coordinator, stop
from heterofl_edge.cli import app
from heterofl_edge.cli.spec_options import spec_settings
from heterofl_edge.engine import StatisticsClients
from heterofl_edge.errors import ConfigError
from heterofl_edge.federation import Quorum, build_engine
from heterofl_edge.simulation import SimulationConfig
from heterofl_edge.slicing import Submodel
from heterofl_edge.spec import SPEC_KEYS, FederationSpec, Policy

RUN_TOML = """
[federation]
mode = "a2-e8"
submodel = "rolling"
rounds = 7
fraction = 0.5
lr = 0.02
milestones = [3, 5]
local-epochs = 2
batch_size = 20
statistics = "round"
seed = 5
test_examples = 300
"""


def command(*path):
    group = typer.main.get_command(app)
    for name in path:
        group = group.commands[name]
    return group


def spec_options(cmd):
    settings = (*SPEC_KEYS, "config")
    return {p.name: p for p in cmd.params if p.param_type_name == "option" and p.name in settings}


def test_both_commands_take_every_setting_under_one_name_help_and_default():
    simulate, serve = command("simulate"), command("coordinator", "serve")
    ours, theirs = spec_options(simulate), spec_options(serve)
    assert set(ours) == set(theirs) == {*SPEC_KEYS, "config"}
    for name, option in ours.items():
        other = theirs[name]
        assert option.opts == other.opts == [f"--{name.replace('_', '-')}"], name
        assert option.default is None and other.default is None, name  # unset: the spec's
        assert option.help == other.help, name
    assert "serve: profile; simulate: the mode's rule" in ours["policy"].help  # the one difference


class Silent:
    """A transport nobody answers (the engine is built, never run)."""

    def wait_for_clients(self, minimum):
        return None

    def population(self):
        return 0

    def stopping(self):
        return True


class Forgetful:
    def resume(self):
        return None


def engine_of(spec, population):
    return build_engine(
        spec, Silent(), Forgetful(), dict, lambda: 0.0, population=population, quorum=Quorum()
    )


def what_runs(engine):
    strategy, settings = engine.strategy, engine.settings
    return (
        strategy.mix,
        strategy.fraction,
        strategy.schedule,
        strategy.seed,
        strategy.submodel,
        settings.rounds,
        settings.statistics,
    )


def test_the_spec_file_the_flags_and_the_defaults_give_simulate_and_serve_the_same_engine(
    tmp_path,
):
    spec_file = tmp_path / "run.toml"
    spec_file.write_text(RUN_TOML)
    from_file = spec_settings(spec_file)
    simulated = SimulationConfig(**from_file, num_clients=10)
    served = CoordinatorConfig(**from_file, state_dir=tmp_path / "state")
    assert simulated.spec == FederationSpec(**{**from_file})
    assert what_runs(engine_of(simulated, 10)) == what_runs(engine_of(served, None))
    mix, fraction, schedule, seed, submodel, rounds, statistics = what_runs(engine_of(served, None))
    assert (mix.name, mix.assignment.value, fraction, seed) == ("a2-e8", "fix", 0.5, 5)
    assert (schedule.lr, schedule.milestones, submodel, rounds) == (
        0.02,
        (3, 5),
        Submodel.rolling,
        7,
    )
    assert statistics is StatisticsClients.round
    assert served.local_training.epochs == 2 and served.local_training.batch_size == 20
    assert served.test_examples == simulated.test_examples == 300

    flags = spec_settings(spec_file, mode="a-e", rounds=3, milestones="2")  # flags win
    overridden = SimulationConfig(**flags)
    assert (overridden.level_mix.name, overridden.total_rounds) == ("a-e", 3)
    assert overridden.lr_milestones == (2,) and overridden.learning_rate == 0.02  # the file's

    sim_default = SimulationConfig(**spec_settings(None))
    serve_default = CoordinatorConfig(**spec_settings(None), state_dir=tmp_path / "s")
    for key in SPEC_KEYS:  # one default each, but the policy (serve places by profile)
        if key in ("local_epochs", "batch_size", "policy"):
            continue
        assert getattr(sim_default, key) == getattr(serve_default, key), key
    assert sim_default.policy is None and serve_default.policy is Policy.profile
    assert (
        what_runs(engine_of(sim_default, 100))[1:] == what_runs(engine_of(serve_default, None))[1:]
    )
    assert (sim_default.total_rounds, sim_default.lr_milestones) == (200, (100,))  # the paper's


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('mode = "a-x"', "bad level 'x' in mode 'a-x'"),
        ("rounds = 0", "rounds must be at least 1"),
        ('statistics = "most"', "unknown statistics 'most'"),
        ("shards = 3", "unknown federation settings ['shards']"),
        ("fraction = 1.5", "fraction 1.5 is outside (0, 1]"),
        ("mode = ", "is not TOML"),
    ],
)
def test_a_bad_spec_file_is_one_clear_error(tmp_path, text, problem):
    spec_file = tmp_path / "run.toml"
    spec_file.write_text(text + "\n")
    with pytest.raises(ConfigError) as refused:
        FederationSpec(**spec_settings(spec_file))
    assert problem in refused.value.message


def test_simulate_refuses_the_profile_policy_and_says_why():
    with pytest.raises(ConfigError, match="simulated clients time nothing"):
        SimulationConfig(policy=Policy.profile)


@pytest.mark.slow
def test_simulate_and_serve_read_the_same_spec_file(tmp_path, mnist_dir):
    spec_file = tmp_path / "run.toml"
    spec_file.write_text(RUN_TOML)
    out = subprocess.run(
        [
            sys.executable, "-m", "heterofl_edge", "simulate", "--config", str(spec_file),
            "--data-dir", str(mnist_dir), "--rounds", "1", "--clients", "2",
            "--train-examples", "40", "--workers", "1", "--out", str(tmp_path / "sim"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mode a2-e8 (fix), 1 rounds, 2 clients, fraction 0.5, rolling sub-models" in out.stdout
    written = json.loads((tmp_path / "sim" / "results.json").read_text())["config"]
    assert written["lr"] == 0.02 and written["milestones"] == [3, 5]
    assert written["local"]["epochs"] == 2 and written["statistics"] == "round"

    process, url = start_coordinator(
        ["--state-dir", str(tmp_path / "state"), "--config", str(spec_file), "--no-artifacts"],
        tmp_path / "coordinator.log",
    )
    try:
        health = requests.get(f"{url}/v1/health", timeout=30).json()
    finally:
        stop(process)
    assert (health["mode"], health["policy"], health["rounds"]) == ("a2-e8", "profile", 7)
    assert not math.isnan(health["reference_rate"])


def test_a_spec_built_in_python_reads_enum_settings_given_as_strings():
    """``SimulationConfig(split="non-iid")`` means what ``--split non-iid`` means."""
    from heterofl_edge.partition import Split
    from heterofl_edge.privacy import DpPlacement

    given = SimulationConfig(
        split="non-iid",
        submodel="rolling",
        statistics="round",
        policy="fix",
        dp_clip=1.0,
        dp_noise_multiplier=1.0,
        dp_placement="distributed",
    )
    assert given.split is Split.non_iid and given.submodel is Submodel.rolling
    assert given.statistics is StatisticsClients.round and given.policy is Policy.fix
    assert given.dp_placement is DpPlacement.distributed
    assert given == SimulationConfig(
        split=Split.non_iid,
        submodel=Submodel.rolling,
        statistics=StatisticsClients.round,
        policy=Policy.fix,
        dp_clip=1.0,
        dp_noise_multiplier=1.0,
        dp_placement=DpPlacement.distributed,
    )
    with pytest.raises(ConfigError, match=r"unknown split 'bogus' \(use one of: iid, non-iid\)"):
        SimulationConfig(split="bogus")
