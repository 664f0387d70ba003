"""Hugging Face parquet files and `save_to_disk` folders, read with pyarrow alone (the `parquet` extra; the
`datasets` library is not needed).

parquet: one .parquet file (its rows, as split "all"), or a folder holding `*.parquet` or `data/*.parquet`, each
file's split told from its name as Hugging Face writes it (`train-00000-of-00001.parquet`, `test.parquet`;
other names go to "all"). Files are read a batch of rows at a time, only the columns the records need.
hf_disk: a `save_to_disk` folder: a Dataset (`state.json`, `dataset_info.json`, `data-*.arrow`: its rows, as
"all") or a DatasetDict (`dataset_dict.json` and one such folder per split). The Arrow files are IPC streams,
memory-mapped: a picture's bytes stay in the map until the picture is opened.

Columns (the data config names them): image (an HF Image struct {bytes, path}, bytes, or a path; a path is
relative to image_root, else to the file's folder), label (class names from the ClassLabel feature in the
files' `huggingface` metadata, else from `dataset_info.json`), text (text_columns, joined by a space), caption
(a string, or a list of strings: several captions of one picture), group and natural id. Each row is one
picture. A missing column is an error listing the columns there are.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import (
    DataFormatError, ImageRecord, OpenImage, PairRecord, Problems, Record, Splits, TextRecord, Where,
)

KINDS = ("image", "text", "multimodal")
BATCH_ROWS = 1024
"""Rows decoded from a parquet file at a time."""
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval", "restval")
"""File stems taken as split names (`train.parquet`); any other stem goes to split "all"."""
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[^.]+)?\.parquet$")
"""Hugging Face's shard names: `<split>-00000-of-00003[-<hash>].parquet`."""
INSTALL_HINT = "pip install 'fedafd[parquet]'"


def _pyarrow() -> Any:
    """pyarrow with its ipc and parquet modules, or an error saying how to install it."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 - imported for pyarrow.ipc
        import pyarrow.parquet  # noqa: F401 - imported for pyarrow.parquet
    except ImportError:
        raise DataFormatError("reading Hugging Face parquet files and save_to_disk folders needs pyarrow: "
                              f"{INSTALL_HINT}") from None
    return pyarrow


@dataclass(frozen=True)
class Columns:
    """What each column of the files is for: role -> column name (text has several)."""

    image: str = ""
    label: str = ""
    texts: tuple[str, ...] = ()
    caption: str = ""
    group: str = ""
    natural_id: str = ""

    @classmethod
    def of(cls, kind: str, options: DataOptions) -> "Columns":
        if kind == "image":
            return cls(image=options.image_column, label=options.label_column, natural_id=options.natural_id_column)
        if kind == "text":
            return cls(label=options.label_column, texts=tuple(options.text_columns),
                       natural_id=options.natural_id_column)
        return cls(image=options.image_column, caption=options.caption_column, group=options.group_column,
                   natural_id=options.natural_id_column)

    def needed(self) -> list[tuple[str, str]]:
        """(column, data config key) of every column read, in order."""
        named = [(self.image, "image_column"), (self.label, "label_column")]
        named += [(t, "text_columns") for t in self.texts]
        named += [(self.caption, "caption_column"), (self.group, "group_column"),
                  (self.natural_id, "natural_id_column")]
        return [(column, key) for column, key in named if column]


@dataclass(frozen=True)
class ArrowFile:
    """One file of rows: a parquet file or an Arrow IPC stream of a save_to_disk folder."""

    path: Path
    features: dict
    """The Hugging Face features of a save_to_disk folder's dataset_info.json ({} for parquet)."""


def read(path: Path, kind: str, options: DataOptions, problems: Problems) -> Splits:
    """The records of a parquet file or folder (options.format "parquet") or a save_to_disk folder ("hf_disk")."""
    pa = _pyarrow()
    files = _disk_files(path, problems) if options.format == "hf_disk" else _parquet_files(path, problems)
    columns = Columns.of(kind, options)
    splits: dict[str, list[Record]] = {}
    class_names: dict[Path, tuple[str, ...]] = {}
    for split, split_files in files.items():
        rows = splits.setdefault(split, [])
        for file in split_files:
            schema, batches = _open(pa, file, options.format, problems)
            features = {**file.features, **_schema_features(schema)}
            _check_columns(file.path, schema, columns, problems)
            if columns.label and (names := _class_label_names(features, columns.label)):
                class_names[file.path] = names
            group_names = _class_label_names(features, columns.group) if columns.group else ()
            root = Path(options.image_root) if options.image_root else file.path.parent
            rows.extend(_records(pa, kind, file.path, batches, columns, group_names, root,
                                 options.format == "hf_disk", problems))
    return Splits(splits, _one_class_list(class_names, columns.label, problems))


# --- finding the files -------------------------------------------------------------------------


def split_of(file_name: str) -> str:
    """A parquet file's split, told from its name as Hugging Face writes it ("all" for any other name)."""
    shard = _SHARD.match(file_name)
    if shard:
        return shard["split"]
    stem = file_name[:-len(".parquet")] if file_name.endswith(".parquet") else file_name
    return stem if stem in SPLIT_NAMES else "all"


def _parquet_files(path: Path, problems: Problems) -> dict[str, list[ArrowFile]]:
    if path.is_file():
        return {"all": [ArrowFile(path, {})]}
    if not path.is_dir():
        raise problems.fatal(str(path), "no such file or folder")
    found = sorted(path.glob("*.parquet")) or sorted((path / "data").glob("*.parquet"))
    if not found:
        raise problems.fatal(str(path), "no *.parquet files in this folder or in its data/ folder")
    files: dict[str, list[ArrowFile]] = {}
    for file in found:
        files.setdefault(split_of(file.name), []).append(ArrowFile(file, {}))
    return files


def _disk_files(path: Path, problems: Problems) -> dict[str, list[ArrowFile]]:
    if path.is_file() and path.suffix == ".arrow":
        return {"all": [ArrowFile(path, {})]}
    manifest = path / "dataset_dict.json"
    if manifest.is_file():
        splits = _json(manifest, problems).get("splits")
        if not isinstance(splits, list) or not splits:
            raise problems.fatal(str(manifest), "no list of splits (a save_to_disk DatasetDict writes "
                                                '{"splits": ["train", ...]})')
        return {str(split): _dataset_files(path / str(split), problems) for split in splits}
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        return {"all": _dataset_files(path, problems)}
    raise problems.fatal(str(path), "not a save_to_disk folder (no dataset_dict.json, state.json or "
                                    "dataset_info.json)")


def _dataset_files(folder: Path, problems: Problems) -> list[ArrowFile]:
    """The Arrow files of one save_to_disk Dataset, in state.json's order, with dataset_info.json's features."""
    info = folder / "dataset_info.json"
    features = _json(info, problems).get("features") if info.is_file() else None
    features = features if isinstance(features, dict) else {}
    state = folder / "state.json"
    if state.is_file():
        listed = _json(state, problems).get("_data_files") or []
        names = [entry.get("filename") for entry in listed if isinstance(entry, dict)]
        paths = [folder / name for name in names if name]
    else:
        paths = sorted(folder.glob("data-*.arrow"))
    if not paths:
        raise problems.fatal(str(folder), "no data files (state.json's _data_files, or data-*.arrow)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise problems.fatal(str(folder), f"data files listed in state.json are missing: {', '.join(missing)}")
    return [ArrowFile(p, features) for p in paths]


def _json(file: Path, problems: Problems) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise problems.fatal(str(file), f"unreadable JSON ({err})") from None
    if not isinstance(value, dict):
        raise problems.fatal(str(file), "not a JSON object")
    return value


# --- opening a file ----------------------------------------------------------------------------


def _open(pa: Any, file: ArrowFile, fmt: str, problems: Problems) -> tuple[Any, Callable[[list[str]], Iterator]]:
    """(schema, batches(columns)): the file's schema and an iterator over its record batches, the given columns
    only. Unreadable files are fatal, named."""
    where = str(file.path)
    try:
        if fmt == "hf_disk":
            source = pa.memory_map(where)
            try:
                reader = pa.ipc.open_stream(source)
                return reader.schema, lambda columns: (b.select(columns) for b in reader)
            except pa.ArrowInvalid:  # an Arrow IPC file rather than a stream
                table = pa.ipc.open_file(source)
                return table.schema, lambda columns: (table.get_batch(i).select(columns)
                                                      for i in range(table.num_record_batches))
        parquet = pa.parquet.ParquetFile(where, memory_map=True)
        return parquet.schema_arrow, lambda columns: parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except (pa.ArrowException, OSError) as err:
        what = "Arrow stream" if fmt == "hf_disk" else "parquet file"
        raise problems.fatal(where, f"not a readable {what} ({type(err).__name__}: {err})") from None


def _schema_features(schema: Any) -> dict:
    """The Hugging Face features stored in a file's schema metadata (key b"huggingface"), {} when none."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw).get("info", {}).get("features")
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


def _class_label_names(features: dict, column: str) -> tuple[str, ...]:
    feature = features.get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return tuple(str(n) for n in feature["names"])
    return ()


def _one_class_list(names: dict[Path, tuple[str, ...]], column: str, problems: Problems) -> tuple[str, ...]:
    """The ClassLabel names every file agrees on (() when none has them)."""
    lists = set(names.values())
    if len(lists) > 1:
        first, *others = names.items()
        other = next((file, n) for file, n in others if n != first[1])
        raise problems.fatal(str(other[0]), f"the ClassLabel names of column {column!r} differ from {first[0]}'s "
                                            f"({list(other[1])[:5]}... vs {list(first[1])[:5]}...)")
    return lists.pop() if lists else ()


def _check_columns(file: Path, schema: Any, columns: Columns, problems: Problems) -> None:
    present = list(schema.names)
    for column, key in columns.needed():
        if column not in present:
            raise problems.fatal(str(file), f"no column {column!r} ({key}); the columns are: "
                                            f"{', '.join(present)}; set {key} in the data config")


# --- rows to records ---------------------------------------------------------------------------


def _records(pa: Any, kind: str, file: Path, batches: Callable[[list[str]], Iterator], columns: Columns,
             group_names: tuple[str, ...], root: Path, zero_copy: bool, problems: Problems) -> list[Record]:
    names = list(dict.fromkeys(column for column, _ in columns.needed()))
    records: list[Record] = []
    row = 0
    try:
        for batch in batches(names):
            values = {name: (_image_cells(pa, batch.column(name), name, file, zero_copy, problems)
                             if name == columns.image else batch.column(name).to_pylist()) for name in names}
            for i in range(batch.num_rows):
                row += 1
                record = _record(kind, {name: cells[i] for name, cells in values.items()}, columns, group_names,
                                 root, Where(str(file), row), problems)
                if record is not None:
                    records.append(record)
    except (pa.ArrowException, OSError) as err:
        raise problems.fatal(Where(str(file), row + 1), f"unreadable rows ({type(err).__name__}: {err})") from None
    return records


def _image_cells(pa: Any, column: Any, name: str, file: Path, zero_copy: bool,
                 problems: Problems) -> list[tuple[Any, str | None]]:
    """Per row (encoded bytes or None, path or None). Arrow streams give their memory-mapped buffers (no copy)."""
    kind = column.type
    blobs = paths = None
    if pa.types.is_struct(kind) and {"bytes", "path"} & {kind.field(i).name for i in range(kind.num_fields)}:
        parts = dict(zip((kind.field(i).name for i in range(kind.num_fields)), column.flatten()))
        blobs, paths = parts.get("bytes"), parts.get("path")
        if blobs is not None and not (pa.types.is_binary(blobs.type) or pa.types.is_large_binary(blobs.type)):
            blobs = None
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        blobs = column
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        paths = column
    else:
        raise problems.fatal(str(file), f"column {name!r} holds {kind}, not pictures (an HF Image struct "
                                        "{bytes, path}, bytes or a path); set image_column in the data config")
    valid = column.is_valid().to_pylist()
    path_list = paths.to_pylist() if paths is not None else [None] * len(column)
    blob_of = _blobs(pa, blobs, zero_copy) if blobs is not None else lambda i: None
    return [(blob_of(i), path_list[i]) if ok else (None, None) for i, ok in enumerate(valid)]


def _blobs(pa: Any, blobs: Any, zero_copy: bool) -> Callable[[int], Any]:
    """Row -> its encoded bytes (None where null): copies, or slices of the array's own (mapped) data buffer."""
    if not zero_copy:
        return blobs.to_pylist().__getitem__
    _, offsets, data = blobs.buffers()  # validity, offsets, data (a scalar's as_buffer() would copy)
    width = np.int64 if pa.types.is_large_binary(blobs.type) else np.int32
    ends = np.frombuffer(offsets, dtype=width)[blobs.offset:blobs.offset + len(blobs) + 1].tolist()
    valid = blobs.is_valid().to_pylist()

    def blob(i: int) -> Any:
        if not valid[i]:
            return None
        return b"" if data is None else data.slice(ends[i], ends[i + 1] - ends[i])

    return blob


def _record(kind: str, row: dict[str, Any], columns: Columns, group_names: tuple[str, ...], root: Path,
            where: Where, problems: Problems) -> Record | None:
    natural = "" if not columns.natural_id or row[columns.natural_id] is None else str(row[columns.natural_id])
    if kind == "text":
        label = _label(row[columns.label], columns.label, where, problems)
        if label is None:
            return None
        text = " ".join(_text(row[c]) for c in columns.texts if row[c] is not None)
        return TextRecord(text, label, where, natural)
    blob, path = row[columns.image]
    image = _opener(blob, path, root, where, problems)
    if image is None:
        return None
    if kind == "image":
        label = _label(row[columns.label], columns.label, where, problems)
        return None if label is None else ImageRecord(image, label, where, natural)
    captions = row[columns.caption]
    if isinstance(captions, (list, tuple)):
        captions = tuple("" if c is None else str(c) for c in captions)
    else:
        captions = () if captions is None else (str(captions),)
    group = row[columns.group] if columns.group else 0
    if isinstance(group, int) and group_names and 0 <= group < len(group_names):
        group = group_names[group]  # a ClassLabel group: its name
    return PairRecord(image, captions, path or f"{Path(where.file).name}#{where.row}", where,
                      "" if group is None else group, natural)


def _text(value: Any) -> str:
    return " ".join(str(v) for v in value if v is not None) if isinstance(value, (list, tuple)) else str(value)


def _label(value: Any, column: str, where: Where, problems: Problems) -> int | str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        problems.bad(where, f"no label in column {column!r}" if value is None else
                     f"label {value!r} in column {column!r} is neither a class index nor a class name")
        return None
    return value


def _opener(blob: Any, path: str | None, root: Path, where: Where, problems: Problems) -> OpenImage | None:
    """What opens the row's picture: its bytes, else its file (relative to `root`); None (reported) if neither."""
    from PIL import Image

    if blob is not None:
        return lambda: Image.open(io.BytesIO(blob))
    if path:
        file = Path(path) if Path(path).is_absolute() else root / path
        return lambda: Image.open(file)
    problems.bad(where, "no picture: the image's bytes and path are both empty")
    return None
