"""`fedafd-cloud data split`: a pool's train rows cut among devices by a partitioner, each device's share
written as a folder fedafd's readers read back, and `split.json` saying what was done.

    OUT/split.json              source, digest, partitioner, seed; per device its rows, class counts, rows digest
    OUT/<kind>-<i>/data.toml    the device's data config (pass it as data_config; it keeps the class names)
    image:       train/<class>/<row>.jpg|png, test/<class>/<row>...      (ImageFolder; each picture's own bytes)
    text:        train.jsonl, test.jsonl                                  (fields text, label: the class name)
    multimodal:  train/metadata.jsonl + train/<row>.jpg|png, test/...     (a line per caption: file_name, text, group)

A picture is written as its source encodes it (a JPEG stays that JPEG, so a tower of its own reads it at full size);
one a source made in memory is PNG, and a source of 32x32 pictures (CIFAR, Fashion-MNIST) gives 32x32 PNGs.

Every device gets the pool's whole test rows. Pairs are split by picture (all captions of a picture go to one
device). `<row>` is the row's index among the pool's train (or test) rows, zero-padded. A class name that is no
safe folder name has '/' (and '\\') written as '_' in its folder name; data.toml lists the class names as they are.

Read back with `open_source(kind, OUT/<kind>-<i>, load_options(OUT/<kind>-<i>/data.toml))`, a device holds
exactly its rows of the pool, in the pool's order within each class folder for images (the reader walks class
folders in sorted order), in the pool's order for texts, and for pairs picture by picture in the order of each
picture's first caption, its captions together (the pool's order where a picture's captions are adjacent, as
every reader builds them). Pairs' groups come back by name, their indices over the groups the device holds.

The same inputs give the same folders and a byte-identical split.json, written last and atomically: a folder
holding one is a finished split, which a rerun with the same inputs leaves alone and with others refuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedafd.runtime.data.partition import PartitionerSpec
from fedafd.runtime.data.prepared import ImageClassData, PairData, TextClassData, subset
from fedafd.runtime.data.pictures import png_bytes
from fedafd.runtime.files import atomic_write
from fedafd.runtime.data.sources.build import Data
from fedafd.runtime.data.sources.imagefolder import folder_name
from fedafd.runtime.data.sources.options import load_options
from fedafd.runtime.data.sources.registry import Source, open_source, partition_data, split_labels, train_test
from fedafd.runtime.errors import FedafdError

SPLIT_FORMAT = 1
"""Bumped whenever what a split folder holds changes."""
SPLIT_FILE = "split.json"
DATA_CONFIG = "data.toml"
KINDS = ("image", "text", "multimodal")
_DEVICE = re.compile(r"^(image|text|multimodal)-\d+$")


class SplitError(FedafdError):
    """A split that cannot be made or would overwrite another; the message says what to change."""


@dataclass(frozen=True)
class SplitResult:
    out: Path
    record: dict[str, Any]
    """split.json's content."""
    written: bool
    """False: the same split was already there."""


def split_pool(src: str, kind: str, out: Path, spec: PartitionerSpec, num_partitions: int, seed: int = 42,
               data_config: str | Path | None = None, test_fraction: float = 0.2,
               log: Callable[[str], None] = lambda line: None) -> SplitResult:
    """Open the pool at `src` (a path or demo:NAME) as `kind` data, partition its train rows among
    `num_partitions` devices and write every device's folder and split.json under `out`."""
    if kind not in KINDS:
        raise SplitError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    options = load_options(data_config)
    source = open_source(kind, src, options)
    train, test = train_test(source, options, test_fraction=test_fraction, seed=seed)
    try:
        shares = partition_data(train, spec, num_partitions, seed)
    except ValueError as err:
        raise SplitError(f"cannot partition {len(train)} train rows of {src}: {err}") from None
    names = [f"{kind}-{i}" for i in range(num_partitions)]
    for name, rows in zip(names, shares):
        if len(rows) == 0:
            raise SplitError(f"the {spec.name} partitioner gives {name} no train rows: change its parameters or "
                             "lower --num-partitions")
    folders = _folder_names(train.class_names) if kind == "image" else ()
    record = split_record(source, options.as_dict(), train, test, spec, num_partitions, seed, test_fraction,
                          dict(zip(names, shares)))
    if not _prepare(out, record):
        log(f"{out}: this split is already there ({SPLIT_FILE} is identical); nothing written")
        return SplitResult(out, record, False)
    for name, rows in zip(names, shares):
        _write_device(out, name, kind, subset(train, rows), rows, test, folders)
        device = record["devices"][name]
        log(f"{name}: {device['rows']} train rows, {len(test)} test rows, {len(device['class_counts'])} classes")
    atomic_write(out / SPLIT_FILE, lambda tmp: tmp.write_bytes(encode_record(record)), durable=True)
    log(f"wrote {out} ({num_partitions} devices, {SPLIT_FILE})")
    return SplitResult(out, record, True)


# --- split.json ----------------------------------------------------------------------------------


def split_record(source: Source, data_options: dict[str, Any], train: Data, test: Data, spec: PartitionerSpec,
                 num_partitions: int, seed: int, test_fraction: float,
                 shares: dict[str, np.ndarray]) -> dict[str, Any]:
    """What split.json holds: no timestamps, so the same inputs give the same bytes."""
    names = _class_names(train)
    devices = {}
    for name, rows in shares.items():
        counts = np.bincount(split_labels(train)[rows], minlength=len(names))
        device = {"rows": int(len(rows)), "class_counts": {names[c]: int(counts[c]) for c in np.flatnonzero(counts)},
                  "rows_sha256": rows_digest(rows)}
        if isinstance(train, PairData):
            device["pictures"] = int(len(np.unique(train.image_ids[rows])))
        devices[name] = device
    return {
        "split_format": SPLIT_FORMAT,
        "source": source.location if source.format == "demo" else str(Path(source.location).expanduser().resolve()),
        "source_digest": source.digest,
        "kind": source.kind,
        "data_options": data_options,
        "partitioner": spec.parameters(),
        "num_partitions": num_partitions,
        "seed": seed,
        "test_fraction": test_fraction,
        "train_rows": len(train),
        "test_rows": len(test),
        "partition_sha256": hashlib.sha256("".join(d["rows_sha256"] for d in devices.values()).encode()).hexdigest(),
        "devices": devices,
    }


def rows_digest(rows: np.ndarray) -> str:
    """sha256 of a device's row indices (among the pool's train rows) as little-endian int64."""
    return hashlib.sha256(np.asarray(rows, dtype="<i8").tobytes()).hexdigest()


def encode_record(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two records (the partitioner's and data options' by field)."""
    found = []
    for key in list(new) + [k for k in old if k not in new]:
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key in ("partitioner", "data_options") and isinstance(before, dict) and isinstance(after, dict):
            found += [f"{key}.{field}" for field in list(after) + [f for f in before if f not in after]
                      if before.get(field) != after.get(field)]
        else:
            found.append(key)
    return found


def _prepare(out: Path, record: dict[str, Any]) -> bool:
    """Whether to write: False if `out` holds this very split; refuses another split or a folder of other files.
    Device folders of an unfinished split (no split.json yet) are removed."""
    existing = out / SPLIT_FILE
    if existing.is_file():
        try:
            old = json.loads(existing.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SplitError(f"{existing} cannot be read ({err}): remove {out} or choose another --out") from None
        if old == record:
            return False
        keys = differing_keys(old, record)
        raise SplitError(f"{out} holds another split ({SPLIT_FILE} differs in {', '.join(keys)}): choose another "
                         f"--out, or remove {out} to replace it")
    if out.exists() and not out.is_dir():
        raise SplitError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    leftovers = [p for p in out.iterdir() if p.name.startswith(".") or p.is_dir() and _DEVICE.match(p.name)]
    others = sorted(p.name for p in out.iterdir() if p not in leftovers)
    if others:
        raise SplitError(f"{out} is not empty and holds no {SPLIT_FILE} (it has {', '.join(others[:5])}): choose an "
                         "empty or new --out")
    for leftover in leftovers:  # an interrupted split's device folders and temporary files
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    return True


# --- device folders ------------------------------------------------------------------------------


def _class_names(data: Data) -> tuple[str, ...]:
    return data.group_names if isinstance(data, PairData) else data.class_names


def _folder_names(class_names: tuple[str, ...]) -> tuple[str, ...]:
    folders = tuple(folder_name(c) for c in class_names)
    for name, folder in zip(class_names, folders):
        if not folder.strip() or folder.startswith(".") or "\0" in folder:
            raise SplitError(f"class {name!r} cannot be a folder name (empty, hidden or with a NUL): rename it "
                             "with class_names in the data config")
    if len(set(folders)) < len(folders):
        clash = next(f for f in folders if folders.count(f) > 1)
        raise SplitError(f"classes {[c for c, f in zip(class_names, folders) if f == clash]} would share the folder "
                         f"{clash!r}: rename one with class_names in the data config")
    return folders


def _write_device(out: Path, name: str, kind: str, train: Data, train_rows: np.ndarray, test: Data,
                  folders: tuple[str, ...]) -> None:
    """The device's folder, written under a temporary name and renamed when whole."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}."))
    try:
        width = len(str(max(int(train_rows.max(initial=0)), len(test) - 1, 0)))  # file names sort as rows do
        config = {"format": "jsonl" if kind == "text" else "imagefolder"}
        for split, data, rows in (("train", train, train_rows), ("test", test, np.arange(len(test)))):
            if isinstance(data, ImageClassData):
                _write_images(staging / split, data, rows, width, folders)
            elif isinstance(data, TextClassData):
                _write_texts(staging / f"{split}.jsonl", data)
            else:
                _write_pairs(staging / split, data, rows, width)
        if kind == "multimodal":
            config["group_column"] = "group"
        else:
            config["class_names"] = list(_class_names(train))
        (staging / DATA_CONFIG).write_text(_toml(config), encoding="utf-8")
        os.chmod(staging, 0o755)
        os.replace(staging, out / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _toml(values: dict[str, Any]) -> str:
    """Flat TOML of strings and lists of strings (JSON's string escapes are TOML's)."""
    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML escapes DEL, JSON does not
    return "# The data config of this device's folder: pass it as data_config.\n" + "".join(
        f"{key} = {value(v)}\n" for key, v in values.items())


_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif", "PPM": ".ppm"}


def _write_picture(stem: Path, data: ImageClassData | PairData, i: int) -> str:
    """Row i's picture as `stem` + its suffix: its source's own bytes when the data keeps them (a tower of its own
    reads it at full size), else the 32 px array, which is then the whole picture, as lossless PNG. Returns the
    file's name."""
    from PIL import Image

    if data.pictures is None:
        path = stem.with_suffix(".png")
        path.write_bytes(png_bytes(Image.fromarray(np.ascontiguousarray(data.images[i].transpose(1, 2, 0)), "RGB")))
        return path.name
    encoded = data.pictures.encoded(i)
    with Image.open(io.BytesIO(encoded)) as img:
        suffix = _SUFFIXES.get(img.format or "", ".png")
    path = stem.with_suffix(suffix)
    path.write_bytes(encoded)
    return path.name


def _write_images(root: Path, data: ImageClassData, rows: np.ndarray, width: int, folders: tuple[str, ...]) -> None:
    for label in np.unique(data.labels):
        (root / folders[label]).mkdir(parents=True)
    for i, row in enumerate(rows):
        _write_picture(root / folders[data.labels[i]] / f"{int(row):0{width}d}", data, i)


def _write_texts(path: Path, data: TextClassData) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for text, label in zip(data.texts, data.labels):
            handle.write(json.dumps({"text": text, "label": _label_value(data.class_names, int(label))},
                                    ensure_ascii=False) + "\n")


def _label_value(class_names: tuple[str, ...], label: int) -> str | int:
    """The class name, or the label index where the name looks like another integer (the table reader takes an
    integer-looking label for an index)."""
    name = class_names[label]
    return label if re.fullmatch(r"[+-]?\d+", name.strip()) and int(name) != label else name


def _write_pairs(root: Path, data: PairData, rows: np.ndarray, width: int) -> None:
    """One picture per image id (named by its first row), a metadata line per caption, in row order."""
    root.mkdir(parents=True)
    files: dict[int, str] = {}
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            picture = int(data.image_ids[i])
            if picture not in files:
                files[picture] = _write_picture(root / f"{int(row):0{width}d}", data, i)
            handle.write(json.dumps({"file_name": files[picture], "text": data.captions[i],
                                     "group": data.group_names[data.groups[i]]}, ensure_ascii=False) + "\n")


def spec_from_options(partitioner: str, **values: Any) -> PartitionerSpec:
    """The PartitionerSpec of the CLI's options (None: the spec's default), errors as SplitError."""
    given = {k: v for k, v in values.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(PartitionerSpec)}
    if unknown:
        raise SplitError(f"unknown partitioner parameters {sorted(unknown)}")
    try:
        return PartitionerSpec(name=partitioner, **given)
    except ValueError as err:
        raise SplitError(str(err)) from None
