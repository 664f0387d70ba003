"""What a prepared data set is and how it is kept: the three array classes (labelled images, labelled
texts, image-caption pairs), row subsets, the fixed stratified train/test split, and the cache of prepared
arrays that every parser (fashion_mnist.py, wordnet.py, emoji.py, tuxpaint.py) loads through.

The first load of a bundled data set builds both splits and writes them to
`cache_dir()/prepared/<name>-<split>-v2.npz` (atomically, no pickle: strings are fixed-width unicode arrays;
the encoded pictures, pictures.py, in `<name>-<split>-v2.picture_bytes.npy` beside it, memory-mapped when read);
later loads read those files. Splits other than Fashion-MNIST's own are stratified by label and drawn with a
fixed seed from numpy's legacy RandomState, whose stream numpy keeps stable across versions, so the split
never changes.

A source of any size (sources/registry.py) is kept differently, so that it never has to fit in memory: each
split as one uncompressed .npy per array (`<stem>.<field>.npy`, the pictures written row by row as they are
decoded, `NpyRows`; their encoded originals as `<stem>.picture_bytes.npy` and `<stem>.picture_spans.npy`) and
its strings as JSON (`<stem>.strings.json`), opened back memory-mapped and read-only (`load_split`). Whoever
streams over such an array (a digest, a feature extraction) goes through `row_blocks` (the pictures' bytes:
`picture_blocks`), which hands each block's pages back to the page cache when it is done with them, so the
process's resident memory stays flat however large the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import mmap
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from fedafd.runtime.files import atomic_write
from fedafd.runtime.data.fetch import DataMissingError, cache_dir
from fedafd.runtime.data.pictures import Pictures, concat_pictures

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
CACHE_VERSION = 2
"""Bumped whenever what a prepared file holds changes, so stale caches are never read."""
TEST_FRACTION = 0.2
"""Share of every label's rows that goes to "test" (WordNet topics, emoji, Tux Paint)."""
SPLIT_SEED = 20240611
"""Seed of the fixed train/test splits."""


@dataclass(frozen=True, eq=False)
class ImageClassData:
    """Labelled images: the image task (Fashion-MNIST)."""

    images: np.ndarray
    """uint8 (N, 3, 32, 32), RGB."""
    labels: np.ndarray
    """int64 (N,), indices into class_names."""
    class_names: tuple[str, ...]
    natural_ids: tuple[str, ...] = ()
    """Each row's natural id (the data config's natural_id_column) for the `natural` partitioner; () if none."""
    pictures: Pictures | None = None
    """Each row's picture as its source encodes it (pictures.py); None where the data set keeps none."""

    ROWS: ClassVar[tuple[str, ...]] = ("images", "labels", "natural_ids")

    def __post_init__(self) -> None:
        _check_rows(self)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class TextClassData:
    """Labelled texts: the text task (WordNet glosses by topic)."""

    input_ids: np.ndarray
    """int64 (N, L) token ids, PAD_ID after the text."""
    attention_mask: np.ndarray
    """int64 (N, L), 1 on tokens, 0 on padding."""
    labels: np.ndarray
    """int64 (N,), indices into class_names."""
    class_names: tuple[str, ...]
    texts: tuple[str, ...]
    """The untokenized texts, row by row."""
    natural_ids: tuple[str, ...] = ()

    ROWS: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "labels", "texts", "natural_ids")

    def __post_init__(self) -> None:
        _check_rows(self)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class PairData:
    """Image-caption pairs (row i's image goes with caption i), grouped by category for partitioning."""

    images: np.ndarray
    """uint8 (N, 3, 32, 32), RGB."""
    input_ids: np.ndarray
    """int64 (N, L), the tokenized captions."""
    attention_mask: np.ndarray
    """int64 (N, L)."""
    captions: tuple[str, ...]
    groups: np.ndarray
    """int64 (N,), indices into group_names (emoji group, Tux Paint category folder)."""
    group_names: tuple[str, ...]
    image_ids: np.ndarray | None = None
    """int64 (N,): rows with one id show one picture (each of its captions is a row; COCO and Flickr30k have
    five). None: every row its own picture (0..N-1)."""
    natural_ids: tuple[str, ...] = ()
    pictures: Pictures | None = None
    """Each row's picture as its source encodes it (pictures.py; a picture's rows share its bytes); None: none kept."""

    ROWS: ClassVar[tuple[str, ...]] = ("images", "input_ids", "attention_mask", "captions", "groups", "image_ids",
                                       "natural_ids")

    def __post_init__(self) -> None:
        if self.image_ids is None:
            object.__setattr__(self, "image_ids", np.arange(len(self.groups), dtype=np.int64))
        else:
            object.__setattr__(self, "image_ids", canonical_ids(self.image_ids))
        _check_rows(self)

    def __len__(self) -> int:
        return len(self.groups)


Data = TypeVar("Data", ImageClassData, TextClassData, PairData)


def canonical_ids(ids: np.ndarray) -> np.ndarray:
    """Picture ids numbered 0, 1, ... in the order the pictures first appear: the same rows have the same ids (and
    digest) however they were cut out of a larger set. Returned as they are when already so numbered."""
    if len(ids) == 0:
        return np.asarray(ids, dtype=np.int64)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    canonical = rank[inverse.reshape(-1)]
    return ids if np.array_equal(canonical, ids) else canonical  # as given (a memory map stays one)


OPTIONAL_ROWS = ("natural_ids",)
"""Row fields that may be empty (the data set has none)."""


def _check_rows(data: ImageClassData | TextClassData | PairData) -> None:
    lengths = {name: len(getattr(data, name)) for name in data.ROWS
               if not (name in OPTIONAL_ROWS and len(getattr(data, name)) == 0)}
    pictures = getattr(data, "pictures", None)
    if pictures is not None:
        lengths["pictures"] = len(pictures)
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{type(data).__name__}: fields have different numbers of rows: {lengths}")


def subset(data: Data, indices: np.ndarray) -> Data:
    """The rows `indices` (integers, in the given order) of any of the data classes."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise TypeError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    indices = indices.astype(np.int64, copy=False)
    changes = {}
    for name in data.ROWS:
        value = getattr(data, name)
        if name in OPTIONAL_ROWS and len(value) == 0:
            continue
        changes[name] = tuple(value[i] for i in indices) if isinstance(value, tuple) else value[indices]
    if getattr(data, "pictures", None) is not None:
        changes["pictures"] = data.pictures.select(indices)
    return dataclasses.replace(data, **changes)


def concat(parts: list[Data]) -> Data:
    """The rows of every part in order (one class; class or group names must agree). Pairs' image ids are
    offset so that each part's pictures stay apart."""
    first = parts[0]
    if len(parts) == 1:
        return first
    names = "group_names" if isinstance(first, PairData) else "class_names"
    for part in parts[1:]:
        if type(part) is not type(first) or getattr(part, names) != getattr(first, names):
            raise ValueError(f"cannot concatenate {type(part).__name__} with other {names} to {type(first).__name__}")
    changes = {}
    for name in first.ROWS:
        values = [getattr(p, name) for p in parts]
        if name in OPTIONAL_ROWS and any(len(v) == 0 for v in values):
            changes[name] = ()
        elif name == "image_ids":
            offsets = np.cumsum([0] + [int(v.max()) + 1 if len(v) else 0 for v in values[:-1]])
            changes[name] = np.concatenate([v + o for v, o in zip(values, offsets)])
        elif isinstance(values[0], tuple):
            changes[name] = tuple(x for v in values for x in v)
        else:
            changes[name] = np.concatenate(values)
    if hasattr(first, "pictures"):  # kept only where every part has them
        pictures = [p.pictures for p in parts]
        changes["pictures"] = None if any(p is None for p in pictures) else concat_pictures(pictures)
    return dataclasses.replace(first, **changes)


def prepared_path(name: str, split: str) -> Path:
    return cache_dir() / "prepared" / f"{name}-{split}-v{CACHE_VERSION}.npz"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def picture_bytes_path(path: Path) -> Path:
    """Where the encoded pictures of the prepared file at `path` are kept (memory-mapped when read)."""
    return path.with_name(f"{path.stem}.picture_bytes.npy")


def write_prepared(path: Path, data: ImageClassData | TextClassData | PairData) -> None:
    """`data` as one .npz at `path`, atomically, without pickle (strings as fixed-width unicode); its pictures'
    bytes first, in their own .npy beside it, their spans in the .npz."""
    arrays = {}
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        if value is None:
            continue
        if isinstance(value, Pictures):
            def write_bytes(tmp: Path, pictures: Pictures = value) -> None:
                arrays["picture_spans"] = write_picture_bytes(tmp, pictures)

            atomic_write(picture_bytes_path(path), write_bytes)
            continue
        if isinstance(value, tuple):  # strings: fixed-width unicode, never object arrays
            value = np.array(value, dtype=str) if value else np.zeros(0, dtype="<U1")
        arrays[field.name] = value
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: given a name, np.savez would add ".npz" to it
            np.savez(handle, **arrays)

    atomic_write(path, write)


def read_prepared(path: Path, cls: type[Data]) -> Data | None:
    """The cached data, or None when the file is absent or unreadable (then it is built again)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            values = {}
            for field in dataclasses.fields(cls):
                if field.name == "pictures" and "picture_spans" in stored.files:
                    values["pictures"] = Pictures((open_npy(picture_bytes_path(path)),), stored["picture_spans"])
                    continue
                if field.name not in stored.files and field.default is not dataclasses.MISSING:
                    continue  # an optional field written by an older build: its default
                array = stored[field.name]
                values[field.name] = tuple(array.tolist()) if array.dtype.kind == "U" else array
        return cls(**values)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        logger.warning("unreadable prepared data %s (%s); preparing it again", path, err)
        return None


# --- a source's splits as memory-mapped files ------------------------------------------------------

BLOCK_BYTES = 4 << 20
"""Bytes per block when a file-backed array is streamed over (row_blocks)."""
WRITE_BLOCK_BYTES = 1 << 20
"""Bytes NpyRows gathers before it writes them."""


class NpyRows:
    """One .npy file written a row (or a block of rows) at a time, through plain file writes: nothing but one
    block is ever held in memory, and no written page stays in this process's resident set (a writable
    memory map would keep every dirty page of the file there). `capacity` rows are announced in the header;
    `close` shrinks the header and the file to the rows written (skipped bad rows) and returns the file
    memory-mapped read-only. The file reads back like any `np.save` file."""

    def __init__(self, path: Path, dtype: np.dtype | type, row_shape: Sequence[int], capacity: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(n) for n in row_shape)
        self.capacity = int(capacity)
        self._written = 0
        self._header_size = len(_npy_header(self.dtype, (self.capacity, *self.row_shape)))
        row_bytes = max(1, self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64)))
        self._block = np.empty((max(1, min(self.capacity, WRITE_BLOCK_BYTES // row_bytes)), *self.row_shape),
                               self.dtype)
        self._filled = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")
        self._file.write(_npy_header(self.dtype, (self.capacity, *self.row_shape)))

    @property
    def rows(self) -> int:
        """Rows appended so far (written or still in the block)."""
        return self._written + self._filled

    def append(self, row: np.ndarray) -> None:
        """One row, of shape row_shape (buffered; written a block at a time)."""
        if self.rows >= self.capacity:
            raise ValueError(f"{self.path}: more than the {self.capacity} rows announced")
        self._block[self._filled] = row
        self._filled += 1
        if self._filled == len(self._block):
            self._flush()

    def extend(self, rows: np.ndarray) -> None:
        """Rows (k, *row_shape), written at once."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        if self.rows + len(rows) > self.capacity:
            raise ValueError(f"{self.path}: more than the {self.capacity} rows announced")
        self._flush()
        if rows.size:
            self._file.write(memoryview(rows).cast("B"))
        self._written += len(rows)

    def _flush(self) -> None:
        if self._filled:
            self._file.write(memoryview(self._block[:self._filled]).cast("B"))
            self._written += self._filled
            self._filled = 0

    def close(self) -> np.ndarray:
        """The rows written, memory-mapped read-only (the header now says how many)."""
        self._flush()
        if self.rows != self.capacity:
            self._file.seek(0)
            self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape), self._header_size))
            self._file.truncate(self._header_size + self.rows * self._block[0].nbytes)
        self._file.close()
        return open_npy(self.path)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], size: int = 0) -> bytes:
    """A .npy (version 1.0) header, padded with spaces to `size` bytes (0: numpy's own padding, a multiple of
    64), so that a shrunk header fits the place of the one written first."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(dtype), shape)
    prefix = len(np.lib.format.magic(1, 0)) + 2
    size = size or -(-(prefix + len(text) + 1) // 64) * 64
    if prefix + len(text) + 1 > size or size - prefix > 0xFFFF:
        raise ValueError(f"a .npy header for {shape} does not fit in {size} bytes")
    return (np.lib.format.magic(1, 0) + struct.pack("<H", size - prefix)
            + (text + " " * (size - prefix - len(text) - 1) + "\n").encode("latin1"))


class MemoryRows:
    """NpyRows' in-memory twin (a build that is not cached): rows into one preallocated array."""

    def __init__(self, dtype: np.dtype | type, row_shape: Sequence[int], capacity: int) -> None:
        self._array = np.empty((int(capacity), *row_shape), dtype)
        self.rows = 0

    def append(self, row: np.ndarray) -> None:
        self._array[self.rows] = row
        self.rows += 1

    def extend(self, rows: np.ndarray) -> None:
        self._array[self.rows:self.rows + len(rows)] = rows
        self.rows += len(rows)

    def close(self) -> np.ndarray:
        return self._array if self.rows == len(self._array) else self._array[:self.rows].copy()

    def abort(self) -> None:
        pass


def open_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped read-only (never unpickled)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def release_pages(array: np.ndarray) -> None:
    """Hand the pages under `array` back to the page cache when it is a view of a read-only file mapping
    (`np.load(mmap_mode="r")`): they leave this process's resident set (the file's bytes stay cached by the
    kernel, and are mapped again if read again). Anything else is left alone; the advice is best effort."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or array.size == 0 or not hasattr(base, "madvise"):
        return
    try:
        start = np.frombuffer(base, np.uint8, count=1).ctypes.data  # where the mapping begins
        low, high = _byte_bounds(array)
        low -= start
        low -= low % mmap.PAGESIZE
        base.madvise(mmap.MADV_DONTNEED, low, min(len(base), high - start) - low)
    except (AttributeError, OSError, ValueError):
        pass


_byte_bounds = getattr(getattr(np.lib, "array_utils", np), "byte_bounds")  # numpy >= 2 moved it


def row_blocks(array: np.ndarray, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """`array` in C-contiguous blocks of whole rows, about `block_bytes` each; a memory-mapped array's pages
    are released (release_pages) once the consumer has moved on to the next block."""
    row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
    step = max(1, block_bytes // row_bytes)
    for start in range(0, len(array), step):
        block = array[start:start + step]
        yield np.ascontiguousarray(block)
        release_pages(block)


def picture_blocks(pictures: Pictures, spans: np.ndarray, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """The bytes `spans` (int64 (P, 2)) cover, in their order, as uint8 blocks of at most `block_bytes` (spans
    that follow one another read as one run); a memory-mapped blob's pages are released (release_pages) once
    the consumer has moved on to the next block."""
    if len(spans) == 0:
        return
    breaks = np.flatnonzero(spans[1:, 0] != spans[:-1, 1]) + 1  # where a run of adjacent spans ends
    run_starts = spans[np.concatenate([[0], breaks]), 0]
    run_ends = spans[np.concatenate([breaks - 1, [len(spans) - 1]]), 1]
    for start, end in zip(run_starts.tolist(), run_ends.tolist()):
        for low in range(start, end, block_bytes):
            for piece in pictures.pieces(low, min(end, low + block_bytes)):
                yield piece
                release_pages(piece)


def pictures_sha256(pictures: Pictures) -> str:
    """sha256 of the pictures as the rows show them: which picture each row shows, each picture's length, then
    every picture's bytes once, in the order the rows first show them, streamed a block at a time. Where the bytes
    lie does not count: the same rows cut out of a larger set, or joined from two splits, give the same value."""
    which, spans = pictures.distinct()
    digest = hashlib.sha256(f"{len(which)} rows, {len(spans)} pictures;".encode())
    digest.update(which.astype("<i8").tobytes())
    digest.update((spans[:, 1] - spans[:, 0]).astype("<i8").tobytes())
    for block in picture_blocks(pictures, spans):
        digest.update(memoryview(np.ascontiguousarray(block)).cast("B"))
    return digest.hexdigest()


def write_picture_bytes(path: Path, pictures: Pictures) -> np.ndarray:
    """The bytes of `pictures`' rows as one uint8 .npy at `path`, each picture once in the order the rows first
    show it (a subset keeps only its own pictures); returns the rows' spans int64 (N, 2) into that file."""
    which, spans = pictures.distinct()
    lengths = spans[:, 1] - spans[:, 0]
    ends = np.cumsum(lengths)
    writer = NpyRows(path, np.uint8, (), int(ends[-1]) if len(ends) else 0)
    for block in picture_blocks(pictures, spans):
        writer.extend(block)
    writer.close()
    return np.stack([ends - lengths, ends], axis=1)[which]  # (N, 2)


def split_file(folder: Path, stem: str, field: str) -> Path:
    """Where save_split keeps one array of a split."""
    return folder / f"{stem}.{field}.npy"


PICTURE_FILES = ("picture_bytes", "picture_spans")
"""The files (split_file's fields) of a split's `pictures`: the encoded bytes and each row's span into them."""


def save_split(folder: Path, stem: str, data: ImageClassData | TextClassData | PairData,
               written: Sequence[str] = ()) -> None:
    """Every field of `data` into `folder`: arrays as `<stem>.<field>.npy`, the pictures as `<stem>.picture_bytes.npy`
    and `<stem>.picture_spans.npy`, strings as `<stem>.strings.json`; the fields (or picture files) in `written`
    are already there (build.py streams the pictures straight into their files)."""
    strings = {}
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        if value is None or field.name in written:
            continue
        if isinstance(value, tuple):
            strings[field.name] = list(value)
            continue
        if isinstance(value, Pictures):
            spans = value.spans
            if "picture_bytes" not in written:
                spans = write_picture_bytes(split_file(folder, stem, "picture_bytes"), value)
            _save_array(split_file(folder, stem, "picture_spans"), spans)
            continue
        _save_array(split_file(folder, stem, field.name), value)
    (folder / f"{stem}.strings.json").write_text(json.dumps(strings))


def _save_array(path: Path, value: np.ndarray) -> None:
    writer = NpyRows(path, value.dtype, value.shape[1:], len(value))
    for block in row_blocks(value):
        writer.extend(block)
    writer.close()


def load_split(folder: Path, stem: str, cls: type[Data]) -> Data:
    """A split saved by save_split: its arrays memory-mapped read-only, its strings from JSON. Raises OSError,
    ValueError or KeyError when a file is missing or damaged."""
    strings = json.loads((folder / f"{stem}.strings.json").read_text())
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in strings:
            values[field.name] = tuple(strings[field.name])
            continue
        if field.name == "pictures":
            blob, spans = (split_file(folder, stem, name) for name in PICTURE_FILES)
            if spans.exists():
                values["pictures"] = Pictures((open_npy(blob),), open_npy(spans))
            continue
        path = split_file(folder, stem, field.name)
        if not path.exists() and field.default is not dataclasses.MISSING:
            continue
        values[field.name] = open_npy(path)
    return cls(**values)


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path` (created with its folder): one process builds a cached file while
    others (a fleet starting at once) wait, then read it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builds just write the same files twice
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_lock(name: str) -> contextlib.AbstractContextManager[None]:
    """One process prepares a data set while others wait, then read its files."""
    return file_lock(cache_dir() / "prepared" / f".{name}.lock")


def load_prepared(name: str, split: str, cls: type[Data], build: Callable[[], dict[str, Data]]) -> Data:
    """Data set `name`'s `split` from its prepared file, or `build()` (every split) under a lock and cached."""
    _check_split(split)
    path = prepared_path(name, split)
    data = read_prepared(path, cls)
    if data is not None:
        return data
    with _build_lock(name):
        data = read_prepared(path, cls)  # prepared by another process while this one waited
        if data is not None:
            return data
        built = build()
        for s, d in built.items():
            write_prepared(prepared_path(name, s), d)
    return built[split]


def stratified_split(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices with round(test_fraction * N) test rows in all, shared among the
    labels in proportion to their sizes (largest remainders get the rounding), each label's test rows
    drawn at random."""
    labels = np.asarray(labels)
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    values, counts = np.unique(labels, return_counts=True)
    quotas = test_fraction * counts
    n_test = np.floor(quotas).astype(np.int64)
    short = int(round(test_fraction * len(labels))) - int(n_test.sum())
    n_test[np.argsort(-(quotas - n_test), kind="stable")[:short]] += 1
    rng = np.random.RandomState(seed)  # legacy generator: its stream is frozen across numpy versions
    train, test = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for value, k in zip(values, n_test):
        rows = rng.permutation(np.flatnonzero(labels == value))
        test.append(rows[:k])
        train.append(rows[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def corrupt(what: str, path: Path, detail: str) -> DataMissingError:
    """What a parser raises for a packaged file that is not what it expects: remove and fetch again."""
    return DataMissingError(
        f"{what} at {path} is damaged or not what was expected ({detail}); remove "
        f"{cache_dir() / 'root'} and run `fedafd-cloud data fetch` again"
    )
