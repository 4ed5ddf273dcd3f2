"""No state is lost silently: a damaged state folder is refused, repaired, never overwritten.

Each case starts from a run whose round 1 finished (round 2 open), damages the
folder as an operator or a disk could, and checks that the coordinator refuses
to start (naming ``coordinator repair``) without writing anything, and that
after the repair the run continues from a sound checkpoint.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from coordinator_helpers import auth, global_model, make_config, register
from safetensors.torch import load_file, save_file
from test_coordinator import report_statistics, train_round_with_known_updates

from coordinator.artifacts import damage_in
from coordinator.store import StateError, Store
from heterofl_edge.cli import main


def finish_round_one(make_app, config):
    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    train_round_with_known_updates(client, tokens)
    assert coordinator.settle()
    report_statistics(client, tokens)
    assert coordinator.settle()
    assert client.get("/v1/health").json["completed_rounds"] == 1
    model = global_model(client)
    coordinator.close()
    return tokens, model


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def repair(state_dir, capsys):
    with pytest.raises(SystemExit) as done:
        main(["coordinator", "repair", "--state-dir", str(state_dir)])
    assert done.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("damage", ["emptied", "deleted"])
def test_a_lost_database_is_refused_then_repaired_from_the_latest_checkpoint(
    make_app, tmp_path, capsys, damage
):
    config = make_config(tmp_path / "state", rounds=3)
    old_tokens, after_round_one = finish_round_one(make_app, config)
    database = tmp_path / "state" / "coordinator.sqlite3"
    if damage == "emptied":
        database.write_bytes(b"")  # ': > coordinator.sqlite3'
    else:
        database.unlink()
    checkpoints = snapshot(tmp_path / "state" / "checkpoints")

    with pytest.raises(StateError, match="coordinator repair") as refused:
        make_app(config)
    assert f"is {'empty' if damage == 'emptied' else 'missing'}" in refused.value.message
    assert "round-0001-final" in refused.value.message
    assert snapshot(tmp_path / "state" / "checkpoints") == checkpoints  # nothing rewritten

    said = repair(tmp_path / "state", capsys)
    assert "continues after round 1 from round-0001-final.safetensors" in said
    assert snapshot(tmp_path / "state" / "checkpoints") == checkpoints
    if damage == "emptied":  # the emptied file is kept beside the new one, not deleted
        assert list((tmp_path / "state").glob("coordinator.sqlite3.damaged-*"))

    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    assert coordinator.settle()
    assert client.get("/v1/health").json["completed_rounds"] == 1
    served = global_model(client)
    assert all(torch.equal(served[k], after_round_one[k]) for k in after_round_one)
    assert client.get("/v1/task", headers=auth(old_tokens[0])).status_code == 401
    tokens = register(client)  # devices register again; the run goes on at round 2
    assert coordinator.settle()
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    assert {t.get("round") for t in tasks if t["action"] == "train"} == {2}
    assert client.get("/v1/health").json["round"] == 2


def test_a_checkpoint_holding_nan_is_refused_then_the_run_goes_back_to_a_sound_one(
    make_app, tmp_path, capsys
):
    config = make_config(tmp_path / "state", rounds=3)
    finish_round_one(make_app, config)
    path = tmp_path / "state" / "checkpoints" / "round-0001-final.safetensors"
    state = load_file(path)
    state["classifier.bias"][3] = math.nan
    save_file(state, path, metadata={"completed_rounds": "1", "stage": "final"})
    before = snapshot(tmp_path / "state" / "checkpoints")

    with pytest.raises(StateError, match=r"classifier\.bias holds NaN") as refused:
        make_app(config)
    assert "coordinator repair" in refused.value.hint
    assert snapshot(tmp_path / "state" / "checkpoints") == before

    said = repair(tmp_path / "state", capsys)
    assert "round 1 marked failed" in said and "round-0000-final" in said
    assert snapshot(tmp_path / "state" / "checkpoints") == before  # the damaged file stays

    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    assert coordinator.settle()
    initial = load_file(tmp_path / "state" / "checkpoints" / "round-0000-final.safetensors")
    served = global_model(client)
    assert all(torch.equal(served[k], initial[k]) for k in initial)
    rounds = {r["round"]: r for r in client.get("/v1/rounds").json["rounds"]}
    assert rounds[1]["state"] == "failed"
    assert "round-0001-final.safetensors was damaged" in rounds[1]["metrics"]["reason"]


def test_a_checkpoint_file_is_never_overwritten(tmp_path):
    store = Store(tmp_path / "state")
    try:
        first = {"w": torch.ones(3)}
        written = store.write_checkpoint(1, "final", first)
        path = tmp_path / "state" / "checkpoints" / written.file
        stamp = path.stat().st_mtime_ns
        store.write_checkpoint(1, "final", first)  # the same bytes: left as it is
        assert path.stat().st_mtime_ns == stamp
        store.write_checkpoint(1, "final", {"w": torch.zeros(3)})  # other bytes: old kept aside
        kept = list((tmp_path / "state" / "checkpoints" / "superseded").iterdir())
        assert len(kept) == 1 and torch.equal(load_file(kept[0])["w"], torch.ones(3))
        assert torch.equal(load_file(path)["w"], torch.zeros(3))
    finally:
        store.close()


@pytest.fixture
def level_e_state(tmp_path, artifact_cache):
    """A state folder holding levels a and e's programs (exported once per test run)."""
    state = tmp_path / "state"
    artifact_cache(state, ("a", "e"))
    return state


def truncate(path):
    with path.open("r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow
def test_a_truncated_artifact_is_moved_aside_and_exported_again_at_start_up(
    make_app, level_e_state
):
    folder = level_e_state / "artifacts" / "conv-e"
    truncate(folder / "onnx" / "train_step.onnx")
    assert "train_step.onnx has" in damage_in(folder)
    config = make_config(
        level_e_state, mode="a1-e1", build_artifacts=True, artifact_verify=False, min_devices=2
    )
    app = make_app(config)
    assert app.extensions["heterofl"].settle(timeout=300)
    assert app.test_client().get("/v1/health").json["artifacts_ready"]
    assert damage_in(folder) is None
    (damaged,) = (level_e_state / "artifacts" / "damaged").iterdir()
    assert damage_in(damaged) is not None  # the damaged copy is kept, as it was
    manifest = json.loads((folder / "manifest.json").read_text())
    with app.test_client().get("/v1/artifacts/conv/e/onnx/train_step.onnx") as reply:
        served = reply.headers["X-Content-SHA256"]
    assert served == manifest["files"]["onnx/train_step.onnx"]["sha256"]


def test_repair_moves_damaged_artifacts_aside(level_e_state, capsys):
    Store(level_e_state).close()
    truncate(level_e_state / "artifacts" / "conv-e" / "onnx" / "statistics.onnx")
    said = repair(level_e_state, capsys)
    assert "artifacts conv-e damaged (onnx/statistics.onnx has" in said
    assert not (level_e_state / "artifacts" / "conv-e").exists()
    assert len(list((level_e_state / "artifacts" / "damaged").iterdir())) == 1
