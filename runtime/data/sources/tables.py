"""CSV, TSV and JSON lines -> records: one table file, or a folder of them (`train.csv`, `test.csv`: each file's
stem names its split).

| kind | a row holds | columns (data config) |
|---|---|---|
| text | a text and its class | text_columns (joined with a space), label_column |
| image | a picture's path and its class | path_column (else path, file_name, image or filename), label_column |
| multimodal | a picture's path and one caption | path_column, caption_column; rows naming one picture are its captions |

Labels that look like integers become ints (label_offset applies to them in build.py); any other label is a
class name. A CSV/TSV names its columns in its first row, or in `columns` with `header = false` (AG News).
Picture paths are relative to image_root, else to the table's own folder, and are checked to exist here;
build.py opens them. Rows are reported by their 1-based line (a CSV record by the line it starts on, the header
being line 1), and come in file order.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import (
    ImageRecord, PairRecord, Problems, Record, TextRecord, Where,
)

KINDS = ("image", "text", "multimodal")
SUFFIXES = {"csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl"}
PATH_COLUMNS = ("path", "file_name", "image", "filename")
"""Where a manifest's picture path is looked for when path_column is not set, in this order."""
_INTEGER = re.compile(r"[+-]?\d+")

Row = tuple[Where, dict[str, Any]]


def read(path: Path, kind: str, options: DataOptions, problems: Problems) -> dict[str, list[Record]]:
    """{split: records}: one file's rows as "all", or each file of a folder as the split its stem names."""
    fmt = options.format if options.format in SUFFIXES else _format_of(path)
    return {split: read_table(file, kind, fmt, options, problems)
            for split, file in table_files(path, fmt, problems).items()}


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return suffix[1:] if suffix[1:] in SUFFIXES else "csv"


def table_files(path: Path, fmt: str, problems: Problems) -> dict[str, Path]:
    """The table files at `path`, by split: {"all": path} for a file, {stem: file} for a folder's files."""
    if path.is_file():
        return {"all": path}
    if not path.is_dir():
        raise problems.fatal(path, "no such file or folder")
    suffix = SUFFIXES[fmt]
    files: dict[str, Path] = {}
    for file in sorted(path.iterdir()):
        if file.name.startswith(".") or not file.is_file() or file.suffix.lower() != suffix:
            continue
        if file.stem in files:
            raise problems.fatal(file, f"two {suffix} files for split {file.stem!r} ({files[file.stem].name}); "
                                       "keep one")
        files[file.stem] = file
    if not files:
        raise problems.fatal(path, f"no {suffix} files in this folder (a folder of tables holds one file per split, "
                                   f"e.g. train{suffix} and test{suffix})")
    return files


def read_table(file: Path, kind: str, fmt: str, options: DataOptions, problems: Problems) -> list[Record]:
    """One table's records of a kind (image, text, multimodal)."""
    table = open_table(file, fmt, options, problems)
    if kind == "text":
        return list(_text_records(table, options, problems))
    root = image_root(file, options, problems)
    if kind == "image":
        return list(_image_records(table, root, options, problems))
    return pair_records(table, root, options, problems, table.path_column(options, problems))


# --- rows ---------------------------------------------------------------------------------------


@dataclass
class Table:
    """A table's columns (None for JSON lines, whose rows each name their own) and its rows, read lazily."""

    file: Path
    columns: tuple[str, ...] | None
    rows: Iterator[Row]

    def require(self, names: Sequence[str], problems: Problems, setting: dict[str, str] | None = None) -> None:
        """A column named in the data config that the header lacks: fatal, since no row can have it."""
        if self.columns is None:
            return
        for name in names:
            if name and name not in self.columns:
                hint = f" (set {setting[name]} in the data config)" if setting and name in setting else ""
                raise problems.fatal(self.file, f"no column {name!r} in the header; it has {list(self.columns)}{hint}")

    def path_column(self, options: DataOptions, problems: Problems) -> str | None:
        """The column holding picture paths: path_column, else the first of PATH_COLUMNS in the header
        (None for JSON lines without path_column: each row's own first of PATH_COLUMNS)."""
        if options.path_column:
            self.require([options.path_column], problems)
            return options.path_column
        if self.columns is None:
            return None
        found = next((c for c in PATH_COLUMNS if c in self.columns), None)
        if found is None:
            raise problems.fatal(self.file, f"no picture path column: none of {', '.join(PATH_COLUMNS)} in the header "
                                            f"{list(self.columns)}; set path_column in the data config")
        return found


def open_table(file: Path, fmt: str, options: DataOptions, problems: Problems) -> Table:
    """The table at `file` as (where, {column: value}) rows; a CSV's header is read (and checked) here."""
    if fmt == "jsonl":
        return Table(file, None, _jsonl_rows(file, problems))
    delimiter = options.delimiter or ("\t" if fmt == "tsv" else ",")
    if len(delimiter) != 1:
        raise problems.fatal(file, f"delimiter must be one character, got {delimiter!r}")
    rows = _csv_records(file, delimiter, problems)
    if options.header:
        if options.columns:
            raise problems.fatal(file, "columns names the columns of a file without a header row: set header = false "
                                       "too, or leave columns out to use the header")
        first = next(rows, None)
        if first is None:
            raise problems.fatal(file, "empty file: no header row")
        columns = tuple(name.strip() for name in first[1])
    else:
        if not options.columns:
            raise problems.fatal(file, "header = false needs columns: the names of the file's columns, in order")
        columns = tuple(options.columns)
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise problems.fatal(file, f"column {duplicates[0]!r} appears twice in the header {list(columns)}")
    return Table(file, columns, _csv_rows(file, columns, rows, problems))


def _csv_records(file: Path, delimiter: str, problems: Problems) -> Iterator[tuple[int, list[str]]]:
    """(line the record starts on, fields) for every non-blank record."""
    line = 1
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            for fields in reader:
                start, line = line, reader.line_num + 1
                if fields:  # a blank line is no record
                    yield start, fields
    except FileNotFoundError:
        raise problems.fatal(file, "no such file") from None
    except UnicodeDecodeError as err:
        raise problems.fatal(Where(str(file), line), f"not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise problems.fatal(Where(str(file), line), f"not valid CSV ({err})") from None


def _csv_rows(file: Path, columns: tuple[str, ...], records: Iterator[tuple[int, list[str]]],
              problems: Problems) -> Iterator[Row]:
    for line, fields in records:
        where = Where(str(file), line)
        if len(fields) != len(columns):
            problems.bad(where, f"{len(fields)} fields, but the file has {len(columns)} columns {list(columns)} "
                                "(a field holding the delimiter must be quoted)")
            continue
        yield where, dict(zip(columns, fields))


def _jsonl_rows(file: Path, problems: Problems) -> Iterator[Row]:
    line = 0
    try:
        with open(file, encoding="utf-8-sig") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                where = Where(str(file), line)
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    problems.bad(where, f"not valid JSON: {err.msg.removesuffix(' at')} (column {err.colno})")
                    continue
                if not isinstance(value, dict):
                    problems.bad(where, f"not a JSON object but a {type(value).__name__}")
                    continue
                yield where, value
    except FileNotFoundError:
        raise problems.fatal(file, "no such file") from None
    except UnicodeDecodeError as err:
        raise problems.fatal(Where(str(file), line + 1), f"not UTF-8 text ({err})") from None


def missing(row: dict[str, Any], names: Sequence[str]) -> str | None:
    """The first of `names` (empty names aside) a JSON line lacks, else None."""
    return next((name for name in names if name and name not in row), None)


# --- values -------------------------------------------------------------------------------------


class BadValue(ValueError):
    """A cell that cannot be what its column says; the message says why (the caller reports the row)."""


def text_of(value: Any, column: str) -> str:
    """A cell as text ("" for an empty one); numbers as written."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, dict, list)):
        raise BadValue(f"column {column!r} holds {json.dumps(value)[:40]}, not text")
    return str(value)


def label_of(value: Any, column: str) -> int | str:
    """A class: an int for an integer-looking cell, else the class name."""
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise BadValue(f"label {json.dumps(value)[:40]} (column {column!r}) is neither an integer nor a class name")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise BadValue(f"label {value} (column {column!r}) is neither an integer nor a class name")
    text = "" if value is None else str(value).strip()
    if not text:
        raise BadValue(f"missing label (column {column!r} is empty)")
    return int(text) if _INTEGER.fullmatch(text) else text


def natural_id_of(row: dict[str, Any], options: DataOptions) -> str:
    if not options.natural_id_column:
        return ""
    value = text_of(row.get(options.natural_id_column), options.natural_id_column).strip()
    if not value:
        raise BadValue(f"missing natural id (column {options.natural_id_column!r} is empty)")
    return value


# --- records ------------------------------------------------------------------------------------


def _text_records(table: Table, options: DataOptions, problems: Problems) -> Iterator[TextRecord]:
    needed = [*options.text_columns, options.label_column, options.natural_id_column]
    table.require(needed, problems, {options.label_column: "label_column",
                                     options.natural_id_column: "natural_id_column"}
                  | {c: "text_columns" for c in options.text_columns})
    for where, row in table.rows:
        lacking = missing(row, needed)
        if lacking:
            problems.bad(where, f"no column {lacking!r}")
            continue
        try:
            parts = [text_of(row[c], c) for c in options.text_columns]
            label = label_of(row[options.label_column], options.label_column)
            natural_id = natural_id_of(row, options)
        except BadValue as err:
            problems.bad(where, str(err))
            continue
        # An empty part adds no space; an empty text is reported by build.py (after unescaping).
        yield TextRecord(" ".join(p for p in parts if p), label, where, natural_id)


def image_root(file: Path, options: DataOptions, problems: Problems) -> Path:
    """The folder picture paths are relative to: image_root, else the table's folder."""
    if not options.image_root:
        return file.parent
    root = Path(options.image_root).expanduser()
    if not root.is_dir():
        raise problems.fatal(root, "image_root: no such folder")
    return root


def written_path(row: dict[str, Any], column: str | None) -> str:
    """A row's picture path as written (normalised)."""
    if column is None:  # JSON lines without path_column: this row's first path column
        column = next((c for c in PATH_COLUMNS if c in row), None)
        if column is None:
            raise BadValue(f"no picture path: none of {', '.join(PATH_COLUMNS)} (set path_column in the data config)")
    written = text_of(row.get(column), column).strip()
    if not written:
        raise BadValue(f"no picture path (column {column!r} is empty)")
    return os.path.normpath(written)


def picture_file(written: str, root: Path) -> Path:
    """The file a written path names under `root`, checked to be a non-empty file."""
    file = root / written
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise BadValue(f"image file not found: {written} (looked for {file})") from None
    except OSError as err:
        raise BadValue(f"image file {file} cannot be read ({err.strerror})") from None
    if not file.is_file():
        raise BadValue(f"image path {file} is not a file")
    if size == 0:
        raise BadValue(f"zero-byte file {file}")
    return file


def open_picture(file: Path) -> functools.partial:
    """What an ImageRecord holds: opens the picture when called (build.py decodes it)."""
    return functools.partial(Image.open, file)


def _image_records(table: Table, root: Path, options: DataOptions, problems: Problems) -> Iterator[ImageRecord]:
    column = table.path_column(options, problems)
    table.require([options.label_column, options.natural_id_column], problems,
                  {options.label_column: "label_column", options.natural_id_column: "natural_id_column"})
    needed = [column or "", options.label_column, options.natural_id_column]
    for where, row in table.rows:
        lacking = missing(row, needed)
        if lacking:
            problems.bad(where, f"no column {lacking!r}")
            continue
        try:
            label = label_of(row[options.label_column], options.label_column)
            natural_id = natural_id_of(row, options)
            file = picture_file(written_path(row, column), root)
        except BadValue as err:
            problems.bad(where, str(err))
            continue
        yield ImageRecord(open_picture(file), label, where, natural_id)


@dataclass
class _Picture:
    file: Path
    where: Where
    group: str
    natural_id: str
    captions: list[str] = field(default_factory=list)


def pair_records(table: Table, root: Path, options: DataOptions, problems: Problems, column: str | None,
                 named: set[str] | None = None) -> list[PairRecord]:
    """One PairRecord per picture, in the order pictures first appear, each with its rows' captions in row
    order (image_key: the path as written). Shared with imagefolder.py's metadata files, which pass `named`
    to collect the path of every row, bad rows included."""
    caption, group = options.caption_column, options.group_column
    table.require([caption, group, options.natural_id_column], problems,
                  {caption: "caption_column", group: "group_column", options.natural_id_column: "natural_id_column"})
    needed = [column or "", caption, group, options.natural_id_column]
    pictures: dict[str, _Picture] = {}
    for where, row in table.rows:
        if named is not None:
            with contextlib.suppress(BadValue):
                named.add(written_path(row, column))
        lacking = missing(row, needed)
        if lacking:
            problems.bad(where, f"no column {lacking!r}")
            continue
        try:
            key = written_path(row, column)
            text = text_of(row[caption], caption)
            if not text.strip():
                raise BadValue(f"empty caption (column {caption!r})")
            category = text_of(row[group], group).strip() if group else ""
            if group and not category:
                raise BadValue(f"missing group (column {group!r} is empty)")
            natural_id = natural_id_of(row, options)
            file = picture_file(key, root)
        except BadValue as err:
            problems.bad(where, str(err))
            continue
        picture = pictures.setdefault(key, _Picture(file, where, category, natural_id))
        if picture.group != category:
            problems.bad(where, f"picture {key} is in group {picture.group!r} at {picture.where}, here {category!r}")
            continue
        if picture.natural_id != natural_id:
            problems.bad(where, f"picture {key} has natural id {picture.natural_id!r} at {picture.where}, "
                                f"here {natural_id!r}")
            continue
        picture.captions.append(text)
    return [PairRecord(open_picture(p.file), tuple(p.captions), key, p.where, p.group if group else 0, p.natural_id)
            for key, p in pictures.items()]
