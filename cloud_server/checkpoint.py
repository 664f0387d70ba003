"""The server's checkpoint: where it lies, its format, what `serve --resume` checks before anything loads
(no torch: `serve` does it before starting its --local devices), and the converter from the old file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedafd.runtime.checkpoint import load_checkpoint, read_legacy, read_meta, save_checkpoint
from fedafd.runtime.config import ServerConfig, config_to_dict
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.wire import new_run_id

CHECKPOINT_FILE = "checkpoint/server.safetensors"
CHECKPOINT_FORMAT = 3
"""2: backbone adapters as towers, and stage 3's own optimiser. 3: safetensors, and the run id."""
LEGACY_CHECKPOINT_FILE = "checkpoint/server.pt"
"""Formats 1-2 (torch.save); read only by `fedafd-cloud convert-checkpoint`."""

RESUMABLE_KEYS = ("rounds", "min_clients", "expected_clients", "join_timeout_s", "round_deadline_s",
                  "heartbeat_timeout_s", "quorum", "device", "threads", "sed_chunk")
"""ServerConfig keys that `serve --resume` may change: how long and with whom the run goes on, and where
and how fast it computes. Every other key shapes the models or the method, so changing it mid-run
would either not load or silently continue a different experiment."""


class CheckpointRefused(FedafdError):
    """A checkpoint `serve --resume` (or the exporter) cannot continue from; the message says what to do."""


def checkpoint_path(source: Path) -> Path:
    """A run folder -> its checkpoint file; a file stays as it is."""
    source = Path(source)
    return source / CHECKPOINT_FILE if source.is_dir() else source


def read_server_meta(source: Path, what: str = "--resume") -> dict[str, Any]:
    """The metadata of the checkpoint in a run folder (or at a path), after checking it is one this build
    reads: present, safetensors, of CHECKPOINT_FORMAT."""
    path = checkpoint_path(source)
    run_dir = path.parent.parent
    if path.suffix == ".pt" or not path.is_file():
        legacy = path if path.suffix == ".pt" else run_dir / LEGACY_CHECKPOINT_FILE
        if legacy.is_file():
            raise CheckpointRefused(f"{what}: {legacy} was written by an older build (torch.save); convert it once "
                                    f"with `fedafd-cloud convert-checkpoint {legacy}`, then try again")
        raise CheckpointRefused(f"{what}: no checkpoint at {path}")
    meta = read_meta(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointRefused(f"{what}: {path} has checkpoint format {meta.get('format')}, this build reads "
                                f"{CHECKPOINT_FORMAT}; use the build that wrote it, or start a new run folder")
    return meta


def save_server_checkpoint(run_dir: Path, tensors: dict[str, Any], round_: int, config: ServerConfig,
                           run_id: str) -> None:
    """Write the run folder's checkpoint after `round_`: `tensors` and, in its header, the round, the config
    (what --resume compares), this build's format and the federation's run id."""
    meta = {"round": round_, "config": config_to_dict(config), "format": CHECKPOINT_FORMAT, "run_id": run_id}
    save_checkpoint(Path(run_dir) / CHECKPOINT_FILE, tensors, meta)


def load_server_checkpoint(source: Path, what: str = "--resume") -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors and metadata of the checkpoint in a run folder (or at a path), after read_server_meta's
    checks; `what` names the reader in its errors."""
    path = checkpoint_path(source)
    read_server_meta(path, what)
    return load_checkpoint(path)


def config_changes(saved: dict[str, Any], config: ServerConfig) -> dict[str, tuple[Any, Any]]:
    """key -> (checkpointed value, new value) for every key that differs and may not change on resume
    (a key one side lacks shows as '<absent>')."""
    new = config_to_dict(config)
    absent = "<absent>"
    return {key: (saved.get(key, absent), new.get(key, absent)) for key in sorted(set(saved) | set(new))
            if key not in RESUMABLE_KEYS and saved.get(key, absent) != new.get(key, absent)}


def check_resume(run_dir: Path, config: ServerConfig) -> dict[str, Any]:
    """The checkpoint's metadata, if `config` may continue it; otherwise an error naming each changed key."""
    meta = read_server_meta(run_dir)
    changes = config_changes(meta["config"], config)
    if changes:
        listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
        raise CheckpointRefused(
            f"--resume: the config differs from the one {run_dir} was trained with: {listed}. Pass the old "
            f"values again (-c key=value; they are in the checkpoint's {Path(CHECKPOINT_FILE).with_suffix('.json').name}) "
            f"or start a new run folder. Only these may change on resume: {', '.join(RESUMABLE_KEYS)}")
    return meta


def check_fresh(run_dir: Path) -> None:
    """A new run may not start in a folder that holds one: it would overwrite its checkpoint and mix metrics."""
    for name in (CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE):
        if (Path(run_dir) / name).exists():
            raise CheckpointRefused(f"{run_dir} already holds a run ({name}): pass --resume to continue it, or "
                                    f"another --out for a new run")


def convert_checkpoint(source: Path) -> tuple[Path, dict[str, Any]]:
    """Rewrite an older build's torch.save checkpoint (format 2) as this build's file, with a new run id
    (the old file named none). Returns the new file and its metadata; the old file stays."""
    source = Path(source)
    legacy = source / LEGACY_CHECKPOINT_FILE if source.is_dir() else source
    if not legacy.is_file():
        raise CheckpointRefused(f"no old checkpoint at {legacy} (convert-checkpoint reads {LEGACY_CHECKPOINT_FILE})")
    tree, meta = read_legacy(legacy)
    if meta.get("format") != 2:
        raise CheckpointRefused(f"{legacy} has checkpoint format {meta.get('format')}; only format 2 converts to "
                                f"{CHECKPOINT_FORMAT} (earlier ones hold other models): start a new run folder")
    target = legacy.with_name(Path(CHECKPOINT_FILE).name)
    meta = dict(meta, format=CHECKPOINT_FORMAT, run_id=new_run_id())
    save_checkpoint(target, tree, meta)
    return target, meta
