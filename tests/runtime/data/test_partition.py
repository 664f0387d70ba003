"""Dirichlet non-IID partitions and capped subsets: determinism, coverage, skew, argument checks."""

import numpy as np
import pytest

from fedafd.runtime.data.partition import cap_indices, dirichlet_partition

LABELS = np.repeat(np.arange(10), 600)  # 10 balanced classes, 6000 rows


def _classes_per_client(parts: list[np.ndarray]) -> float:
    return float(np.mean([len(np.unique(LABELS[p])) for p in parts]))


def _top_class_share(parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(LABELS[p]).max() / len(p) for p in parts]))


def test_partition_is_deterministic_disjoint_sorted_and_covering():
    parts = dirichlet_partition(LABELS, num_clients=7, alpha=0.5, seed=3)
    again = dirichlet_partition(LABELS, num_clients=7, alpha=0.5, seed=3)
    other = dirichlet_partition(LABELS, num_clients=7, alpha=0.5, seed=4)

    assert len(parts) == 7
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(parts, other))
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))  # disjoint and covering
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


def test_every_client_gets_min_size():
    parts = dirichlet_partition(LABELS, num_clients=20, alpha=0.1, seed=0, min_size=50)
    assert min(len(p) for p in parts) >= 50


def test_low_alpha_is_more_skewed_than_high_alpha():
    # Measured over 3 seeds: alpha=0.1 gives 5.2-5.7 classes per client (many with a handful of rows),
    # alpha=100 all 10; the largest class holds most of a client's rows only at low alpha.
    for seed in range(3):
        low = dirichlet_partition(LABELS, 10, alpha=0.1, seed=seed)
        high = dirichlet_partition(LABELS, 10, alpha=100.0, seed=seed)
        assert _classes_per_client(low) < 7 < _classes_per_client(high) == 10
        assert _top_class_share(low) > 0.4 > 0.2 > _top_class_share(high)


def test_one_client_gets_everything():
    (only,) = dirichlet_partition(LABELS, 1, alpha=1.0, seed=0)
    assert np.array_equal(only, np.arange(len(LABELS)))


def test_category_groups_work_like_labels():
    groups = np.array([0] * 30 + [1] * 3 + [2] * 67)  # uneven categories, as with Tux Paint folders
    parts = dirichlet_partition(groups, 4, alpha=1.0, seed=1, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 2.5}, "num_clients"),
        ({"min_size": -1}, "min_size"),
        ({"num_clients": 700, "min_size": 10}, "min_size"),  # 6000 rows < 700 * 10
    ],
)
def test_bad_arguments_name_the_argument(kwargs, named):
    args = {"labels": LABELS, "num_clients": 5, "alpha": 0.5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=named):
        dirichlet_partition(**args)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="1-D"):
        dirichlet_partition(LABELS.reshape(60, 100), 5, 0.5, 0)
    with pytest.raises(ValueError, match="integers"):
        dirichlet_partition(LABELS.astype(np.float32), 5, 0.5, 0)


def test_unreachable_min_size_gives_up_and_says_what_to_change():
    # 40 rows in 2 classes over 4 clients at alpha=0.01: nearly every draw gives a class to one client
    with pytest.raises(ValueError, match="raise alpha, or lower min_size or num_clients"):
        dirichlet_partition(np.repeat([0, 1], 20), 4, alpha=0.01, seed=0, min_size=10)


def test_cap_indices_subsamples_sorted_and_seeded():
    indices = np.arange(100, 200)
    capped = cap_indices(indices, 10, seed=5)
    assert len(capped) == 10 and capped.dtype == np.int64
    assert np.all(np.diff(capped) > 0) and set(capped) <= set(indices)
    assert np.array_equal(capped, cap_indices(indices, 10, seed=5))
    assert not np.array_equal(capped, cap_indices(indices, 10, seed=6))


def test_cap_indices_without_cap_or_below_it_keeps_everything_sorted():
    shuffled = np.array([5, 3, 9, 1])
    assert cap_indices(shuffled, 0, seed=0).tolist() == [1, 3, 5, 9]
    assert cap_indices(shuffled, 10, seed=0).tolist() == [1, 3, 5, 9]


def test_cap_indices_refuses_negative_size():
    with pytest.raises(ValueError, match="max_size"):
        cap_indices(np.arange(5), -1, seed=0)
