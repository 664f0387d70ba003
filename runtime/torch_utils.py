"""Small torch helpers both processes use: device choice, seeding, batching, atomic file writes."""

from __future__ import annotations

import zlib
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


# Seed derivations, each named once (their numbers are the ones the runs so far were made with).
def round_seed(seed: int, round_: int) -> int:
    """The generator of one round's shuffles, from the run's (or a device's) seed."""
    return seed * 1_000_003 + round_


def device_seed(seed: int, partition: int) -> int:
    """A device's training seed, from the run's seed and its partition."""
    return seed * 7919 + partition


def resample_seed(seed: int, round_: int) -> int:
    """The public subset drawn for a round with public_resample."""
    return seed * 7907 + round_ + 1


def rank_seed(seed: int, rank: int) -> int:
    """A server rank's dropout stream (distinct per rank; rank 0 keeps the server's own)."""
    return seed * 1_000_003 + rank


def derived_seed(seed: int, name: str) -> int:
    """A seed of its own for `name` (a client id, a stream's purpose), the same in every process and Python
    run (crc32, not the salted hash()), and different for different names under one run seed."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


class OwnRandom:
    """A participant's own stream of torch's global random numbers (dropout, weight initialisation), swapped
    in for the code inside `with`: a device or the server draws the same numbers whether it runs alone in
    its process (`join`, `serve`) or beside others in one (`simulate`), where their turns interleave.
    Not re-entrant; one thread at a time (the simulation gives turns one at a time)."""

    def __init__(self, seed: int):
        self._cpu = seeded_generator(seed).get_state()
        self._cuda: list[torch.Tensor] | None = None  # taken from the CUDA generators on first use
        self._cuda_seed = seed
        self._outside: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None

    def __enter__(self) -> "OwnRandom":
        if self._outside is not None:
            raise RuntimeError("OwnRandom is not re-entrant")
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._outside = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
        torch.set_rng_state(self._cpu)
        if cuda:
            if self._cuda is None:
                torch.cuda.manual_seed_all(self._cuda_seed)
            else:
                torch.cuda.set_rng_state_all(self._cuda)
        return self

    def __exit__(self, *exc) -> None:
        outside_cpu, outside_cuda = self._outside
        self._outside = None
        self._cpu = torch.get_rng_state()
        torch.set_rng_state(outside_cpu)
        if outside_cuda is not None:
            self._cuda = torch.cuda.get_rng_state_all()
            torch.cuda.set_rng_state_all(outside_cuda)


def batch_indices(count: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches over range(count), shuffled when a generator is given; the last batch may be short."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch_size):
        yield order[start:start + batch_size]


