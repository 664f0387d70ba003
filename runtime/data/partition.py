"""Splitting a training set among clients: plain functions over label arrays (numpy only)."""

from __future__ import annotations

import numpy as np

MAX_ATTEMPTS = 1000
"""Dirichlet draws tried before giving up on giving every client `min_size` samples."""


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    return labels


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 10) -> list[np.ndarray]:
    """The standard label-skewed non-IID split: for every class, proportions p ~ Dirichlet(alpha, ..., alpha)
    over the clients, and the class's (shuffled) samples cut in those proportions. Small alpha gives each
    client few classes; large alpha approaches an IID split.

    Multimodal clients pass their category index (`PairData.groups`, the Tux Paint category folder) as
    `labels`, so each client's pairs are skewed towards a few categories.

    Deterministic given `seed`. Draws again (continuing the same random stream) until every client has at
    least `min_size` samples, at most MAX_ATTEMPTS times. Returns one sorted index array per client; the
    arrays are disjoint and together cover every index of `labels`.
    """
    labels = _check_labels(labels)
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size!r}")
    if len(labels) < num_clients * min_size:
        raise ValueError(
            f"{len(labels)} samples cannot give {num_clients} clients min_size={min_size} each: "
            "lower num_clients or min_size"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_ATTEMPTS):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].append(part)
        parts = [np.sort(np.concatenate(s)) if s else np.zeros(0, np.int64) for s in shares]
        if min(len(p) for p in parts) >= min_size:
            return [p.astype(np.int64, copy=False) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_ATTEMPTS} draws gave all {num_clients} clients "
        f"min_size={min_size} samples: raise alpha, or lower min_size or num_clients"
    )


def cap_indices(indices: np.ndarray, max_size: int, seed: int) -> np.ndarray:
    """A seeded random subset of at most `max_size` of `indices` (0: no cap), sorted."""
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0 (0: no cap), got {max_size!r}")
    if max_size == 0 or len(indices) <= max_size:
        return np.sort(indices).astype(np.int64, copy=False)
    chosen = np.random.default_rng(seed).choice(indices, size=max_size, replace=False)
    return np.sort(chosen).astype(np.int64, copy=False)
