"""Flower Datasets' partitioners in numpy: the same row sets as Flower's own (goldens written by
make_flower_partitions.py with flwr-datasets 0.6.1), their properties over random labels, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedafd.runtime.data.partition import (
    PARTITIONERS, PartitionerSpec, dirichlet_partition, partition_rows,
)

GOLDEN = json.loads((Path(__file__).with_name("flower_partitions.json")).read_text())
LABELS = np.array(GOLDEN["labels"], dtype=np.int64)
NATURAL_IDS = GOLDEN["natural_ids"]
CASES = GOLDEN["cases"]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _case_id(case: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in case["params"].items())
    return f"{case['name']}-P{case['num_partitions']}-s{case['seed']}-{params}"


def _partition(case: dict) -> list[np.ndarray]:
    return partition_rows(PartitionerSpec(name=case["name"], **case["params"]), LABELS, case["num_partitions"],
                          case["seed"], NATURAL_IDS)


# --- parity with Flower ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_same_row_sets_as_flower(case: dict) -> None:
    if "error" in case:  # Flower refuses this setting (min_partition_size never met): so do we
        with pytest.raises(ValueError, match="min_partition_size"):
            _partition(case)
        return

    ours = _partition(case)

    assert [p.tolist() for p in ours] == case["partitions"]
    assert all(p.dtype == np.int64 for p in ours)


def test_goldens_cover_every_partitioner_but_the_legacy_one() -> None:
    assert {c["name"] for c in CASES} == set(PARTITIONERS) - {"dirichlet_legacy"}


def test_flowers_dirichlet_is_not_the_legacy_split() -> None:
    # Flower cuts each class's rows in their order; dirichlet_legacy shuffles them first (and continues the
    # stream differently), so one seed gives other row sets. The demo keeps the legacy split.
    plain = [c for c in CASES
             if c["name"] == "dirichlet" and "error" not in c and not c["params"].get("self_balancing")]
    assert plain
    for case in plain:
        legacy = dirichlet_partition(LABELS, case["num_partitions"], case["params"]["alpha"], case["seed"],
                                     case["params"]["min_partition_size"])
        assert [p.tolist() for p in legacy] != case["partitions"]


def test_dirichlet_legacy_is_todays_dirichlet_partition() -> None:
    spec = PartitionerSpec(name="dirichlet_legacy", alpha=0.3, min_partition_size=5)

    ours = partition_rows(spec, LABELS, 6, 4)

    expected = dirichlet_partition(LABELS, 6, 0.3, 4, min_size=5)
    assert [p.tolist() for p in ours] == [p.tolist() for p in expected]


# --- properties --------------------------------------------------------------------------------


@st.composite
def label_arrays(draw: st.DrawFn, min_rows: int = 20, max_rows: int = 300) -> np.ndarray:
    num_classes = draw(st.integers(1, 8))
    rows = draw(st.integers(min_rows, max_rows))
    seed = draw(st.integers(0, 2**31 - 1))
    weights = np.random.default_rng(seed).dirichlet(np.ones(num_classes))
    return np.random.default_rng(seed + 1).choice(num_classes, size=rows, p=weights).astype(np.int64)


def _assert_disjoint_sorted(parts: list[np.ndarray], num_rows: int) -> np.ndarray:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a row in two partitions"
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    assert joined.size == 0 or (joined.min() >= 0 and joined.max() < num_rows)
    return np.sort(joined)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@PROPERTY
@given(label_arrays(), st.integers(1, 9), st.integers(0, 1000), st.booleans())
def test_iid_covers_with_sizes_one_apart(labels: np.ndarray, num_partitions: int, seed: int, shuffle: bool) -> None:
    spec = PartitionerSpec(name="iid", shuffle=shuffle)

    parts = partition_rows(spec, labels, num_partitions, seed)

    assert np.array_equal(_assert_disjoint_sorted(parts, len(labels)), np.arange(len(labels)))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert _same(parts, partition_rows(spec, labels, num_partitions, seed))


@PROPERTY
@given(label_arrays(), st.integers(1, 6), st.integers(0, 1000), st.sampled_from([0.1, 0.5, 2.0, 50.0]),
       st.integers(0, 12), st.booleans())
def test_dirichlet_covers_and_honours_min_partition_size(labels: np.ndarray, num_partitions: int, seed: int,
                                                         alpha: float, min_size: int, balancing: bool) -> None:
    spec = PartitionerSpec(name="dirichlet", alpha=alpha, min_partition_size=min_size, self_balancing=balancing)
    try:
        parts = partition_rows(spec, labels, num_partitions, seed)
    except ValueError as err:  # 11 draws without every partition reaching min_size: refused, as Flower does
        assert "min_partition_size" in str(err) or "num_partitions" in str(err)
        return

    assert len(parts) == num_partitions
    assert np.array_equal(_assert_disjoint_sorted(parts, len(labels)), np.arange(len(labels)))
    assert min(map(len, parts)) >= min_size
    assert _same(parts, partition_rows(spec, labels, num_partitions, seed))
    if balancing:  # a partition takes rows only while at or under the average: one class at most beyond it
        assert max(map(len, parts)) <= len(labels) / num_partitions + np.bincount(labels).max()


@PROPERTY
@given(label_arrays(min_rows=40), st.integers(1, 6), st.integers(0, 1000), st.integers(0, 3), st.integers(0, 12),
       st.booleans())
def test_shard_deals_whole_shards(labels: np.ndarray, num_partitions: int, seed: int, shards_each: int,
                                  shard_size: int, keep_incomplete: bool) -> None:
    spec = PartitionerSpec(name="shard", num_shards_per_partition=shards_each, shard_size=shard_size,
                           keep_incomplete_shard=keep_incomplete)
    try:
        parts = partition_rows(spec, labels, num_partitions, seed)
    except ValueError as err:
        assert "shard" in str(err) or "num_partitions" in str(err)
        return

    covered = _assert_disjoint_sorted(parts, len(labels))
    by_label = np.argsort(labels, kind="stable")
    position = np.empty(len(labels), np.int64)
    position[by_label] = np.arange(len(labels))
    size = shard_size or len(labels) // (num_partitions * shards_each)
    for part in parts:  # whole runs of the label-sorted rows, each within one shard
        shards = np.unique(position[part] // size)
        assert sum(min(size, len(labels) - s * size) for s in shards) == len(part)
        if shards_each:
            assert len(shards) == shards_each
    if shards_each == 0 and keep_incomplete:  # only then does shard promise every row
        assert np.array_equal(covered, np.arange(len(labels)))
    assert _same(parts, partition_rows(spec, labels, num_partitions, seed))


@PROPERTY
@given(label_arrays(min_rows=60), st.integers(1, 12), st.integers(0, 1000), st.integers(1, 3),
       st.sampled_from(["random", "deterministic", "first-deterministic"]))
def test_pathological_gives_each_partition_its_classes(labels: np.ndarray, num_partitions: int, seed: int,
                                                       classes_each: int, mode: str) -> None:
    spec = PartitionerSpec(name="pathological", num_classes_per_partition=classes_each, class_assignment_mode=mode)
    try:
        parts = partition_rows(spec, labels, num_partitions, seed)
    except ValueError as err:
        assert "num_classes_per_partition" in str(err) or "num_partitions" in str(err)
        return

    covered = _assert_disjoint_sorted(parts, len(labels))
    assert all(len(np.unique(labels[p])) == classes_each for p in parts)
    held = np.unique(np.concatenate([labels[p] for p in parts]))
    assert np.array_equal(covered, np.flatnonzero(np.isin(labels, held)))  # a class held is dealt out whole
    if mode == "first-deterministic" and num_partitions >= len(np.unique(labels)):
        assert np.array_equal(covered, np.arange(len(labels)))
    assert _same(parts, partition_rows(spec, labels, num_partitions, seed))


@PROPERTY
@given(st.lists(st.sampled_from(["ann", "bob", "cy", "dee", "eve"]), min_size=1, max_size=80))
def test_natural_is_one_partition_per_id_in_sorted_order(ids: list[str]) -> None:
    distinct = sorted(set(ids))

    parts = partition_rows(PartitionerSpec(name="natural"), np.zeros(len(ids), np.int64), len(distinct), 0, ids)

    assert np.array_equal(_assert_disjoint_sorted(parts, len(ids)), np.arange(len(ids)))
    assert [{ids[i] for i in p} for p in parts] == [{d} for d in distinct]


@pytest.mark.parametrize("spec", [
    PartitionerSpec(name="iid"),
    PartitionerSpec(name="dirichlet", alpha=0.5, min_partition_size=5),
    PartitionerSpec(name="dirichlet", alpha=0.5, min_partition_size=5, self_balancing=True),
    PartitionerSpec(name="dirichlet_legacy", alpha=0.5, min_partition_size=5),
    PartitionerSpec(name="shard", num_shards_per_partition=2),
    PartitionerSpec(name="pathological", num_classes_per_partition=2),
    PartitionerSpec(name="pathological", num_classes_per_partition=2, class_assignment_mode="first-deterministic"),
], ids=lambda s: f"{s.name}-{s.class_assignment_mode if s.name == 'pathological' else s.self_balancing}")
def test_random_partitioners_change_with_the_seed(spec: PartitionerSpec) -> None:
    first = partition_rows(spec, LABELS, 5, 0)

    assert all(not _same(first, partition_rows(spec, LABELS, 5, seed)) for seed in (1, 2, 3))
    assert _same(first, partition_rows(spec, LABELS, 5, 0))


def test_self_balancing_evens_the_sizes_out() -> None:
    # Over 10 seeds, the largest partition is much nearer the average with self_balancing (Flower's intent).
    def spread(balancing: bool) -> float:
        spec = PartitionerSpec(name="dirichlet", alpha=0.3, min_partition_size=0, self_balancing=balancing)
        return float(np.mean([max(map(len, partition_rows(spec, LABELS, 8, s))) for s in range(10)]))

    assert spread(True) < spread(False)
    assert spread(True) < 1.6 * len(LABELS) / 8


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, parameter", [
    ({"name": "dirichlett"}, "name"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
    ({"min_partition_size": -1}, "min_partition_size"),
    ({"num_shards_per_partition": -2}, "num_shards_per_partition"),
    ({"shard_size": 1.5}, "shard_size"),
    ({"num_classes_per_partition": 0}, "num_classes_per_partition"),
    ({"class_assignment_mode": "round-robin"}, "class_assignment_mode"),
    ({"self_balancing": "yes"}, "self_balancing"),
    ({"name": "dirichlet_legacy", "self_balancing": True}, "self_balancing"),
])
def test_bad_spec_names_the_parameter(values: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        PartitionerSpec(**values)


@pytest.mark.parametrize("spec, num_partitions, parameter", [
    (PartitionerSpec(name="iid"), 0, "num_partitions"),
    (PartitionerSpec(name="dirichlet"), len(LABELS) + 1, "num_partitions"),
    (PartitionerSpec(name="dirichlet", min_partition_size=len(LABELS)), 2, "min_partition_size"),
    (PartitionerSpec(name="shard"), 4, "shard_size"),
    (PartitionerSpec(name="shard", shard_size=200), 4, "shard_size"),
    (PartitionerSpec(name="shard", shard_size=50, num_shards_per_partition=3), 4, "num_shards_per_partition"),
    (PartitionerSpec(name="pathological", num_classes_per_partition=11), 4, "num_classes_per_partition"),
    (PartitionerSpec(name="pathological", num_classes_per_partition=10, class_assignment_mode="deterministic"), 400,
     "num_partitions"),
])
def test_impossible_partitions_name_the_parameter(spec: PartitionerSpec, num_partitions: int, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        partition_rows(spec, LABELS, num_partitions, 0)


def test_natural_needs_ids_and_their_number() -> None:
    spec = PartitionerSpec(name="natural")
    with pytest.raises(ValueError, match="natural_id_column"):
        partition_rows(spec, LABELS, 9, 0)
    with pytest.raises(ValueError, match=r"num_partitions \(4\).*natural ids \(9\)"):
        partition_rows(spec, LABELS, 4, 0, NATURAL_IDS)
    with pytest.raises(ValueError, match="natural_ids has 3 rows"):
        partition_rows(spec, LABELS, 1, 0, ["a", "b", "c"])


def test_labels_must_be_a_1d_integer_array() -> None:
    with pytest.raises(ValueError, match="1-D"):
        partition_rows(PartitionerSpec(name="iid"), np.zeros((4, 2), np.int64), 2, 0)
    with pytest.raises(ValueError, match="integers"):
        partition_rows(PartitionerSpec(name="iid"), np.zeros(4), 2, 0)


def test_parameters_name_only_what_the_partitioner_reads() -> None:
    spec = PartitionerSpec(name="shard", shard_size=25, alpha=0.7)

    assert spec.parameters() == {"name": "shard", "num_shards_per_partition": 0, "shard_size": 25,
                                 "keep_incomplete_shard": False}
