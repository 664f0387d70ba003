"""Records -> the prepared arrays training reads (prepared.py's classes): pictures decoded one at a time into
the one image format, texts tokenized, labels resolved to class indices once for every split of a source.

Each bad row (a picture that does not open, an empty text, a label outside [0, K)) goes to `Problems`,
named by its file and row; with on_bad_sample=skip the row is left out and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from fedafd.runtime.data.images import IMAGE_SIZE, from_pil
from fedafd.runtime.data.prepared import ImageClassData, PairData, TextClassData
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import (
    DataFormatError, ImageRecord, PairRecord, Problems, Record, TextRecord, Where,
)

Data = ImageClassData | TextClassData | PairData


def decode_image(record: ImageRecord | PairRecord, problems: Problems) -> np.ndarray | None:
    """The record's picture as uint8 (3, 32, 32), or None (reported) when it cannot be read."""
    try:
        img = record.image()
        with img:
            img.load()  # a truncated file fails here, not later
            return from_pil(img)
    except FileNotFoundError as err:
        problems.bad(record.where, f"image file not found: {err.filename or err}")
    except DataFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a damaged picture
        problems.bad(record.where, f"unreadable or truncated image ({type(err).__name__}: {err})")
    return None


def clean_text(text: object, options: DataOptions) -> str:
    text = "" if text is None else str(text)
    if options.unescape:
        text = text.replace("\\n", "\n").replace('\\"', '"')
    return text.strip()


def resolve_labels(splits: dict[str, Sequence[Record]], options: DataOptions,
                   problems: Problems) -> tuple[dict[str, list[Record]], tuple[str, ...], dict[int, int] | None]:
    """One class list for every split: (records whose labels are good, class names, None). Labels are class
    names (strings) or integers; integers have options.label_offset subtracted and must lie in [0, K)."""
    records = [r for rows in splits.values() for r in rows]
    labels = [r.label for r in records if not isinstance(r, PairRecord)]
    names = tuple(options.class_names)
    strings = [label for label in labels if isinstance(label, str)]
    if strings and not names:
        names = tuple(sorted(set(strings)))
    integers = [int(label) - options.label_offset for label in labels if not isinstance(label, str)]
    if not names:
        k = options.num_classes or (max(integers) + 1 if integers else 0)
        names = tuple(str(i) for i in range(k))
    k = len(names)
    raw_min = min((int(label) for label in labels if not isinstance(label, str)), default=None)
    raw_max = max((int(label) for label in labels if not isinstance(label, str)), default=None)
    looks_one_based = options.label_offset == 0 and raw_min == 1 and raw_max == k
    good: dict[str, list[Record]] = {}
    for split, rows in splits.items():
        good[split] = []
        for record in rows:
            if isinstance(record, PairRecord):
                good[split].append(record)
                continue
            label = record.label
            if isinstance(label, str) and label not in names:
                problems.bad(record.where, f"label {label!r} is not one of the {k} classes {list(names)[:10]}")
                continue
            if not isinstance(label, str):
                value = int(label) - options.label_offset
                if not 0 <= value < k:
                    hint = (" (the labels look 1-based: set label_offset = 1 in the data config)"
                            if looks_one_based else "")
                    problems.bad(record.where, f"label {label} is outside [0, {k}) after label_offset "
                                               f"{options.label_offset}{hint}")
                    continue
            good[split].append(record)
    return good, names, None


def label_index(label: int | str, names: tuple[str, ...], options: DataOptions) -> int:
    return names.index(label) if isinstance(label, str) else int(label) - options.label_offset


def build_images(records: Iterable[ImageRecord], names: tuple[str, ...], options: DataOptions,
                 problems: Problems) -> ImageClassData:
    records = list(records)
    images = np.empty((len(records), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels, natural, n = [], [], 0
    for record in records:
        image = decode_image(record, problems)
        if image is None:
            continue
        images[n] = image
        labels.append(label_index(record.label, names, options))
        natural.append(record.natural_id)
        n += 1
    return ImageClassData(images[:n].copy() if n < len(records) else images, np.asarray(labels, dtype=np.int64),
                          names, _natural(natural, options))


def build_texts(records: Iterable[TextRecord], names: tuple[str, ...], options: DataOptions,
                problems: Problems) -> TextClassData:
    from fedafd.runtime.data.text import tokenize

    texts, labels, natural = [], [], []
    for record in records:
        text = clean_text(record.text, options)
        if not text:
            problems.bad(record.where, "empty text")
            continue
        texts.append(text)
        labels.append(label_index(record.label, names, options))
        natural.append(record.natural_id)
    input_ids, attention_mask = tokenize(texts)
    return TextClassData(input_ids, attention_mask, np.asarray(labels, dtype=np.int64), names, tuple(texts),
                         _natural(natural, options))


def build_pairs(records: Iterable[PairRecord], options: DataOptions, problems: Problems,
                group_names: tuple[str, ...] | None = None) -> PairData:
    """One row per caption; the rows of one picture share its image id (and its decoded picture)."""
    from fedafd.runtime.data.text import tokenize

    records = list(records)
    groups_seen = group_names or tuple(sorted({str(r.group) for r in records}))
    images, captions, groups, image_ids, natural = [], [], [], [], []
    for record in records:
        texts = [clean_text(c, options) for c in record.captions]
        if not any(texts):
            problems.bad(record.where, f"image {record.image_key!r} has no caption")
            continue
        image = decode_image(record, problems)
        if image is None:
            continue
        picture = len(images)
        images.append(image)
        for index, text in enumerate(texts):
            if not text:
                problems.bad(record.where, f"caption {index + 1} of image {record.image_key!r} is empty")
                continue
            captions.append(text)
            groups.append(groups_seen.index(str(record.group)))
            image_ids.append(picture)
            natural.append(record.natural_id)
    input_ids, attention_mask = tokenize(captions)
    rows = np.asarray(image_ids, dtype=np.int64)
    pictures = np.stack(images) if images else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return PairData(pictures[rows], input_ids, attention_mask, tuple(captions), np.asarray(groups, dtype=np.int64),
                    groups_seen, rows, _natural(natural, options))


def _natural(ids: list[str], options: DataOptions) -> tuple[str, ...]:
    return tuple(ids) if options.natural_id_column else ()


def build_splits(kind: str, splits: dict[str, Sequence[Record]], options: DataOptions,
                 problems: Problems) -> dict[str, Data]:
    """Every split of a source as prepared arrays, with one class list (classification) or one group list
    (pairs) for all of them."""
    for split, rows in splits.items():
        for record in rows:
            expected = {"image": ImageRecord, "text": TextRecord, "multimodal": PairRecord}[kind]
            if not isinstance(record, expected):
                raise DataFormatError(f"{record.where}: a {kind} source gave a {type(record).__name__}")
    if kind == "multimodal":
        group_names = tuple(sorted({str(r.group) for rows in splits.values() for r in rows}))
        return {split: build_pairs(rows, options, problems, group_names) for split, rows in splits.items()}
    good, names, _ = resolve_labels(splits, options, problems)
    if kind == "image":
        return {split: build_images(rows, names, options, problems) for split, rows in good.items()}
    return {split: build_texts(rows, names, options, problems) for split, rows in good.items()}


def where_of(file: object, row: int | None = None) -> Where:
    return Where(str(file), row)
