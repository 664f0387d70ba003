"""The one way fedafd replaces a file: written beside it, then renamed over it in one step, so a crash or a reader
never sees half a file (caches, checkpoints, device states, keys, split records)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = False, mode: int = 0o644) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one step, with `mode`
    (0o644: caches are shared; 0o600 for a secret: the temporary file is private from the start, mkstemp's).
    `durable`: the bytes reach the disk before the rename (a checkpoint, a key, a record that must survive a
    crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """`payload` as the file at `path`, durably (atomic_write)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(payload), durable=True)
