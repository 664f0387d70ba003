"""One view over every data set: arrays grouped by modality, so training code never branches on the data set."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from fedafd.runtime.data.emoji import load_emoji_pairs
from fedafd.runtime.data.fashion_mnist import load_fashion_mnist
from fedafd.runtime.data.prepared import ImageClassData, PairData, TextClassData, stratified_split
from fedafd.runtime.data.tuxpaint import load_tuxpaint_pairs
from fedafd.runtime.data.wordnet import load_wordnet_topics


RAW = "raw"
"""The input view of encoders trained from scratch: pixels or token ids (the other views are backbones)."""


@dataclass(frozen=True)
class ModalData:
    """inputs['image'] = (images uint8 (N,3,32,32),); inputs['text'] = (input_ids, attention_mask) int64 (N,L).
    features[backbone] = float32 (N, D): the frozen backbone's cached features of the same rows."""

    inputs: dict[str, tuple[np.ndarray, ...]]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    features: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()))
        return len(first[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def select(self, indices: np.ndarray) -> "ModalData":
        indices = np.asarray(indices, dtype=np.int64)
        return ModalData(
            inputs={m: tuple(array[indices] for array in arrays) for m, arrays in self.inputs.items()},
            labels=None if self.labels is None else self.labels[indices],
            class_names=self.class_names,
            features={name: array[indices] for name, array in self.features.items()},
        )

    def batch(self, modality: str, indices: torch.Tensor | np.ndarray | slice, device: torch.device,
              view: str = RAW) -> tuple[torch.Tensor, ...]:
        """Tensors for an encoder of `modality` that reads `view`: images as float in [0,1], token ids as
        int64 (RAW), or the named backbone's cached features as float32 (B, D)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        if view != RAW:
            if view not in self.features:
                raise KeyError(f"no cached {view} features for this data set (have: {sorted(self.features)})")
            return (torch.from_numpy(np.ascontiguousarray(self.features[view][indices])).to(device, torch.float32),)
        arrays = [array[indices] for array in self.inputs[modality]]
        if modality == "image":
            return (torch.from_numpy(np.ascontiguousarray(arrays[0])).to(device, torch.float32).div_(255.0),)
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device, torch.int64) for a in arrays)

    def label_batch(self, indices: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
        assert self.labels is not None, "this data set has no labels"
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        return torch.from_numpy(np.ascontiguousarray(self.labels[indices])).to(device, torch.int64)


def from_image_classes(data: ImageClassData) -> ModalData:
    return ModalData({"image": (data.images,)}, data.labels, tuple(data.class_names))


def from_text_classes(data: TextClassData) -> ModalData:
    return ModalData({"text": (data.input_ids, data.attention_mask)}, data.labels, tuple(data.class_names))


def from_pairs(data: PairData) -> ModalData:
    """Row i's image and caption are a matched pair; `labels` carries the category for partitioning."""
    return ModalData(
        {"image": (data.images,), "text": (data.input_ids, data.attention_mask)},
        data.groups,
        tuple(data.group_names),
    )


TASK_POOL: dict[str, dict[str, int]] = {"image": {"train": 12_000, "test": 2_000},
                                        "text": {"train": 8_000, "test": 2_000}}
"""Rows a federation draws from the two large task sets: a fixed subset, stratified by class. Their
backbone features are computed once and cached (all 70,000 Fashion-MNIST images would take minutes
on a 2-core CPU), and an edge device holds a few hundred samples anyway."""


def read_only(data: ModalData) -> ModalData:
    """`data` with every array marked read-only: loaded once per process and shared by whoever asks (the
    server and every device of a simulation), so none of them may write into it."""
    for array in [*(a for arrays in data.inputs.values() for a in arrays), *data.features.values(), data.labels]:
        if array is not None:
            array.setflags(write=False)
    return data


@functools.lru_cache(maxsize=None)
def load_task_data(kind: str, split: str, backbones: tuple[str, ...] = ()) -> ModalData:
    """A device kind's task data set (the device takes its share): what stands in for the paper's data
    sets is in the README's data section. Fashion-MNIST and WordNet are cut to their TASK_POOL rows.
    Loaded once per process and shared read-only."""
    if kind == "image":
        data = from_image_classes(load_fashion_mnist(split))  # for CIFAR-100
    elif kind == "text":
        data = from_text_classes(load_wordnet_topics(split))  # for AG News
    elif kind == "multimodal":
        data = from_pairs(load_tuxpaint_pairs(split))  # for Flickr30k
    else:
        raise ValueError(f"kind must be image, text or multimodal, got {kind!r}")
    if kind in TASK_POOL:
        data = data.select(pool_rows(data.labels, TASK_POOL[kind][split]))
    return read_only(with_backbone_features(data, f"{DATASET_OF_KIND[kind]}-{split}", backbones))


def pool_rows(labels: np.ndarray, size: int) -> np.ndarray:
    """Sorted rows of a fixed class-stratified subset of `size` rows (all rows when there are fewer)."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, chosen = stratified_split(labels, test_fraction=size / len(labels))
    return chosen


@functools.lru_cache(maxsize=None)
def load_public_data(split: str = "train", backbones: tuple[str, ...] = ()) -> ModalData:
    """The public image-text set (emoji pictures with their names): split "train" is P, which the server
    and every device hold; "test" is the server's held-out retrieval split. Loaded once per process and
    shared read-only."""
    return read_only(with_backbone_features(from_pairs(load_emoji_pairs(split)), f"{PUBLIC_DATASET}-{split}", backbones))


DATASET_OF_KIND = {"image": "fashion_mnist", "text": "wordnet", "multimodal": "tuxpaint"}
"""The name of each kind's task set in the feature cache's file names."""
PUBLIC_DATASET = "emoji"


def with_backbone_features(data: ModalData, dataset: str, backbones: tuple[str, ...]) -> ModalData:
    """`data` with the cached features of each named backbone attached (computed once, then read from
    the feature cache)."""
    if not backbones:
        return data
    from fedafd.runtime.data.features import backbone_features

    features = dict(data.features)
    for name in backbones:
        features[name] = backbone_features(name, dataset, data)
    return ModalData(data.inputs, data.labels, data.class_names, features)
