"""COCO captions JSON and Karpathy's split JSON -> one PairRecord per picture, with every caption written for it.

COCO (`annotations/captions_val2017.json`): `images` [{id, file_name}] and `annotations` [{image_id, caption}];
one split per file, so its rows are "all", in `images` order, each picture's captions in `annotations` order.
Pictures lie under options.image_root, by default the folder named like the split beside the JSON's folder
(`annotations/captions_val2017.json` -> `val2017/`), else beside the JSON (`coco/val2017/`), else the JSON's own
folder.

Karpathy (`dataset_coco.json`, `dataset_flickr30k.json`): `images` [{filename, filepath?, split, sentences: [{raw}]}];
its splits are the file's own (train, restval, val, test), each in file order. Pictures lie at
image_root / filepath / filename (image_root: the JSON's folder by default).

A data config's group_column and natural_id_column name a field of each image entry (neither format has one of
its own). Rows are reported by their 1-based index in `images` or `annotations`. The JSON is read once; pictures
are only checked to exist here, and build.py opens them.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import PairRecord, Problems, Record, Where

KINDS = ("multimodal",)
_COCO_KEYS = ("images", "annotations")
_SPLIT_OF_NAME = re.compile(r"^captions_(.+)$")
"""COCO's captions file names say their split: captions_train2017.json -> train2017."""


def read(path: Path, kind: str, options: DataOptions, problems: Problems) -> dict[str, list[Record]]:
    """{split: one PairRecord per picture}: COCO's one split "all", or Karpathy's own splits."""
    document = _load(path, problems)
    fmt = options.format if options.format in ("coco", "karpathy") else _format_of(document)
    if fmt == "karpathy":
        return _read_karpathy(path, document, options, problems)
    return {"all": _read_coco(path, document, options, problems)}


def _load(path: Path, problems: Problems) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise problems.fatal(path, "no such file") from None
    except UnicodeDecodeError as err:
        raise problems.fatal(path, f"not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise problems.fatal(path, f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(document, dict):
        raise problems.fatal(path, f"expected a JSON object with images, got a {type(document).__name__}")
    return document


def _format_of(document: dict[str, Any]) -> str:
    """For a caller that did not say: Karpathy's images carry sentences, COCO has annotations."""
    images = document.get("images")
    if "annotations" not in document and isinstance(images, list) and images and isinstance(images[0], dict) \
            and "sentences" in images[0]:
        return "karpathy"
    return "coco"


def _list_of(path: Path, document: dict[str, Any], key: str, problems: Problems, expected: str) -> list[Any]:
    value = document.get(key)
    if value is None:
        raise problems.fatal(path, f"no top-level {key!r} list; {expected} (it has {', '.join(document) or 'no keys'})")
    if not isinstance(value, list):
        raise problems.fatal(path, f"top-level {key!r} must be a list, got a {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _record(picture: Path, captions: list[str], key: str, entry: dict[str, Any], where: Where,
            options: DataOptions, problems: Problems) -> PairRecord | None:
    """The picture's record, or None (reported) when its file is missing or the image entry lacks a field the data
    config names (group_column, natural_id_column)."""
    if not picture.is_file():
        problems.bad(where, f"image file not found: {picture}")
        return None
    columns = {"group": options.group_column, "natural_id": options.natural_id_column}
    missing = [column for column in columns.values() if column and entry.get(column) is None]
    if missing:
        problems.bad(where, f"the image entry has no {' or '.join(map(repr, missing))} (named in the data config)")
        return None
    values = {name: entry[column] if isinstance(entry[column], (int, str)) else json.dumps(entry[column])
              for name, column in columns.items() if column}
    return PairRecord(functools.partial(Image.open, picture), tuple(captions), key, where, values.get("group", 0),
                      str(values.get("natural_id", "")))


# --- COCO captions -----------------------------------------------------------------------------


def coco_image_root(path: Path, options: DataOptions) -> Path:
    """Where a COCO JSON's pictures lie: image_root, else the folder named like its split beside the JSON's folder
    or beside the JSON, else the JSON's own folder."""
    if options.image_root:
        return Path(options.image_root).expanduser()
    match = _SPLIT_OF_NAME.match(path.stem)
    if match:
        for folder in (path.parent.parent / match.group(1), path.parent / match.group(1)):
            if folder.is_dir():
                return folder
    return path.parent


def _read_coco(path: Path, document: dict[str, Any], options: DataOptions, problems: Problems) -> list[PairRecord]:
    expected = "a COCO captions JSON has images [{id, file_name}] and annotations [{image_id, caption}]"
    images = _list_of(path, document, "images", problems, expected)
    annotations = _list_of(path, document, "annotations", problems, expected)
    root = coco_image_root(path, options)

    rows: dict[Any, int] = {}  # image id -> its 1-based row in images
    for row, entry in enumerate(images, start=1):
        where = Where(str(path), row)
        if not isinstance(entry, dict) or "id" not in entry or not _text(entry.get("file_name")):
            problems.bad(where, "an image entry needs an id and a file_name")
            continue
        if entry["id"] in rows:
            problems.bad(where, f"image id {entry['id']!r} is also the id of images row {rows[entry['id']]}")
            continue
        rows[entry["id"]] = row

    captions: dict[Any, list[str]] = {image_id: [] for image_id in rows}
    annotated: set[Any] = set()  # images with an annotation, empty or not
    for row, entry in enumerate(annotations, start=1):
        where = Where(str(path), row)
        if not isinstance(entry, dict) or "image_id" not in entry:
            problems.bad(where, "an annotation needs an image_id and a caption")
            continue
        image_id = entry["image_id"]
        if image_id not in captions:
            problems.bad(where, f"annotation for image id {image_id!r}, which is not in images")
            continue
        annotated.add(image_id)
        caption = _text(entry.get("caption"))
        if not caption:
            problems.bad(where, f"annotation with an empty caption for image id {image_id!r}")
            continue
        captions[image_id].append(caption)

    records = []
    for image_id, row in rows.items():
        entry, where = images[row - 1], Where(str(path), row)
        if not captions[image_id]:
            if image_id not in annotated:  # one with only empty captions was reported at each of them
                problems.bad(where, f"image without captions: image id {image_id!r} ({entry['file_name']}) has no "
                                    "annotation")
            continue
        record = _record(root / entry["file_name"].strip(), captions[image_id], str(image_id), entry, where, options,
                         problems)
        if record is not None:
            records.append(record)
    return records


# --- Karpathy's split JSON ---------------------------------------------------------------------


def _read_karpathy(path: Path, document: dict[str, Any], options: DataOptions,
                   problems: Problems) -> dict[str, list[Record]]:
    expected = "Karpathy's split JSON has images [{filename, filepath, split, sentences: [{raw}]}]"
    images = _list_of(path, document, "images", problems, expected)
    root = Path(options.image_root).expanduser() if options.image_root else path.parent

    splits: dict[str, list[Record]] = {}
    for row, entry in enumerate(images, start=1):
        where = Where(str(path), row)
        if not isinstance(entry, dict) or not _text(entry.get("filename")):
            problems.bad(where, "an image entry needs a filename")
            continue
        split = _text(entry.get("split"))
        if not split:
            problems.bad(where, f"image {entry['filename']!r} has no split (train, restval, val or test)")
            continue
        records = splits.setdefault(split, [])  # a split whose every row is bad is still one, empty
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            problems.bad(where, f"image without sentences: {entry['filename']!r}")
            continue
        captions = []
        for index, sentence in enumerate(sentences, start=1):
            caption = _text(sentence.get("raw")) if isinstance(sentence, dict) else ""
            if not caption:
                problems.bad(where, f"empty caption: sentence {index} of image {entry['filename']!r} has no raw text")
                continue
            captions.append(caption)
        if not captions:  # each of its sentences was reported
            continue
        relative = Path(_text(entry.get("filepath"))) / entry["filename"].strip()
        record = _record(root / relative, captions, relative.as_posix(), entry, where, options, problems)
        if record is not None:
            records.append(record)
    return splits
