"""Compressed transport in ``simulate``: applied in process, counted, and resumed bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from heterofl_edge.simulation import Execution, SimulationConfig, load_data, run_simulation
from heterofl_edge.training import LocalTrainingConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp"
ONE = Execution(workers=1)


@pytest.fixture
def blobs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from tiny_mlp.data import write_blobs

    write_blobs(tmp_path / "blobs", train=200, test=100)
    return tmp_path / "blobs"


def tiny(**encodings) -> SimulationConfig:
    return SimulationConfig(
        model="tiny_mlp.model:build",
        data="tiny_mlp.data:load",
        mode="a-e",
        rounds=3,
        num_clients=4,
        fraction=1.0,
        lr=0.05,
        local=LocalTrainingConfig(epochs=1, batch_size=20),
        **encodings,
    )


def test_encodings_change_the_model_as_little_as_their_bounds_and_are_counted(blobs):
    fp32 = tiny()
    data = load_data(fp32, blobs)
    plain = run_simulation(fp32, data, execution=ONE)
    halves = run_simulation(
        tiny(download_encoding="fp16", upload_encoding="bf16"), data, execution=ONE
    )
    quarter = run_simulation(tiny(upload_encoding="int8"), data, execution=ONE)
    for name, tensor in plain.global_state.items():
        assert not torch.equal(quarter.global_state[name], tensor) or tensor.dim() == 0, name
        scale = float(tensor.abs().max()) + 1e-3
        assert float((halves.global_state[name] - tensor).abs().max()) < 0.05 * scale, name
    sizes = {
        run: result.to_json()["transfer"]["bytes_per_device_round"]
        for run, result in (("fp32", plain), ("halves", halves), ("int8", quarter))
    }
    # A small model: safetensors headers and metadata weigh more than at conv's sizes.
    assert 0.5 < sizes["halves"]["down"] / sizes["fp32"]["down"] < 0.6
    assert 0.5 < sizes["halves"]["up"] / sizes["fp32"]["up"] < 0.65
    assert sizes["int8"]["down"] == sizes["fp32"]["down"]
    assert sizes["int8"]["up"] / sizes["fp32"]["up"] < 0.5
    record = plain.rounds[0].transfer
    assert (
        record["down"]["train"]["fp32"]["payloads"]
        == 4
        == record["up"]["train"]["fp32"]["payloads"]
    )
    assert set(record["devices"]) == {"0", "1", "2", "3"}
    json.dumps(plain.to_json(), allow_nan=False)  # results.json stays strict JSON


@pytest.mark.parametrize("placement", ["server", "distributed"])
def test_a_private_run_compresses_its_uploads_and_spends_the_same_epsilon(blobs, placement):
    """DP and int8 uploads compose: the same noise and epsilon, the model within int8's error.

    Server placement clips what the coordinator decodes; distributed placement adds
    each client's (seeded) noise share before the update is encoded.
    """
    private = {"dp_clip": 1.0, "dp_noise_multiplier": 0.5, "dp_placement": placement}
    plain = tiny(**private)
    data = load_data(plain, blobs)
    fp32 = run_simulation(plain, data, execution=ONE)
    int8 = run_simulation(tiny(upload_encoding="int8", **private), data, execution=ONE)
    assert [r.privacy for r in int8.rounds] == [r.privacy for r in fp32.rounds]
    assert int8.rounds[-1].privacy is not None and int8.rounds[-1].privacy["epsilon"] > 0
    sizes = [r.to_json()["transfer"]["bytes_per_device_round"] for r in (fp32, int8)]
    assert sizes[1]["up"] / sizes[0]["up"] < 0.5
    for name, tensor in fp32.global_state.items():
        if not tensor.is_floating_point():
            continue
        moved = float((int8.global_state[name] - tensor).abs().max())
        assert torch.isfinite(int8.global_state[name]).all(), name
        # Noise of std z*C/k dominates; int8's error is a small part of it.
        assert moved < 0.1 * (float(tensor.abs().max()) + 1e-3) + 0.05, (name, moved)


def test_a_resumed_run_with_error_feedback_ends_with_the_uninterrupted_model(blobs, tmp_path):
    config = tiny(download_encoding="fp16", upload_encoding="int8", error_feedback=True)
    data = load_data(config, blobs)
    journal = tmp_path / "run" / "journal"
    run_simulation(replace(config, rounds=1), data, execution=ONE, journal_dir=journal)
    assert [p.name for p in journal.glob("transport-*")] == ["transport-000001-final.safetensors"]
    resumed = run_simulation(config, data, execution=ONE, journal_dir=journal, resume=True)
    uninterrupted = run_simulation(config, data, execution=ONE)
    without_feedback = run_simulation(replace(config, error_feedback=False), data, execution=ONE)
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    for name, tensor in uninterrupted.global_state.items():
        assert torch.equal(resumed.global_state[name], tensor), name
    assert [r.transfer for r in resumed.rounds] == [r.transfer for r in uninterrupted.rounds]
    # The residuals mattered: without them rounds 2 and 3 end elsewhere.
    assert any(
        not torch.equal(without_feedback.global_state[n], t)
        for n, t in uninterrupted.global_state.items()
    )


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "heterofl_edge", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--upload-encoding", "fp8"], "unknown encoding 'fp8'"),
        (["--mode", "a-e", "--download-encoding", "fp32,c=int8"], "names levels ['c']"),
        (["--error-feedback", "--submodel", "rolling"], "use --submodel static"),
    ],
)
def test_bad_encoding_flags_end_with_one_line_and_exit_code_2(flags, needle):
    for command in (["simulate"], ["coordinator", "serve", "--state-dir", "/nonexistent/s"]):
        out = run_cli(*command, *flags)
        assert out.returncode == 2, out.stderr
        assert needle in out.stderr and "Traceback" not in out.stderr


def test_simulate_reports_bytes_per_device_round_in_its_encodings(blobs, tmp_path):
    out = run_cli(
        *("simulate", "--model", "tiny_mlp.model:build", "--data", "tiny_mlp.data:load"),
        *("--data-dir", str(blobs), "--mode", "a-e", "--rounds", "1", "--clients", "4"),
        *("--fraction", "1", "--workers", "1", "--upload-encoding", "fp32,e=int8"),
        *("--download-encoding", "bf16", "--out", str(tmp_path / "run")),
        cwd=EXAMPLE,
    )
    assert out.returncode == 0, out.stderr
    assert "MiB per device-round (bf16 down, fp32,e=int8 up)" in out.stdout
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["config"]["upload_encoding"] == "fp32,e=int8"
    transfer = report["rounds"][0]["transfer"]
    assert set(transfer["down"]["train"]) == {"bf16"}
    assert set(transfer["up"]["train"]) <= {"fp32", "int8"}
    assert report["transfer"]["bytes_per_device_round"]["total"] > 0
