"""Splitting a training set among clients: plain functions over label arrays (numpy only).

`partition_rows(spec, labels, num_partitions, seed)` is Flower Datasets' partitioners by name, parameters and
semantics (flwr-datasets 0.6.1's `IidPartitioner`, `DirichletPartitioner`, `ShardPartitioner`,
`PathologicalPartitioner`, `NaturalIdPartitioner`), reimplemented over numpy (flwr-datasets cannot be an extra:
it pins datasets<5, whose huggingface-hub is older than the transformers fedafd needs): for the same labels, number of
partitions, parameters and seed it gives the same row sets as Flower's (tests/runtime/data/flower_partitions.json
holds Flower's own partitions; test_partitioners.py compares). `dirichlet_partition` is fedafd's own Dirichlet
split from before, the bundled demo's (`dirichlet_legacy`): it draws differently from Flower's (below).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

MAX_ATTEMPTS = 1000
"""Dirichlet draws tried before giving up on giving every client `min_size` samples (dirichlet_legacy)."""
FLOWER_DIRICHLET_ATTEMPTS = 11
"""Flower's DirichletPartitioner draws once, then at most 10 more times, before giving up on min_partition_size."""

PARTITIONERS = ("iid", "dirichlet", "dirichlet_legacy", "shard", "pathological", "natural")
"""Flower Datasets' partitioners by their short names, and dirichlet_legacy: fedafd's own Dirichlet split (not
Flower's), which the bundled demo has always used."""
CLASS_ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")

PARAMETERS: dict[str, tuple[str, ...]] = {
    "iid": ("shuffle",),
    "dirichlet": ("alpha", "min_partition_size", "self_balancing"),
    "dirichlet_legacy": ("alpha", "min_partition_size"),
    "shard": ("num_shards_per_partition", "shard_size", "keep_incomplete_shard"),
    "pathological": ("num_classes_per_partition", "class_assignment_mode"),
    "natural": (),
}
"""The spec's fields that each partitioner reads (the others are ignored)."""


@dataclass(frozen=True)
class PartitionerSpec:
    """A partitioner and its parameters, named as in Flower Datasets (Flower's `partition_by` is the labels
    given to `partition_rows`; its `seed` is partition_rows' seed).

    Defaults are Flower's, except: `name` and `alpha` (Flower has none; 0.1 is the FedAFD paper's), and 0 for
    `num_shards_per_partition` and `shard_size`, which stands for Flower's None (computed from the other).
    `num_classes_per_partition` has no default in Flower; 2 is its docs' example.
    """

    name: str = "dirichlet"
    """One of PARTITIONERS."""
    alpha: float = 0.1
    """dirichlet: the concentration of Dirichlet(alpha, ..., alpha) over the partitions, drawn per class."""
    min_partition_size: int = 10
    """dirichlet: draw again until every partition holds at least this many rows."""
    self_balancing: bool = False
    """dirichlet: give no more of a class's rows to partitions already above the average size."""
    num_shards_per_partition: int = 0
    """shard: shards per partition (0: as many as shard_size allows)."""
    shard_size: int = 0
    """shard: rows per shard (0: len(labels) // (num_partitions * num_shards_per_partition))."""
    keep_incomplete_shard: bool = False
    """shard: also deal out the last, shorter shard (otherwise its rows go to no partition)."""
    num_classes_per_partition: int = 2
    """pathological: the classes each partition holds."""
    class_assignment_mode: str = "random"
    """pathological: random, deterministic (partition i: classes i, i+1, ...) or first-deterministic (class i
    first, the others at random; the paper's)."""
    shuffle: bool = True
    """iid: shuffle the rows with the seed before cutting them into contiguous runs, as FederatedDataset
    (shuffle=True) does before Flower's IidPartitioner; False: Flower's IidPartitioner on the rows as given. The
    other partitioners' shuffle (Flower's: the order of rows inside a partition) changes no row set, and
    partition_rows returns sorted rows."""

    def __post_init__(self) -> None:
        if self.name not in PARTITIONERS:
            raise ValueError(f"partitioner name must be one of {', '.join(PARTITIONERS)}, got {self.name!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        for key in ("min_partition_size", "num_shards_per_partition", "shard_size"):
            _check_int(key, getattr(self, key), 0)
        _check_int("num_classes_per_partition", self.num_classes_per_partition, 1)
        for key in ("self_balancing", "keep_incomplete_shard", "shuffle"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.class_assignment_mode not in CLASS_ASSIGNMENT_MODES:
            raise ValueError(f"class_assignment_mode must be one of {', '.join(CLASS_ASSIGNMENT_MODES)}, "
                             f"got {self.class_assignment_mode!r}")
        if self.name == "dirichlet_legacy" and self.self_balancing:
            raise ValueError("self_balancing is Flower's dirichlet's; dirichlet_legacy has none")

    def parameters(self) -> dict[str, object]:
        """The name and the fields this partitioner reads (what a split's record names it by)."""
        return {"name": self.name, **{key: getattr(self, key) for key in PARAMETERS[self.name]}}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _check_int(key: str, value: object, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise ValueError(f"{key} must be an integer >= {lowest}, got {value!r}")


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


def partition_rows(spec: PartitionerSpec, labels: np.ndarray, num_partitions: int, seed: int,
                   natural_ids: Sequence[str] | None = None) -> list[np.ndarray]:
    """Each partition's rows of `labels` by the named partitioner: one sorted int64 index array per partition,
    disjoint. Only iid, dirichlet, dirichlet_legacy and natural always cover every row; shard leaves out the
    rows of shards it does not deal (the incomplete last one without keep_incomplete_shard, and any beyond
    num_partitions * num_shards_per_partition), pathological the classes no partition draws.

    natural: one partition per distinct natural id, in sorted id order; num_partitions must equal their number.
    Deterministic given `seed`; bad parameters raise ValueError naming the parameter.
    """
    labels = _check_labels(labels)
    _check_int("num_partitions", num_partitions, 1)
    num_partitions = int(num_partitions)
    if spec.name == "natural":
        return _natural(labels, num_partitions, natural_ids)
    if spec.name == "iid":
        parts = _iid(len(labels), num_partitions, seed, spec.shuffle)
    elif spec.name == "dirichlet_legacy":
        return dirichlet_partition(labels, num_partitions, spec.alpha, seed, spec.min_partition_size)
    else:
        if num_partitions > len(labels):
            raise ValueError(f"num_partitions ({num_partitions}) must not exceed the number of rows ({len(labels)})")
        if spec.name == "dirichlet":
            parts = _dirichlet(labels, num_partitions, spec.alpha, spec.min_partition_size, spec.self_balancing, seed)
        elif spec.name == "shard":
            parts = _shard(labels, num_partitions, spec.num_shards_per_partition, spec.shard_size,
                           spec.keep_incomplete_shard, seed)
        else:
            parts = _pathological(labels, num_partitions, spec.num_classes_per_partition,
                                  spec.class_assignment_mode, seed)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _iid(num_rows: int, num_partitions: int, seed: int, shuffle: bool) -> list[np.ndarray]:
    """Contiguous runs of the (shuffled) rows, the first num_rows % num_partitions one row longer (Hugging
    Face's `Dataset.shard(contiguous=True)`; the shuffle is `Dataset.shuffle(seed)`'s permutation)."""
    order = np.random.default_rng(seed).permutation(num_rows) if shuffle else np.arange(num_rows)
    base, extra = divmod(num_rows, num_partitions)
    ends = np.cumsum([base + (1 if i < extra else 0) for i in range(num_partitions)])
    return np.split(order, ends[:-1])


def _dirichlet(labels: np.ndarray, num_partitions: int, alpha: float, min_size: int, self_balancing: bool,
               seed: int) -> list[np.ndarray]:
    """Flower's Dirichlet split: for each class in ascending order, p ~ Dirichlet(alpha) over the partitions
    (with self_balancing, zeroed for partitions already above num_rows / num_partitions and renormalised), and
    the class's rows in their order cut at floor(cumsum(p) * count). Unlike dirichlet_legacy the class's rows
    are not shuffled first, so the two give different splits for one seed. Drawn again, continuing the stream,
    until every partition holds min_size rows, FLOWER_DIRICHLET_ATTEMPTS draws at most."""
    rng = np.random.default_rng(seed)
    average = len(labels) / num_partitions
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_partitions, float(alpha))
    for _ in range(FLOWER_DIRICHLET_ATTEMPTS):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        sizes = np.zeros(num_partitions, np.int64)
        for members in by_class:
            proportions = rng.dirichlet(concentration)
            if self_balancing:
                proportions = np.where(sizes > average, 0.0, proportions)
                proportions = proportions / sum(proportions.tolist())  # left to right, as Flower sums them
            cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
            for partition, piece in enumerate(np.split(members, cuts)):
                shares[partition].append(piece)
                sizes[partition] += len(piece)
        if sizes.min() >= min_size:
            return [np.concatenate(s) for s in shares]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split in {FLOWER_DIRICHLET_ATTEMPTS} draws gave all {num_partitions} "
        f"partitions min_partition_size={min_size} rows: raise alpha, or lower min_partition_size or num_partitions")


def _shard(labels: np.ndarray, num_partitions: int, shards_each: int, shard_size: int, keep_incomplete: bool,
           seed: int) -> list[np.ndarray]:
    """Flower's shard split: the rows sorted by label (stably), cut into runs of shard_size, and a seeded
    permutation of the shards dealt out, num_shards_per_partition to each (without it: as many shards as there
    are, the first partitions one more)."""
    num_rows = len(labels)
    if shards_each and shard_size and shards_each * shard_size * num_partitions > num_rows:
        raise ValueError(f"shard_size ({shard_size}) * num_shards_per_partition ({shards_each}) * num_partitions "
                         f"({num_partitions}) exceeds the {num_rows} rows")
    if shards_each:
        used = num_partitions * shards_each
        counts = np.full(num_partitions, shards_each)
        if shard_size:
            usable = num_rows // shard_size
        else:
            shard_size = num_rows // used
            if shard_size == 0:
                raise ValueError(f"num_shards_per_partition ({shards_each}) * num_partitions ({num_partitions}) "
                                 f"exceeds the {num_rows} rows: no shard would hold a row")
            usable = math.ceil(num_rows / shard_size) if keep_incomplete else num_rows // shard_size
    else:
        if not shard_size:
            raise ValueError("shard needs num_shards_per_partition or shard_size (both are 0)")
        used = usable = math.ceil(num_rows / shard_size) if keep_incomplete else num_rows // shard_size
        counts = np.full(num_partitions, used // num_partitions)
        counts[:used - counts.sum()] += 1
    if usable < num_partitions:
        raise ValueError(f"shard_size {shard_size} gives {usable} shards of {num_rows} rows, fewer than "
                         f"num_partitions ({num_partitions}): lower shard_size or num_partitions")
    by_label = np.argsort(labels, kind="stable")
    chosen = np.random.default_rng(seed).permutation(usable)[:used]
    return [np.concatenate([by_label[s * shard_size:min((s + 1) * shard_size, num_rows)] for s in shards])
            for shards in np.split(chosen, np.cumsum(counts)[:-1])]


def _pathological(labels: np.ndarray, num_partitions: int, classes_each: int, mode: str,
                  seed: int) -> list[np.ndarray]:
    """Flower's pathological split: each partition is given classes_each of the classes (ascending class values,
    by class_assignment_mode), then each class's rows, in their order, are cut into as many near-equal runs
    (`np.array_split`) as partitions hold it, given out in partition order."""
    classes = np.unique(labels)
    num_classes = len(classes)
    if classes_each > num_classes:
        raise ValueError(f"num_classes_per_partition ({classes_each}) exceeds the {num_classes} classes present")
    rng = np.random.default_rng(seed)
    held: list[list[int]] = []  # per partition: positions in `classes`
    for partition in range(num_partitions):
        if mode == "first-deterministic":
            mine = [partition % num_classes]
            while len(mine) < classes_each:
                drawn = int(rng.choice(num_classes, size=1)[0])
                if drawn not in mine:
                    mine.append(drawn)
        elif mode == "deterministic":
            mine = [(partition + i) % num_classes for i in range(classes_each)]
        else:
            mine = [int(c) for c in rng.choice(num_classes, size=classes_each, replace=False)]
        held.append(mine)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for position, value in enumerate(classes):
        holders = [p for p in range(num_partitions) if position in held[p]]
        members = np.flatnonzero(labels == value)
        if len(holders) > len(members):
            raise ValueError(f"class {value} is held by {len(holders)} partitions but has {len(members)} rows: lower "
                             "num_partitions or num_classes_per_partition, or use class_assignment_mode "
                             "'deterministic'")
        if holders:
            for partition, piece in zip(holders, np.array_split(members, len(holders))):
                parts[partition].append(piece)
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]


def _natural(labels: np.ndarray, num_partitions: int, natural_ids: Sequence[str] | None) -> list[np.ndarray]:
    """One partition per distinct natural id (a writer, a user, a site), in sorted id order."""
    if natural_ids is None or len(natural_ids) == 0:
        raise ValueError("natural needs each row's natural id (the data config's natural_id_column)")
    if len(natural_ids) != len(labels):
        raise ValueError(f"natural_ids has {len(natural_ids)} rows, labels {len(labels)}")
    ids = sorted(set(natural_ids))
    if num_partitions != len(ids):
        raise ValueError(f"num_partitions ({num_partitions}) must equal the number of distinct natural ids "
                         f"({len(ids)}) for the natural partitioner")
    position = {natural_id: i for i, natural_id in enumerate(ids)}
    which = np.fromiter((position[n] for n in natural_ids), dtype=np.int64, count=len(natural_ids))
    return [np.flatnonzero(which == i).astype(np.int64) for i in range(len(ids))]
