"""A device's state on disk between rounds and across restarts: a safetensors file of its model, optimisers
and the server's towers, with its metadata (identity, run id, round) in the header and beside it as JSON.

Without --state-dir a device keeps it in STATE_ROOT/<run id>/<client id>: the server names its
federation in the Welcome, so a new federation starts afresh and a resumed one continues."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.training import Optimizers
from fedafd.runtime.checkpoint import load_checkpoint, read_legacy, read_meta, save_checkpoint
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.wire import RUN_ID_PATTERN

STATE_FILE = "client_state.safetensors"
STATE_VERSION = 2
"""2: safetensors, and the run id of the federation the state belongs to."""
LEGACY_STATE_FILE = "client_state.pt"
"""State version 1 (torch.save); read only by `fedafd-edge convert-state`."""
STATE_CONFIG_FILE = "config.json"
"""Beside the state: the device's ClientConfig (the exporter reads the test split's cap and seed)."""
STATE_ROOT = Path("edge_state")
"""Where `join` keeps states without --state-dir (relative to the working directory)."""


class StateError(FedafdError):
    """A saved state this device cannot continue from; the message says what to do."""


@dataclass
class ClientState:
    model: LocalModel
    optimizers: Optimizers
    towers: GlobalTowers
    last_round: int = -1
    dp_history: list = field(default_factory=list)
    """A DP device's privacy accountant history, [(noise multiplier, sample rate, steps), ...] (edge_client/privacy.py)."""


def state_folder(root: Path, run_id: str, client_id: str) -> Path:
    return Path(root) / run_id / client_id


def save_state(state_dir: Path, state: ClientState, meta: dict) -> None:
    tree = {
        "model": state.model.state_dict(),
        "optimizers": state.optimizers.state_dict(),
        "towers": state.towers.flat_state(),
    }
    full_meta = dict(meta, state_version=STATE_VERSION, last_round=state.last_round, dp_history=state.dp_history,
                     tower_version=state.towers.version, tower_archs=state.towers.archs)
    save_checkpoint(state_dir / STATE_FILE, tree, full_meta)


def read_state_meta(state_dir: Path, run_id: str = "") -> dict | None:
    """The saved state's metadata (None when there is none), after checking it is one this build reads;
    `run_id` (the federation the device joined) goes into the command that converts an old file."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        if (Path(state_dir) / LEGACY_STATE_FILE).is_file():
            raise StateError(f"{state_dir} holds a state of an older build ({LEGACY_STATE_FILE}, torch.save): convert "
                             f"it once with `fedafd-edge convert-state {state_dir} --run-id {run_id or 'RUN_ID'}` "
                             f"(the federation it continues), or delete it to start afresh")
        return None
    meta = read_meta(path)
    if meta.get("state_version") != STATE_VERSION:
        raise StateError(f"{path} has state version {meta.get('state_version')}, this build reads {STATE_VERSION}; "
                         f"delete {state_dir} to start afresh, or pass another --state-dir")
    return meta


def load_state(state_dir: Path, state: ClientState, expected_meta: dict) -> bool:
    """Restore in place; False when there is no saved state. A state of another federation (run_id), kind,
    architecture or feature_dim is an error: loading it would silently mix models, or fail half-way."""
    expected = dict(expected_meta)
    run_id = expected.pop("run_id", None)
    expected.pop("towers", None)  # where the tower files are: the architectures' names already say which weights
    meta = read_state_meta(state_dir, run_id or "")
    if meta is None:
        return False
    if run_id is not None and meta.get("run_id") != run_id:
        raise StateError(f"{state_dir} holds {meta.get('client_id')}'s state from federation {meta.get('run_id')!r}, "
                         f"but the server runs federation {run_id!r} (a new one, not a --resume of it): delete "
                         f"{state_dir} to start this device afresh, or pass another --state-dir")
    changed = [f"{key}: {meta.get(key)!r} -> {value!r}" for key, value in expected.items() if meta.get(key) != value]
    if changed:
        raise StateError(f"{state_dir} holds a state saved with other settings ({', '.join(changed)}): delete "
                         f"{state_dir} to start this device afresh, or pass another --state-dir")
    tree, meta = load_checkpoint(state_dir / STATE_FILE)
    state.model.load_state_dict(tree["model"])
    state.optimizers.load_state_dict(tree["optimizers"])
    if tree["towers"]:
        state.towers.load(meta["tower_version"], meta["tower_archs"], tree["towers"])
    state.last_round = meta["last_round"]
    state.dp_history = [tuple(entry) for entry in meta.get("dp_history", [])]
    return True


def convert_state(state_dir: Path, run_id: str) -> Path:
    """Rewrite an older build's torch.save state (version 1) in STATE_DIR as this build's file, bound to
    federation `run_id` ("": for `fedafd-edge export` only). The old file stays."""
    legacy = Path(state_dir) / LEGACY_STATE_FILE
    if not legacy.is_file():
        raise StateError(f"no old state at {legacy} (convert-state reads {LEGACY_STATE_FILE})")
    if run_id and not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise StateError(f"--run-id {run_id!r} is not a run id (the server logs it, and it is in "
                         f"RUN_DIR/checkpoint/server.json)")
    tree, meta = read_legacy(legacy)
    if meta.get("state_version") != 1:
        raise StateError(f"{legacy} has state version {meta.get('state_version')}; only version 1 converts")
    target = Path(state_dir) / STATE_FILE
    save_checkpoint(target, tree, dict(meta, state_version=STATE_VERSION, run_id=run_id))
    return target
