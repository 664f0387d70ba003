"""`serve --resume`: the same run id and the optimisers' moments carry on, devices continue their states
under that run id while a new federation starts them afresh; a changed config is refused naming each key,
and an old torch.save checkpoint is refused until converted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.checkpoint import (CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE, RESUMABLE_KEYS, CheckpointRefused,
                                            check_resume, config_changes)
from fedafd.cloud_server.cli import app as cloud_cli
from fedafd.edge_client.state import STATE_FILE
from fedafd.runtime.checkpoint import load_checkpoint, read_meta
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config, config_to_dict
from fedafd.cloud_server.reporting.report import read_metrics
from fedafd.runtime.transport import InprocHub

SERVER = dict(expected_clients=2, min_clients=2, public_size=32, feature_dim=16, image_arch="cnn_small",
              text_arch="gru", batch_size=16, device="cpu", join_timeout_s=60, round_deadline_s=120, local_epochs=1,
              server_epochs=1)
CLIENTS = [build_config(ClientConfig, dict(kind=kind, max_private=32, max_test=16, batch_size=16,
                                           image_arch="cnn_small", text_arch="gru")) for kind in ("image", "text")]


def server_config(**changes) -> ServerConfig:
    return build_config(ServerConfig, dict(SERVER, **changes))


def adam_steps(optimizer: torch.optim.Optimizer) -> set[float]:
    return {float(s["step"]) for s in optimizer.state.values()}


@pytest.fixture(scope="module")
def runs(inproc_federation, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run A for one round, A resumed for a second, then a new federation B, all devices keeping their
    state under one state root as `join` does without --state-dir."""
    root = tmp_path_factory.mktemp("resume")
    states = root / "edge_state"
    first = inproc_federation(server_config(rounds=1), root / "a", CLIENTS, state_root=states)
    resumed = inproc_federation(server_config(rounds=2, round_deadline_s=200), root / "a", CLIENTS, resume=True,
                                state_root=states)
    new = inproc_federation(server_config(rounds=1), root / "b", CLIENTS, state_root=states)
    return {"root": root, "states": states, "first": first, "resumed": resumed, "new": new}


def test_resume_keeps_the_run_id_and_every_round_once(runs) -> None:
    (records_a, server_a, _), (records_r, server_r, _), (_, server_b, _) = runs["first"], runs["resumed"], runs["new"]
    root = runs["root"]
    assert server_r.run_id == server_a.run_id != server_b.run_id
    assert [r["round"] for r in records_a] == [0] and [r["round"] for r in records_r] == [1]
    assert [r["round"] for r in read_metrics(root / "a" / "metrics.jsonl")] == [0, 1]
    meta = read_meta(root / "a" / CHECKPOINT_FILE)
    assert meta["run_id"] == server_a.run_id and meta["round"] == 1 and meta["format"] == 3
    assert meta["config"]["rounds"] == 2 and meta["config"]["round_deadline_s"] == 200
    # Adam's moments carried over: twice the steps of one round (a fresh optimiser would have one round's).
    assert adam_steps(server_r.optimizer) == {2 * s for s in adam_steps(server_b.optimizer)}


def test_devices_continue_under_the_run_id_and_start_afresh_in_a_new_federation(runs) -> None:
    (_, server_a, _), (_, _, edges_r), (_, server_b, edges_b) = runs["first"], runs["resumed"], runs["new"]
    states = runs["states"]
    assert sorted(p.name for p in states.iterdir()) == sorted([server_a.run_id, server_b.run_id])
    for client_id, edge in edges_r.items():
        assert edge.state_dir == states / server_a.run_id / client_id
        assert read_meta(edge.state_dir / STATE_FILE)["last_round"] == 1
        assert read_meta(edges_b[client_id].state_dir / STATE_FILE)["last_round"] == 0
        assert json.loads((edge.state_dir / "config.json").read_text())["kind"] == edge.config.kind
        fresh_steps = adam_steps(edges_b[client_id].state.optimizers.task)
        assert adam_steps(edge.state.optimizers.task) == {2 * s for s in fresh_steps}, client_id


def test_a_changed_config_is_refused_naming_each_key(runs) -> None:
    run_dir = runs["root"] / "a"
    changed = server_config(rounds=5, threads=2, feature_dim=32, text_arch="transformer_tiny", gamma=0.1)

    with pytest.raises(CheckpointRefused) as refused:
        ServerApp(changed, InprocHub().server(), run_dir, resume=True)

    message = str(refused.value)
    assert "feature_dim: 16 -> 32, gamma: 0.4 -> 0.1, text_arch: 'gru' -> 'transformer_tiny'. " in message
    assert "rounds" not in message.split("Only these")[0] and ", ".join(RESUMABLE_KEYS) in message


def test_config_changes_compares_every_key_but_the_resumable_ones() -> None:
    saved = config_to_dict(server_config())
    assert config_changes(saved, server_config(rounds=9, device="cuda", quorum=1.0, join_timeout_s=5)) == {}
    assert config_changes(saved, server_config(seed=3)) == {"seed": (0, 3)}
    assert config_changes({k: v for k, v in saved.items() if k != "beta"}, server_config()) == {"beta": ("<absent>", 0.5)}


def test_serve_refuses_a_changed_resume_and_a_fresh_start_over_a_checkpoint(runs) -> None:
    run_dir = runs["root"] / "a"
    (run_dir / "config.json").write_text('{"rounds": 2}\n')
    args = ["serve", "--out", str(run_dir), "--insecure"] + [x for k, v in SERVER.items() for x in ("-c", f"{k}={v}")]

    changed = CliRunner().invoke(cloud_cli, [*args, "--resume", "-c", "feature_dim=32"])
    fresh = CliRunner().invoke(cloud_cli, args)

    assert changed.exit_code == 2 and "feature_dim: 16 -> 32" in changed.output, changed.output
    assert fresh.exit_code == 2 and "pass --resume" in fresh.output, fresh.output
    assert (run_dir / "config.json").read_text() == '{"rounds": 2}\n'  # not overwritten by the refused runs


def test_an_old_checkpoint_is_refused_until_converted(runs, tmp_path: Path) -> None:
    # Prepare: run A's checkpoint as the previous build wrote it (torch.save, format 2, no run id)
    tree, meta = load_checkpoint(runs["root"] / "a" / CHECKPOINT_FILE)
    old_meta = {k: v for k, v in meta.items() if k != "run_id"} | {"format": 2}
    buffer = io.BytesIO()
    torch.save({**tree, "__meta_json__": json.dumps(old_meta)}, buffer)
    (tmp_path / LEGACY_CHECKPOINT_FILE).parent.mkdir(parents=True)
    (tmp_path / LEGACY_CHECKPOINT_FILE).write_bytes(buffer.getvalue())
    config = build_config(ServerConfig, meta["config"])
    with pytest.raises(CheckpointRefused, match="fedafd-cloud convert-checkpoint"):
        check_resume(tmp_path, config)

    # Execute
    converted = CliRunner().invoke(cloud_cli, ["convert-checkpoint", str(tmp_path)])

    # Assert: format 3 with a run id, the same tensors, and --resume accepts it
    assert converted.exit_code == 0, converted.output
    new_tree, new_meta = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert check_resume(tmp_path, config) == new_meta and new_meta["format"] == 3 and new_meta["run_id"] in converted.output
    assert new_tree["optimizer"]["param_groups"] == tree["optimizer"]["param_groups"]
    for name, tensor in tree["model"].items():
        assert torch.equal(new_tree["model"][name], tensor), name
