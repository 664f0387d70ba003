"""A device's state on disk between rounds and across restarts: weights beside a JSON of metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.training import Optimizers
from fedafd.runtime.torch_utils import load_checkpoint, save_checkpoint

STATE_FILE = "client_state.pt"
STATE_VERSION = 1


@dataclass
class ClientState:
    model: LocalModel
    optimizers: Optimizers
    towers: GlobalTowers
    last_round: int = -1


def save_state(state_dir: Path, state: ClientState, meta: dict) -> None:
    tensors = {
        "model": state.model.state_dict(),
        "optimizers": state.optimizers.state_dict(),
        "towers": state.towers.flat_state(),
    }
    full_meta = dict(meta, state_version=STATE_VERSION, last_round=state.last_round,
                     tower_version=state.towers.version, tower_archs=state.towers.archs)
    save_checkpoint(state_dir / STATE_FILE, tensors, full_meta)


def load_state(state_dir: Path, state: ClientState, expected_meta: dict) -> bool:
    """Restore in place; False when there is no saved state. A state saved by a different kind or
    architecture is an error (loading it would silently mix models)."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return False
    tensors, meta = load_checkpoint(path)
    if meta.get("state_version") != STATE_VERSION:
        raise ValueError(f"{path} has state version {meta.get('state_version')}, this build reads {STATE_VERSION}")
    for key, value in expected_meta.items():
        if meta.get(key) != value:
            raise ValueError(f"{path} was saved with {key}={meta.get(key)!r}, this device runs {key}={value!r}; "
                             f"use another --state-dir or delete it")
    state.model.load_state_dict(tensors["model"])
    state.optimizers.load_state_dict(tensors["optimizers"])
    if tensors["towers"]:
        state.towers.load(meta["tower_version"], meta["tower_archs"], tensors["towers"])
    state.last_round = meta["last_round"]
    return True
