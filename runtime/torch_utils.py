"""Small torch helpers both processes use: device choice, seeding, batching, atomic file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when one is usable; 'cuda' without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA GPU; use -c device=cpu or auto")
    return torch.device(name)


def configure_threads(threads: int) -> None:
    """0 keeps torch's default; several processes on one machine each want 1."""
    if threads > 0:
        torch.set_num_threads(threads)


def seeded_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def batch_indices(count: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches over range(count), shuffled when a generator is given; the last batch may be short."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch_size):
        yield order[start:start + batch_size]


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
