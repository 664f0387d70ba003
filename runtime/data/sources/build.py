"""Records -> the prepared arrays training reads (prepared.py's classes): pictures decoded one at a time into
the one image format, texts tokenized, labels resolved to class indices once for every split of a source.

Built into a folder (a cached source), every decoded picture is written straight into its split's .npy file
and dropped (pairs: one picture row per caption row, as training reads them), its encoded original (pictures.py)
appended once to the split's picture bytes, texts are tokenized a chunk at a time, and the arrays come back
memory-mapped: a data set larger than memory builds in constant memory but for its labels, picture spans (16
bytes a row) and strings. Without a folder the same rows go into preallocated arrays in memory.

Each bad row (a picture that does not open, an empty text, a label outside [0, K)) goes to `Problems`,
named by its file and row; with on_bad_sample=skip the row is left out and counted.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fedafd.runtime.data.images import IMAGE_SIZE, from_pil
from fedafd.runtime.data.pictures import Pictures, cap_picture, png_bytes, source_bytes
from fedafd.runtime.data.prepared import (
    ImageClassData, MemoryRows, NpyRows, PairData, TextClassData, load_split, save_split, split_file,
)
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import (
    DataFormatError, ImageRecord, LazyRecords, PairRecord, Problems, Record, TextRecord, Where,
)

Data = ImageClassData | TextClassData | PairData


TOKENIZE_CHUNK = 4096
"""Texts tokenized per call (and written per block) when a split is built."""
BLOB_CAPACITY = 1 << 48
"""Bytes announced in the header of a split's picture bytes while they are written (their total is known only
at the end, when NpyRows.close writes it)."""


class PictureSizes:
    """Width and height of every picture as its file gives them (what `data check` reports), 8 bytes each."""

    def __init__(self) -> None:
        self.widths = array.array("I")
        self.heights = array.array("I")

    def add(self, size: tuple[int, int]) -> None:
        self.widths.append(size[0])
        self.heights.append(size[1])

    def __len__(self) -> int:
        return len(self.widths)


def decode_picture(record: ImageRecord | PairRecord, problems: Problems, max_side: int = 0,
                   sizes: PictureSizes | None = None) -> tuple[np.ndarray, bytes, tuple[int, int]] | None:
    """The record's picture as uint8 (3, 32, 32), as the encoded bytes kept beside it (the file's own, or PNG
    for a picture made in memory; PNG at most `max_side` px where it is larger, 0: no cap) and its own size, or
    None (reported) when it cannot be read. `sizes` gets that size too (before any decoding at a reduced scale)."""
    try:
        img = record.image() if record.image is not None else Image.open(record.where.file)
        with img:
            size = img.size
            encoded = source_bytes(img)  # before decoding: a BytesIO is let go once the pixels are loaded
            if encoded is None:
                encoded = png_bytes(img)
            # from_pil loads the pixels (a truncated file fails there), after asking a JPEG to decode at 1/2-1/8
            # scale: loading it here first would decode every JPEG at full size for a 32 px picture.
            image = from_pil(img)
        encoded = cap_picture(encoded, max_side)
        if sizes is not None:
            sizes.add(size)
        return image, encoded, size
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
                   problems: Problems) -> tuple[dict[str, LazyRecords], tuple[str, ...], None]:
    """One class list for every split: (each split's records whose labels are good, class names, None). Labels are
    class names (strings) or integers; integers have options.label_offset subtracted and must lie in [0, K).
    Two passes over the records, holding none of them: the labels seen, then each bad one reported; the good
    records are a filtered view (LazyRecords)."""
    strings: set[str] = set()
    low = high = None
    for rows in splits.values():
        for record in rows:
            label = record.label
            if isinstance(label, str):
                strings.add(label)
            else:
                value = int(label)
                low, high = (value, value) if low is None else (min(low, value), max(high, value))
    names = tuple(options.class_names) or (tuple(sorted(strings)) if strings else ())
    if not names:
        k = options.num_classes or (high - options.label_offset + 1 if high is not None else 0)
        names = tuple(str(i) for i in range(k))
    k = len(names)
    known = set(names)
    looks_one_based = options.label_offset == 0 and low == 1 and high == k

    def why_bad(record: Record) -> str | None:
        label = record.label
        if isinstance(label, str):
            return None if label in known else f"label {label!r} is not one of the {k} classes {list(names)[:10]}"
        if 0 <= int(label) - options.label_offset < k:
            return None
        hint = " (the labels look 1-based: set label_offset = 1 in the data config)" if looks_one_based else ""
        return f"label {label} is outside [0, {k}) after label_offset {options.label_offset}{hint}"

    good: dict[str, LazyRecords] = {}
    for split, rows in splits.items():
        kept = 0
        for record in rows:
            why = why_bad(record)
            if why is None:
                kept += 1
            else:
                problems.bad(record.where, why)
        good[split] = LazyRecords(kept, lambda rows=rows: (r for r in rows if why_bad(r) is None))
    return good, names, None


def label_index(label: int | str, names: tuple[str, ...], options: DataOptions) -> int:
    return names.index(label) if isinstance(label, str) else int(label) - options.label_offset


class PictureWriter:
    """A split's encoded pictures while it is built: each picture's bytes appended once (to `path`, a .npy written
    as it grows, like NpyRows' rows; or memory), each row's span kept (16 bytes a row)."""

    def __init__(self, path: Path | None, capacity: int) -> None:
        self._file = None if path is None else NpyRows(path, np.uint8, (), BLOB_CAPACITY)
        self._memory = bytearray()
        self._spans = np.empty((capacity, 2), dtype=np.int64)
        self._end = 0
        self._all_native = True
        self.rows = 0

    def add(self, encoded: bytes, size: tuple[int, int]) -> tuple[int, int]:
        """One picture's bytes and its own size; returns its span, for every row that shows it (`row`)."""
        self._all_native &= tuple(size) == (IMAGE_SIZE, IMAGE_SIZE)
        if self._file is None:
            self._memory += encoded
        else:
            self._file.extend(np.frombuffer(encoded, dtype=np.uint8))
        span = (self._end, self._end + len(encoded))
        self._end = span[1]
        return span

    def row(self, span: tuple[int, int]) -> None:
        """The next row shows the picture at `span`."""
        self._spans[self.rows] = span
        self.rows += 1

    def close(self) -> Pictures | None:
        """The pictures; None when every one is 32x32 (CIFAR, Fashion-MNIST): the 32 px array is the picture
        itself, so there is nothing more to keep (and the same rows read from arrays or the bundled set agree)."""
        if self._all_native:
            self.abort()
            return None
        blob = np.frombuffer(self._memory, dtype=np.uint8) if self._file is None else self._file.close()
        return Pictures((blob,), self._spans[:self.rows].copy())

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()


class SplitStore:
    """Where one split's arrays go while it is built: `<stem>.<field>.npy` files in `folder` (a cached source;
    the rows come back memory-mapped), or memory (folder None)."""

    def __init__(self, folder: Path | None, stem: str) -> None:
        self.folder = folder
        self.stem = stem
        self._streamed: list[str] = []
        self._open: list[NpyRows | MemoryRows | PictureWriter] = []

    def rows(self, field: str, dtype: type, row_shape: tuple[int, ...], capacity: int) -> NpyRows | MemoryRows:
        """A writer of the field's rows, one row or block at a time, at most `capacity` of them."""
        if self.folder is None:
            writer: NpyRows | MemoryRows = MemoryRows(dtype, row_shape, capacity)
        else:
            writer = NpyRows(split_file(self.folder, self.stem, field), dtype, row_shape, capacity)
            self._streamed.append(field)
        self._open.append(writer)
        return writer

    def pictures(self, capacity: int) -> PictureWriter:
        """A writer of the split's encoded pictures, for at most `capacity` rows."""
        path = None if self.folder is None else split_file(self.folder, self.stem, "picture_bytes")
        if path is not None:
            self._streamed.append("picture_bytes")
        writer = PictureWriter(path, capacity)
        self._open.append(writer)
        return writer

    def finish(self, data: Data) -> Data:
        """The split as it is kept: in memory as built, or saved beside its streamed arrays and opened back."""
        self._open.clear()
        if self.folder is None:
            return data
        save_split(self.folder, self.stem, data, self._streamed)
        return load_split(self.folder, self.stem, type(data))

    def abort(self) -> None:
        for writer in self._open:
            writer.abort()


def build_images(records: Iterable[ImageRecord], names: tuple[str, ...], options: DataOptions,
                 problems: Problems, store: SplitStore | None = None,
                 sizes: PictureSizes | None = None) -> ImageClassData:
    store = store or SplitStore(None, "")
    records = records if hasattr(records, "__len__") else list(records)
    images = store.rows("images", np.uint8, (3, IMAGE_SIZE, IMAGE_SIZE), len(records))
    pictures = store.pictures(len(records))
    labels = np.empty(len(records), dtype=np.int64)
    natural = []
    for record in records:
        decoded = decode_picture(record, problems, options.max_picture_side, sizes)
        if decoded is None:
            continue
        labels[images.rows] = label_index(record.label, names, options)
        images.append(decoded[0])
        pictures.row(pictures.add(decoded[1], decoded[2]))
        natural.append(record.natural_id)
    kept = images.rows
    return store.finish(ImageClassData(images.close(), labels[:kept].copy(), names, _natural(natural, options),
                                       pictures.close()))


def _tokenized(texts: list[str], store: SplitStore) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of `texts`, tokenized and written a chunk at a time."""
    from fedafd.runtime.data.text import MAX_TEXT_LEN, tokenize

    ids = store.rows("input_ids", np.int64, (MAX_TEXT_LEN,), len(texts))
    mask = store.rows("attention_mask", np.int64, (MAX_TEXT_LEN,), len(texts))
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk_ids, chunk_mask = tokenize(texts[start:start + TOKENIZE_CHUNK])
        ids.extend(chunk_ids)
        mask.extend(chunk_mask)
    return ids.close(), mask.close()


def build_texts(records: Iterable[TextRecord], names: tuple[str, ...], options: DataOptions,
                problems: Problems, store: SplitStore | None = None) -> TextClassData:
    store = store or SplitStore(None, "")
    texts, labels, natural = [], [], []
    for record in records:
        text = clean_text(record.text, options)
        if not text:
            problems.bad(record.where, "empty text")
            continue
        texts.append(text)
        labels.append(label_index(record.label, names, options))
        natural.append(record.natural_id)
    input_ids, attention_mask = _tokenized(texts, store)
    return store.finish(TextClassData(input_ids, attention_mask, np.asarray(labels, dtype=np.int64), names,
                                      tuple(texts), _natural(natural, options)))


def build_pairs(records: Iterable[PairRecord], options: DataOptions, problems: Problems,
                group_names: tuple[str, ...] | None = None, store: SplitStore | None = None,
                sizes: PictureSizes | None = None) -> PairData:
    """One row per caption; the rows of one picture share its image id (and its decoded picture, written once
    per caption row, and its encoded bytes, kept once)."""
    store = store or SplitStore(None, "")
    records = records if hasattr(records, "__len__") else list(records)
    groups_seen = group_names or tuple(sorted({str(r.group) for r in records}))
    group_index = {name: i for i, name in enumerate(groups_seen)}
    capacity = sum(len(r.captions) for r in records)
    images = store.rows("images", np.uint8, (3, IMAGE_SIZE, IMAGE_SIZE), capacity)
    originals = store.pictures(capacity)
    groups = np.empty(capacity, dtype=np.int64)
    image_ids = np.empty(capacity, dtype=np.int64)
    captions, natural, pictures = [], [], 0
    for record in records:
        texts = [clean_text(c, options) for c in record.captions]
        if not any(texts):
            problems.bad(record.where, f"image {record.image_key!r} has no caption")
            continue
        if str(record.group) not in group_index:
            problems.bad(record.where, f"group {record.group!r} of image {record.image_key!r} is not one of the "
                                       f"data config's group_names {list(groups_seen)[:10]}")
            continue
        decoded = decode_picture(record, problems, options.max_picture_side, sizes)
        if decoded is None:
            continue
        image, span = decoded[0], originals.add(decoded[1], decoded[2])
        for index, text in enumerate(texts):
            if not text:
                problems.bad(record.where, f"caption {index + 1} of image {record.image_key!r} is empty")
                continue
            groups[images.rows] = group_index[str(record.group)]
            image_ids[images.rows] = pictures
            images.append(image)
            originals.row(span)
            captions.append(text)
            natural.append(record.natural_id)
        pictures += 1
    rows = images.rows
    pixels = images.close()
    input_ids, attention_mask = _tokenized(captions, store)
    return store.finish(PairData(pixels, input_ids, attention_mask, tuple(captions), groups[:rows].copy(),
                                 groups_seen, image_ids[:rows].copy(), _natural(natural, options),
                                 originals.close()))


def _natural(ids: list[str], options: DataOptions) -> tuple[str, ...]:
    return tuple(ids) if options.natural_id_column else ()


def build_splits(kind: str, splits: dict[str, Sequence[Record]], options: DataOptions, problems: Problems,
                 folder: Path | None = None, sizes: dict[str, PictureSizes] | None = None) -> dict[str, Data]:
    """Every split of a source as prepared arrays, with one class list (classification) or one group list
    (pairs) for all of them. With `folder` each split is streamed into its files there (`split<i>.*`, in the
    order of `splits`) and comes back memory-mapped. `sizes` gets each split's picture sizes."""
    for split, rows in splits.items():
        for record in rows:
            expected = {"image": ImageRecord, "text": TextRecord, "multimodal": PairRecord}[kind]
            if not isinstance(record, expected):
                raise DataFormatError(f"{record.where}: a {kind} source gave a {type(record).__name__}")
    if sizes is not None:
        sizes.update({split: PictureSizes() for split in splits if kind != "text"})
    stores = {split: SplitStore(folder, split_stem(i)) for i, split in enumerate(splits)}
    built: dict[str, Data] = {}
    try:
        if kind == "multimodal":
            group_names = options.group_names or tuple(sorted({str(r.group) for rows in splits.values() for r in rows}))
            for split, rows in splits.items():
                built[split] = build_pairs(rows, options, problems, group_names, stores[split],
                                           None if sizes is None else sizes[split])
            return built
        good, names, _ = resolve_labels(splits, options, problems)
        for split, rows in good.items():
            if kind == "image":
                built[split] = build_images(rows, names, options, problems, stores[split],
                                            None if sizes is None else sizes[split])
            else:
                built[split] = build_texts(rows, names, options, problems, stores[split])
        return built
    except BaseException:
        for store in stores.values():
            store.abort()
        raise


def split_stem(index: int) -> str:
    """The file stem of a source's index-th split in its folder (split names may be anything a reader gives)."""
    return f"split{index}"


def where_of(file: object, row: int | None = None) -> Where:
    return Where(str(file), row)
