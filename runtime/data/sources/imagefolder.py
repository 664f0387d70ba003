"""Folders of pictures -> records, the layouts of torchvision's ImageFolder and Hugging Face's imagefolder.

image: `ROOT/<class>/<picture>`, or `ROOT/<split>/<class>/<picture>` when every top-level folder is a split
name (train, test, val, validation, restval). Class names are the folder names (sorted); records come in sorted
class folders, then sorted file names.

multimodal: `ROOT/metadata.jsonl` (or `metadata.csv`), or one in each split folder: a line per caption with the
picture's `file_name` (relative to the metadata's folder; path_column) and its `text` (caption_column); several
lines naming one picture are its captions. Every picture in the folder must have a line.

Where Hugging Face's imagefolder silently drops a label (a picture two levels below a class folder) or a picture
(no metadata line), this reader reports the file: a nested class folder and an uncaptioned picture are bad rows.
Files that are clearly no pictures (text, metadata, hidden files) are ignored; any other file in a class folder
is reported too. Pictures are checked to be non-empty here; build.py opens them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fedafd.runtime.data.sources import tables
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import ImageRecord, LazyRecords, PairRecord, Problems, Record, Where

KINDS = ("image", "multimodal")
SPLIT_NAMES = ("train", "test", "val", "validation", "restval")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NOT_PICTURES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".md", ".rst", ".html", ".xml", ".yaml", ".yml",
                ".toml", ".ini", ".db", ".log")
"""Suffixes of files that are ignored in a class folder (notes, metadata, Thumbs.db, desktop.ini)."""
METADATA = ("metadata.jsonl", "metadata.csv")
_LEVELS = {2: "two", 3: "three", 4: "four"}


def read(path: Path, kind: str, options: DataOptions, problems: Problems) -> dict[str, list[Record]]:
    """{split: records}: each split folder's, or the folder's own as "all"."""
    if not path.is_dir():
        raise problems.fatal(path, "no such folder")
    if kind == "multimodal":
        return _read_pairs(path, options, problems)
    if options.natural_id_column:
        raise problems.fatal(path, f"natural_id_column {options.natural_id_column!r}: class folders have no columns; "
                                   "give a manifest (CSV or JSONL of path, label and that column) instead")
    return {split: _read_classes(folder, options, problems) for split, folder in split_folders(path).items()}


def split_folders(root: Path) -> dict[str, Path]:
    """{split: folder} when every top-level folder is a split name, else {"all": root}."""
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not _hidden(p)]
    if folders and all(p.name in SPLIT_NAMES for p in folders):
        return {p.name: p for p in folders}
    return {"all": root}


def is_picture(path: Path) -> bool:
    return path.suffix.lower() in PICTURE_SUFFIXES


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


# --- image classification -----------------------------------------------------------------------


def folder_name(class_name: str) -> str:
    """A class name as a folder name: '/' and '\\' written as '_' (`data split` writes Fashion-MNIST's T-shirt/top
    as T-shirt_top)."""
    return class_name.replace("/", "_").replace("\\", "_")


def folder_class(name: str, class_names: tuple[str, ...]) -> str:
    """The class a folder holds: its name, or the one configured class name spelled so as a folder name."""
    if name in class_names or not class_names:
        return name
    spelled = [c for c in class_names if folder_name(c) == name]
    return spelled[0] if len(spelled) == 1 else name


def _read_classes(root: Path, options: DataOptions, problems: Problems) -> LazyRecords:
    """ROOT/<class>/<picture> -> records labelled by class folder name, made as they are read (the index kept is
    each class's file names)."""
    classes = []
    for entry in sorted(root.iterdir()):
        if _hidden(entry):
            continue
        if entry.is_dir():
            classes.append(entry)
        elif is_picture(entry):
            problems.bad(Where(str(entry)), f"picture outside any class folder: move it into {root}/<class>/")
    if not classes:
        raise problems.fatal(root, "no class folders: pictures go in ROOT/<class>/ (or ROOT/train/<class>/ and "
                                   "ROOT/test/<class>/)")
    index = [(str(folder), folder_class(folder.name, options.class_names), _read_class(folder, problems))
             for folder in classes]

    def records() -> Iterator[ImageRecord]:
        for folder, label, names in index:
            for name in names:
                yield ImageRecord(None, label, Where(os.path.join(folder, name)))  # the picture is where.file

    return LazyRecords(sum(len(names) for _, _, names in index), records)


def _read_class(folder: Path, problems: Problems) -> list[str]:
    """The names of a class folder's good pictures, sorted; every other file reported (or ignored: notes)."""
    names: list[str] = []
    pictures = 0
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        relative = Path(directory).relative_to(folder).parts
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = os.path.join(directory, name)
            where = Where(file)
            suffix = os.path.splitext(name)[1].lower()
            if not os.path.isfile(file):
                if os.path.islink(file) and suffix in PICTURE_SUFFIXES:
                    problems.bad(where, "broken link: the picture it points at does not exist")
                continue
            if suffix in NOT_PICTURES:
                continue
            if suffix not in PICTURE_SUFFIXES:
                if not relative:
                    problems.bad(where, f"not a picture fedafd reads ({suffix or 'no suffix'}; it reads "
                                        f"{', '.join(PICTURE_SUFFIXES)}): convert it or move it out of the class "
                                        "folder")
                continue
            pictures += 1
            if relative:
                levels = len(relative) + 1
                nested = "/".join((folder.name, *relative))
                problems.bad(where, f"nested class folder {nested}: picture is {_LEVELS.get(levels, levels)} levels "
                                    f"below the class folder {folder.name} (pictures lie directly in their class "
                                    f"folder); flatten it into {folder.name}/ or name the class folder "
                                    f"{nested.replace('/', '_')}/ beside {folder.name}/")
                continue
            if os.path.getsize(file) == 0:
                problems.bad(where, "zero-byte file")
                continue
            names.append(name)
    if not pictures:
        raise problems.fatal(folder, f"empty class folder: no pictures ({', '.join(PICTURE_SUFFIXES)}) in it; "
                                     "add its pictures or remove it")
    return names


# --- pairs --------------------------------------------------------------------------------------


def _read_pairs(root: Path, options: DataOptions, problems: Problems) -> dict[str, list[Record]]:
    """metadata.jsonl/csv of the folder ("all"), or of each split folder."""
    if _metadata(root, problems) is not None:
        return {"all": _read_metadata_folder(root, options, problems)}
    splits = split_folders(root)
    if "all" in splits:
        raise problems.fatal(root, f"no {' or '.join(METADATA)} in this folder (pairs: a line per caption with "
                                   f"file_name and {options.caption_column}), nor split folders "
                                   f"({', '.join(SPLIT_NAMES)}) each with one")
    return {split: _read_metadata_folder(folder, options, problems) for split, folder in splits.items()}


def _metadata(folder: Path, problems: Problems) -> Path | None:
    found = [folder / name for name in METADATA if (folder / name).is_file()]
    if len(found) > 1:
        raise problems.fatal(folder, f"both {' and '.join(METADATA)}: keep one")
    return found[0] if found else None


def _read_metadata_folder(folder: Path, options: DataOptions, problems: Problems) -> list[PairRecord]:
    metadata = _metadata(folder, problems)
    if metadata is None:
        raise problems.fatal(folder, f"no {' or '.join(METADATA)} in this split folder")
    fmt = "jsonl" if metadata.suffix == ".jsonl" else "csv"
    table = tables.open_table(metadata, fmt, options, problems)
    column = options.path_column or "file_name"
    table.require([column], problems, {column: "path_column"})
    written: set[str] = set()  # every line's picture, bad lines too: a picture is reported once
    records = tables.pair_records(table, folder, options, problems, column, written)
    named = {(folder / name).resolve() for name in written}
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file() or not is_picture(file):
            continue
        if file.resolve() not in named:
            problems.bad(Where(str(file)), f"image without captions: no line of {metadata.name} names it "
                                           f"({column} {relative.as_posix()})")
    return records

