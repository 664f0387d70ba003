"""Fashion-MNIST (Debian dataset-fashion-mnist), the image task: its gzip idx files -> ImageClassData."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedafd.runtime.data.fetch import locate
from fedafd.runtime.data.images import from_grayscale_28
from fedafd.runtime.data.prepared import ImageClassData, corrupt, load_prepared

FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An idx file (gzip): big-endian magic (0x08 = uint8, then the number of dimensions), the dimensions,
    then the bytes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise corrupt("Fashion-MNIST file", path, str(err)) from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise corrupt("Fashion-MNIST file", path, f"magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(dims)):
        raise corrupt("Fashion-MNIST file", path, f"{len(raw) - header} bytes of data for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _build_fashion_mnist() -> dict[str, ImageClassData]:
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        image_path = locate(f"{FASHION_MNIST_DIR}/{prefix}-images-idx3-ubyte.gz", "fashion_mnist")
        label_path = locate(f"{FASHION_MNIST_DIR}/{prefix}-labels-idx1-ubyte.gz", "fashion_mnist")
        images = _read_idx(image_path, 2051, 3)
        labels = _read_idx(label_path, 2049, 1)
        expected = FASHION_MNIST_SIZES[split]
        if images.shape != (expected, 28, 28) or labels.shape != (expected,):
            raise corrupt("Fashion-MNIST", image_path.parent,
                           f"{split}: images {images.shape}, labels {labels.shape}, expected {expected} of 28x28")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise corrupt("Fashion-MNIST labels", label_path, f"label {labels.max()} out of range")
        out[split] = ImageClassData(from_grayscale_28(images), labels.astype(np.int64), FASHION_MNIST_CLASSES)
    return out


def load_fashion_mnist(split: str) -> ImageClassData:
    """Fashion-MNIST: "train" 60,000 / "test" 10,000 images, 10 balanced classes (white on black)."""
    return load_prepared("fashion_mnist", split, ImageClassData, _build_fashion_mnist)
