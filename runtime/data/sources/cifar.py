"""CIFAR-10 and CIFAR-100 in their binary versions (never the pickled `cifar-*-python` batches).

CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` (split train) and `test_batch.bin`
(test), records of 1 label byte + 3,072 pixel bytes; class names one a line in `batches.meta.txt`.
CIFAR-100 (`cifar-100-binary/`): `train.bin` and `test.bin`, records of 2 label bytes (coarse, fine) + 3,072
pixel bytes; class names in `fine_label_names.txt` and `coarse_label_names.txt`. The pixels are the R, G and B
planes of a 32 x 32 picture, row by row.

The path is the folder (its splits) or one .bin file (its records, as split "all"). A file is mapped, not read:
only its label bytes are copied, and a record's picture is taken from the map when its image() is called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import ImageRecord, Problems, Splits, Where

KINDS = ("image",)
SIDE = 32
PIXELS = 3 * SIDE * SIDE
"""Pixel bytes per record: the R, G and B planes."""


@dataclass(frozen=True)
class Layout:
    """One of the two binary versions: how many label bytes lead a record and where its class names are."""

    name: str
    label_bytes: int
    num_classes: dict[str, int]
    """Classes per label choice (the label_column values it answers to)."""
    names_files: dict[str, str]

    @property
    def record_size(self) -> int:
        return self.label_bytes + PIXELS


CIFAR10 = Layout("CIFAR-10", 1, {"label": 10}, {"label": "batches.meta.txt"})
CIFAR100 = Layout("CIFAR-100", 2, {"coarse_label": 20, "fine_label": 100},
                  {"coarse_label": "coarse_label_names.txt", "fine_label": "fine_label_names.txt"})
_CIFAR10_FILE = re.compile(r"^(data_batch_\d+|test_batch)\.bin$")
_CIFAR100_FILES = {"train.bin": "train", "test.bin": "test"}


def read(path: Path, kind: str, options: DataOptions, problems: Problems) -> Splits:
    """The records of a CIFAR-10/100 binary folder ({"train", "test"}) or of one .bin file ({"all"})."""
    if options.natural_id_column:
        raise problems.fatal(str(path), f"natural_id_column {options.natural_id_column!r}: CIFAR records have no "
                                        "columns; save the rows as an .npz with that array, or a parquet file")
    files = _files(path, problems)
    layout = files[0][2]
    label = _label_choice(layout, path, options, problems)
    label_byte = 0 if layout is CIFAR10 or label == "coarse_label" else 1
    splits: dict[str, list[ImageRecord]] = {}
    for file, split, _ in files:
        splits.setdefault(split, []).extend(_records(file, layout, label_byte, problems))
    return Splits(splits, _class_names(files[0][0].parent, layout, label))


def _files(path: Path, problems: Problems) -> list[tuple[Path, str, Layout]]:
    """(file, split, layout) of every .bin file the path names, train before test."""
    if path.is_file():
        return [(path, "all", _layout_of_file(path, problems))]
    if not path.is_dir():
        raise problems.fatal(str(path), "no such file or folder")
    batches = sorted((p for p in path.iterdir() if _CIFAR10_FILE.match(p.name) and p.name != "test_batch.bin"),
                     key=lambda p: int(re.sub(r"\D", "", p.name)))
    cifar10 = [(p, "train", CIFAR10) for p in batches]
    cifar10 += [(path / "test_batch.bin", "test", CIFAR10)] if (path / "test_batch.bin").is_file() else []
    cifar100 = [(path / name, split, CIFAR100) for name, split in _CIFAR100_FILES.items() if (path / name).is_file()]
    if cifar10 and cifar100:
        raise problems.fatal(str(path), "holds both CIFAR-10 files (data_batch_*.bin, test_batch.bin) and CIFAR-100 "
                                        "files (train.bin, test.bin); keep one version per folder")
    if not cifar10 and not cifar100:
        raise problems.fatal(str(path), "no CIFAR binary files (data_batch_1.bin .. data_batch_5.bin and "
                                        "test_batch.bin, or train.bin and test.bin)")
    return cifar10 or cifar100


def _layout_of_file(file: Path, problems: Problems) -> Layout:
    """A file's version: told from its name, else from which record size its size is a multiple of."""
    if _CIFAR10_FILE.match(file.name):
        return CIFAR10
    if file.name in _CIFAR100_FILES:
        return CIFAR100
    size = file.stat().st_size
    fits = [layout for layout in (CIFAR10, CIFAR100) if size and size % layout.record_size == 0]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise problems.fatal(str(file), f"{size} bytes is a whole number of neither CIFAR-10 records "
                                        f"({CIFAR10.record_size} bytes) nor CIFAR-100 records "
                                        f"({CIFAR100.record_size} bytes): truncated or not CIFAR binary")
    raise problems.fatal(str(file), f"{size} bytes fits both CIFAR-10 and CIFAR-100 records; name the file as its "
                                    "archive does (data_batch_N.bin / test_batch.bin, or train.bin / test.bin)")


def _label_choice(layout: Layout, path: Path, options: DataOptions, problems: Problems) -> str:
    """Which label a record's class is: CIFAR-10 has one; CIFAR-100 the fine one unless coarse_label is asked."""
    choice = options.label_column
    if layout is CIFAR100 and choice in ("label", "fine_label"):
        return "fine_label"
    if choice in layout.num_classes:
        return choice
    valid = "label" if layout is CIFAR10 else "fine_label (or label) or coarse_label"
    raise problems.fatal(str(path), f"{layout.name} has no label {choice!r}; label_column must be {valid}")


def _class_names(folder: Path, layout: Layout, label: str) -> tuple[str, ...]:
    """The names in the archive's names file, else "0".."K-1" (so a label past K is a bad row, not a new class)."""
    names_file = folder / layout.names_files[label]
    if names_file.is_file():
        names = tuple(line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip())
        if names:
            return names
    return tuple(str(i) for i in range(layout.num_classes[label]))


def _records(file: Path, layout: Layout, label_byte: int, problems: Problems) -> list[ImageRecord]:
    size = file.stat().st_size
    if size == 0:
        raise problems.fatal(str(file), "empty file (0 bytes)")
    if size % layout.record_size:
        raise problems.fatal(str(file), f"{size} bytes is not a whole number of {layout.name} records of "
                                        f"{layout.record_size} bytes ({size // layout.record_size} records and "
                                        f"{size % layout.record_size} bytes over): the file is truncated")
    records = np.memmap(file, dtype=np.uint8, mode="r", shape=(size // layout.record_size, layout.record_size))
    labels = np.array(records[:, label_byte])  # the only bytes copied; pixels stay in the map
    name = str(file)
    return [ImageRecord(_picture(records, row, layout.label_bytes), int(label), Where(name, row + 1))
            for row, label in enumerate(labels.tolist())]


def _picture(records: np.memmap, row: int, offset: int):
    """Opens record `row`'s picture from the map: its R, G, B planes as a (32, 32, 3) RGB image."""

    def open_image():
        from PIL import Image

        planes = np.asarray(records[row, offset:]).reshape(3, SIDE, SIDE)  # (C, H, W)
        return Image.fromarray(np.ascontiguousarray(planes.transpose(1, 2, 0)))  # (H, W, C): RGB

    return open_image
