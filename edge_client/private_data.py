"""A device's private data: the rows it trains and tests on.

Three cases, one path: a device given its own data (`data`, one device) holds exactly those rows; a device
of a pool (`data` with num_partitions > 1, as `serve --local` and `simulate` start them) takes its share
of the pool's train rows by the partitioner; a device given nothing takes its share of its kind's
bundled set (today's demo). Shares of a pool are capped at max_private / max_test; a device's own data
is not.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from fedafd.runtime.config import ClientConfig, PartitionKeys
from fedafd.runtime.data.modal import ModalData, read_only, rows_view
from fedafd.runtime.data.partition import PartitionerSpec, cap_indices
from fedafd.runtime.data.sources.options import DataOptions, load_options
from fedafd.runtime.data.sources.build import Data
from fedafd.runtime.data.sources.registry import DEMO_DEFAULTS, Source, open_source, partition_data, train_test


@dataclass(frozen=True)
class PrivateData:
    train: ModalData
    test: ModalData
    skipped: int = 0
    """Bad rows left out (on_bad_sample=skip), reported in the round's metrics."""

    @property
    def num_classes(self) -> int:
        return len(self.train.class_names)


@dataclass(frozen=True)
class DataSpec:
    """Where a device's rows come from, as its config says (hashable: one read per process)."""

    kind: str
    location: str
    options: DataOptions
    test_location: str = ""
    test_fraction: float = 0.2
    on_bad_sample: str = "error"

    @property
    def own(self) -> bool:
        return bool(self.location)


def data_spec(config: ClientConfig) -> DataSpec:
    options = load_options(config.data_config, format=config.data_format if config.data_format != "auto" else None)
    return DataSpec(config.kind, config.data, options, config.test_data, config.test_fraction, config.on_bad_sample)


def partitioner_spec(config: ClientConfig) -> PartitionerSpec:
    keys = {field.name: getattr(config, field.name) for field in dataclasses.fields(PartitionKeys)}
    return PartitionerSpec(name=keys.pop("partitioner"), alpha=config.alpha, **keys)


def load_private_data(config: ClientConfig, backbones: tuple[str, ...] = ()) -> PrivateData:
    """The device's (train, test) rows, as its config says, with the named backbones' cached features."""
    spec = data_spec(config)
    train, test, skipped = _rows(spec, config.seed, backbones)
    if spec.own and config.num_partitions == 1:
        return PrivateData(train, test, skipped)
    shares = _shares(spec, partitioner_spec(config), config.num_partitions, config.seed)
    mine = cap_indices(shares[config.partition], config.max_private, config.seed + 1 + config.partition)
    return PrivateData(train.select(mine), _capped_test(spec, config.max_test, config.seed, backbones), skipped)


@functools.lru_cache(maxsize=None)
def _source_rows(spec: DataSpec, seed: int) -> tuple[Source, Data, Source, Data]:
    """(source, its train rows, the test rows' source, the test rows), read once per process."""
    source = open_source(spec.kind, spec.location or DEMO_DEFAULTS[spec.kind], spec.options, spec.on_bad_sample)
    test_source = (open_source(spec.kind, spec.test_location, spec.options, spec.on_bad_sample)
                   if spec.test_location else None)
    train, test = train_test(source, spec.options, test_source, spec.test_fraction, seed)
    return source, train, test_source or source, test


@functools.lru_cache(maxsize=None)
def _rows(spec: DataSpec, seed: int, backbones: tuple[str, ...]) -> tuple[ModalData, ModalData, int]:
    """The train and test rows of a spec's source as training reads them, shared read-only (a simulation's
    devices of one pool share them), and the bad rows skipped."""
    source, train, test_source, test = _source_rows(spec, seed)
    skipped = source.skipped + (test_source.skipped if test_source is not source else 0)
    return rows_view(train, "train", backbones), rows_view(test, "test", backbones), skipped


@functools.lru_cache(maxsize=None)
def _shares(spec: DataSpec, partitioner: PartitionerSpec, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Every device's rows of the pool's train rows: the same split for all of them, drawn once per process."""
    return partition_data(_source_rows(spec, seed)[1], partitioner, num_partitions, seed)


@functools.lru_cache(maxsize=None)
def _capped_test(spec: DataSpec, max_test: int, seed: int, backbones: tuple[str, ...]) -> ModalData:
    """The test rows every device of a pool evaluates on: the same for all of them, one read-only copy per
    process. Pairs are capped by picture, so a picture keeps all its captions."""
    test = _rows(spec, seed, backbones)[1]
    pictures = test.picture_ids()
    ids = np.unique(pictures)
    if len(ids) == len(pictures):
        return read_only(test.select(cap_indices(np.arange(len(test)), max_test, seed)))
    kept = cap_indices(ids, max_test, seed)
    return read_only(test.select(np.flatnonzero(np.isin(pictures, kept))))

