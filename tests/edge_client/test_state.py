"""A device's saved state: back exactly into a fresh device of the same identity and federation; any other
identity or federation, or an old torch.save file, is a StateError that says what to do."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.state import (LEGACY_STATE_FILE, STATE_FILE, ClientState, StateError, convert_state,
                                      load_state, save_state)
from fedafd.edge_client.training import Optimizers
from fedafd.runtime.models import build_encoder

IDENTITY = {"client_id": "image-0", "kind": "image", "image_arch": "cnn_small", "text_arch": "gru", "feature_dim": 16,
            "run_id": "run-a"}


def fresh(seed: int, feature_dim: int = 16) -> ClientState:
    torch.manual_seed(seed)
    model = LocalModel("image", "cnn_small", "gru", feature_dim, 10)
    return ClientState(model, Optimizers.create(model, 1e-3, 1e-4), GlobalTowers(feature_dim, torch.device("cpu")))


def trained(seed: int = 0) -> ClientState:
    """A state after one optimiser step, with a tower from the server."""
    state = fresh(seed)
    for _, p in state.model.named_task_parameters():
        p.grad = torch.full_like(p, 0.1)
    state.optimizers.task.step()
    tower = build_encoder("image", "cnn_small", 16)
    state.towers.load(3, {"image": "cnn_small"}, {f"image.{k}": v for k, v in tower.state_dict().items()})
    state.last_round = 2
    return state


def test_a_saved_state_comes_back_into_a_fresh_device(tmp_path: Path) -> None:
    saved = trained()
    save_state(tmp_path, saved, IDENTITY)

    restored = fresh(seed=1)
    assert load_state(tmp_path, restored, IDENTITY) is True

    assert restored.last_round == 2 and restored.towers.version == 3 and restored.towers.archs == {"image": "cnn_small"}
    for (name, a), b in zip(saved.model.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(a, b), name
    towers = saved.towers.flat_state()
    assert towers.keys() == restored.towers.flat_state().keys()
    assert all(torch.equal(t, restored.towers.flat_state()[k]) for k, t in towers.items())
    moments = saved.optimizers.state_dict()["task"]["state"]
    assert len(moments) > 0 and restored.optimizers.state_dict()["task"]["state"].keys() == moments.keys()
    assert all(torch.equal(m["exp_avg"], restored.optimizers.state_dict()["task"]["state"][i]["exp_avg"])
               for i, m in moments.items())
    assert not (tmp_path / LEGACY_STATE_FILE).exists() and json.loads((tmp_path / "client_state.json").read_text())["run_id"] == "run-a"


def test_no_saved_state_is_a_fresh_start(tmp_path: Path) -> None:
    assert load_state(tmp_path, fresh(0), IDENTITY) is False


def test_a_state_of_another_federation_names_both_runs_and_what_to_do(tmp_path: Path) -> None:
    save_state(tmp_path, trained(), IDENTITY)
    with pytest.raises(StateError, match=r"from federation 'run-a', but the server runs federation 'run-b'.*"
                                         r"delete .* or pass another --state-dir"):
        load_state(tmp_path, fresh(1), dict(IDENTITY, run_id="run-b"))


@pytest.mark.parametrize("key, value", [("feature_dim", 32), ("kind", "multimodal"), ("image_arch", "resnet_tiny")])
def test_a_state_of_another_identity_names_the_setting_and_what_to_do(tmp_path: Path, key: str, value) -> None:
    save_state(tmp_path, trained(), IDENTITY)
    with pytest.raises(StateError, match=rf"{key}: {IDENTITY[key]!r} -> {value!r}.*delete .* pass another --state-dir"):
        load_state(tmp_path, fresh(1), dict(IDENTITY, **{key: value}))


def _legacy_state(folder: Path, state: ClientState) -> None:
    """client_state.pt as builds before safetensors wrote it."""
    meta = {k: v for k, v in IDENTITY.items() if k != "run_id"}
    meta.update(state_version=1, last_round=state.last_round, tower_version=state.towers.version,
                tower_archs=state.towers.archs)
    buffer = io.BytesIO()
    torch.save({"model": state.model.state_dict(), "optimizers": state.optimizers.state_dict(),
                "towers": state.towers.flat_state(), "__meta_json__": json.dumps(meta)}, buffer)
    (folder / LEGACY_STATE_FILE).write_bytes(buffer.getvalue())


def test_an_old_state_is_refused_with_the_command_that_converts_it(tmp_path: Path) -> None:
    # Prepare: an old build's file
    saved = trained()
    _legacy_state(tmp_path, saved)
    with pytest.raises(StateError, match=rf"fedafd-edge convert-state {tmp_path} --run-id run-a`"):
        load_state(tmp_path, fresh(1), IDENTITY)
    with pytest.raises(StateError, match="not a run id"):
        convert_state(tmp_path, "../up")

    # Execute
    assert convert_state(tmp_path, "run-a") == tmp_path / STATE_FILE
    restored = fresh(seed=1)

    # Assert: it now loads into the federation it was bound to, with the same weights
    assert load_state(tmp_path, restored, IDENTITY) is True and restored.last_round == 2
    for a, b in zip(saved.model.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)
