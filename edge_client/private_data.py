"""A device's private data: its non-IID share of the task's train split, and the task's test split."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedafd.runtime.data.modal import ModalData, load_task_data, read_only
from fedafd.runtime.data.partition import cap_indices, dirichlet_partition


@dataclass(frozen=True)
class PrivateData:
    train: ModalData
    test: ModalData

    @property
    def num_classes(self) -> int:
        return len(self.train.class_names)


def load_private_data(kind: str, partition: int, num_partitions: int, alpha: float, seed: int,
                      max_private: int, max_test: int, min_size: int = 10, backbones: tuple[str, ...] = ()
                      ) -> PrivateData:
    """Dirichlet(alpha) over labels (multimodal: over category folders), the same split on every device
    of this kind given the same seed, then capped to `max_private` samples; the test split is shared.
    `backbones`: whose cached features to attach."""
    train = load_task_data(kind, "train", backbones)
    shares = _shares(kind, num_partitions, alpha, seed, min_size)
    mine = cap_indices(shares[partition], max_private, seed + 1 + partition)
    return PrivateData(train=train.select(mine), test=_test_split(kind, max_test, seed, backbones))


@functools.lru_cache(maxsize=None)
def _shares(kind: str, num_partitions: int, alpha: float, seed: int, min_size: int) -> list[np.ndarray]:
    """Every device's rows of the kind's train split: the same split for all of them, drawn once per process."""
    labels = load_task_data(kind, "train").labels
    assert labels is not None
    return dirichlet_partition(labels, num_partitions, alpha, seed, min_size=min_size)


@functools.lru_cache(maxsize=None)
def _test_split(kind: str, max_test: int, seed: int, backbones: tuple[str, ...]) -> ModalData:
    """The test rows every device of `kind` evaluates on: the same for all of them, so one read-only copy
    per process (a simulation's devices share it)."""
    test = load_task_data(kind, "test", backbones)
    return read_only(test.select(cap_indices(np.arange(len(test)), max_test, seed)))

