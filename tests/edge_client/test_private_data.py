"""A device's rows: its own data exactly as given, or its share of a pool, capped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedafd.edge_client.private_data import load_private_data
from fedafd.runtime.config import ClientConfig, build_config


def _pool(tmp_path: Path) -> Path:
    """50 train and 10 test pictures of two classes, each picture's pixels its row number."""
    rows = np.arange(60, dtype=np.uint8)[:, None, None].repeat(8, 1).repeat(8, 2)  # (60, 8, 8)
    np.savez(tmp_path / "pool.npz", x_train=rows[:50], y_train=np.arange(50) % 2, x_test=rows[50:],
             y_test=np.arange(10) % 2)
    return tmp_path / "pool.npz"


def test_a_device_given_its_own_data_holds_exactly_those_rows_whatever_the_caps(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "cache"))
    config = build_config(ClientConfig, dict(kind="image", data=str(_pool(tmp_path)), max_private=20, max_test=5))
    private = load_private_data(config)
    assert (len(private.train), len(private.test)) == (50, 10)
    # the rows as written, in order: picture i's pixels are i
    assert private.train.inputs["image"][0][:, 0, 16, 16].tolist() == list(range(50))


def test_a_device_of_a_pool_holds_its_capped_share(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "cache"))
    pool = str(_pool(tmp_path))
    shares = [load_private_data(build_config(ClientConfig, dict(
        kind="image", data=pool, partition=i, num_partitions=2, partitioner="iid", max_private=20, max_test=5)))
        for i in range(2)]
    train = [set(s.train.inputs["image"][0][:, 0, 16, 16].tolist()) for s in shares]
    assert [len(t) for t in train] == [20, 20] and not train[0] & train[1]  # capped, disjoint
    assert [len(s.test) for s in shares] == [5, 5]
