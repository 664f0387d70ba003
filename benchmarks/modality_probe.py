"""Which modality sorts the public set's categories better from its frozen backbone: nearest-class-mean
top-1 on the held-out public pairs, with class means from the public train pairs. FedCMI's dominant
modality (cloud_server/strategies.py, docs/strategies.md) is the one that wins.

    python -m fedafd.benchmarks.modality_probe            # seconds; reads the backbone feature cache
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from fedafd.runtime.backbones import BACKBONES
from fedafd.runtime.data.modal import load_public_data


def nearest_class_mean_top1(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                            test_labels: np.ndarray) -> float:
    """Top-1 (%) of assigning each L2-normalised test feature to the nearest (cosine) normalised class mean."""
    a, b = (F.normalize(torch.as_tensor(np.asarray(x)).float(), dim=-1) for x in (train, test))
    labels = torch.as_tensor(train_labels)
    classes = sorted(set(labels.tolist()))
    means = F.normalize(torch.stack([a[labels == c].mean(0) for c in classes]), dim=-1)
    predicted = torch.as_tensor(classes)[(b @ means.T).argmax(1)]
    return 100.0 * float((predicted == torch.as_tensor(test_labels)).float().mean())


def main() -> None:
    backbones = tuple(sorted(BACKBONES))
    train, test = load_public_data("train", backbones), load_public_data("test", backbones)
    result = {name: nearest_class_mean_top1(train.features[name], train.labels, test.features[name], test.labels)
              for name in backbones}
    print(json.dumps({"nearest_class_mean_top1": result, "train_pairs": len(train), "test_pairs": len(test)}, indent=2))


if __name__ == "__main__":
    main()
