"""The real data sets, prepared once into arrays: images in the one image format (uint8 (N, 3, 32, 32)),
texts through the one tokenizer (int64 (N, MAX_TEXT_LEN)).

| loader | Debian package | rows | stands in for |
|---|---|---|---|
| load_fashion_mnist | dataset-fashion-mnist | 60,000 train / 10,000 test, 10 classes | CIFAR-100 |
| load_wordnet_topics | wordnet-base | 39,195 train / 9,799 test glosses, 8 topics | AG News |
| load_emoji_pairs | fonts-noto-color-emoji, unicode-data | 1,496 train (public set P) / 374 test | MS-COCO |
| load_tuxpaint_pairs | tuxpaint-stamps-default | 760 train / 190 test, 16 categories | Flickr30k |

One module per data set parses its packaged files (see fetch.py), renders or rasterises its images and
tokenizes its texts; prepared.py holds the array classes and caches both splits once prepared. This
module lists them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedafd.runtime.data.emoji import load_emoji_pairs
from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.fetch import fetch
from fedafd.runtime.data.prepared import SPLITS, ImageClassData, PairData, TextClassData, stratified_split
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs
from fedafd.runtime.data.wordnet import load_wordnet_topics

PUBLIC = "public"
"""What the public image-text set serves (the device kinds serve the others)."""


@dataclass(frozen=True)
class DataSet:
    name: str
    """Its name in the cache files (prepared arrays, backbone features)."""
    load: Callable[[str], ImageClassData | TextClassData | PairData]
    """Its prepared arrays of a split."""
    serves: str
    """The device kind whose task it is (image, text, multimodal), or PUBLIC."""


CATALOGUE = (
    DataSet("fashion_mnist", load_fashion_mnist, "image"),  # for CIFAR-100
    DataSet("wordnet", load_wordnet_topics, "text"),  # for AG News
    DataSet("emoji", load_emoji_pairs, PUBLIC),  # for MS-COCO, the public set P
    DataSet("tuxpaint", load_tuxpaint_pairs, "multimodal"),  # for Flickr30k
)
"""Every data set, the one place that says which serves what (docs/data.md)."""
LOADERS = {dataset.name: dataset.load for dataset in CATALOGUE}


TASK_POOL: dict[str, dict[str, int]] = {"image": {"train": 12_000, "test": 2_000},
                                        "text": {"train": 8_000, "test": 2_000}}
"""Rows a federation draws from the two large task sets: a fixed subset, stratified by class. Their
backbone features are computed once and cached (all 70,000 Fashion-MNIST images would take minutes
on a 2-core CPU), and an edge device holds a few hundred samples anyway."""


def pool_rows(labels: np.ndarray, size: int) -> np.ndarray:
    """Sorted rows of a fixed class-stratified subset of `size` rows (all rows when there are fewer)."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, chosen = stratified_split(labels, test_fraction=size / len(labels))
    return chosen


def dataset_for(serves: str) -> DataSet:
    """The data set of a device kind, or of PUBLIC."""
    for dataset in CATALOGUE:
        if dataset.serves == serves:
            return dataset
    raise ValueError(f"kind must be image, text or multimodal, got {serves!r}")


def prepare_all(log: Callable[[str], object] = print) -> None:
    """Fetch whatever Debian package is missing (see fetch.fetch), then prepare every data set's cached
    arrays. Idempotent; what is already prepared is only read back."""
    fetch(log=log)
    for name, loader in LOADERS.items():
        start = time.perf_counter()
        sizes = {split: len(loader(split)) for split in SPLITS}
        log(f"{name}: {sizes['train']} train / {sizes['test']} test ({time.perf_counter() - start:.1f} s)")
