"""ModalData: one view over every data set, arrays grouped by modality, so training code never branches on the
data set (runtime/data/modal.py loads them into it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedafd.runtime.data.pictures import Pictures


INPUTS_PREFIX = "inputs:"
"""`inputs:NAME`: the view of an encoder that runs the user tower NAME itself (a finetune tower): its own inputs."""
RAW = "raw"
"""The input view of encoders trained from scratch: pixels or token ids (the other views are backbones)."""


@dataclass(frozen=True)
class ModalData:
    """inputs['image'] = (images uint8 (N,3,32,32),); inputs['text'] = (input_ids, attention_mask) int64 (N,L).
    features[backbone] = float32 (N, D): the frozen backbone's cached features of the same rows.
    image_ids: image-text pairs only, int64 (N,): rows with one id show one picture (one row per caption)."""

    inputs: dict[str, tuple[np.ndarray, ...]]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    features: dict[str, np.ndarray] = field(default_factory=dict)
    image_ids: np.ndarray | None = None
    texts: tuple[str, ...] | None = None
    """Row i's raw text (a text class's text, a pair's caption), for towers with their own tokenizer; None: none."""
    pictures: Pictures | None = None
    """Row i's picture at source resolution (pictures.py), for towers with their own input size; None: none kept."""

    def __len__(self) -> int:
        first = next(iter(self.inputs.values()))
        return len(first[0])

    def select(self, indices: np.ndarray) -> "ModalData":
        indices = np.asarray(indices, dtype=np.int64)
        return ModalData(
            inputs={m: tuple(array[indices] for array in arrays) for m, arrays in self.inputs.items()},
            labels=None if self.labels is None else self.labels[indices],
            class_names=self.class_names,
            features={name: array[indices] for name, array in self.features.items()},
            image_ids=None if self.image_ids is None else self.image_ids[indices],
            texts=None if self.texts is None else tuple(self.texts[i] for i in indices),
            pictures=None if self.pictures is None else self.pictures.select(indices),
        )

    def picture_ids(self) -> np.ndarray:
        """Each row's picture id (pairs: rows of one picture share it; otherwise every row its own)."""
        return np.arange(len(self)) if self.image_ids is None else self.image_ids

    def batch(self, modality: str, indices: torch.Tensor | np.ndarray | slice, device: torch.device,
              view: str = RAW) -> tuple[torch.Tensor, ...]:
        """Tensors for an encoder of `modality` that reads `view`: images as float in [0,1], token ids as
        int64 (RAW), or the named backbone's cached features as float32 (B, D)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        if view != RAW:
            if view not in self.features:
                raise KeyError(f"no cached {view} features for this data set (have: {sorted(self.features)})")
            rows = self.features[view][indices]
            return (torch.from_numpy(np.array(rows) if not rows.flags.writeable else np.ascontiguousarray(rows)
                                     ).to(device, torch.float32),)
        # A slice of a read-only (shared or memory-mapped) array is copied: torch must not wrap read-only memory.
        arrays = [a if a.flags.writeable else np.array(a) for a in (array[indices] for array in self.inputs[modality])]
        if modality == "image":
            return (torch.from_numpy(np.ascontiguousarray(arrays[0])).to(device, torch.float32).div_(255.0),)
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device, torch.int64) for a in arrays)

    def label_batch(self, indices: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
        assert self.labels is not None, "this data set has no labels"
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        return torch.from_numpy(np.ascontiguousarray(self.labels[indices])).to(device, torch.int64)
