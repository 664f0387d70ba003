"""The real data sets, prepared once into arrays: images in the one image format (uint8 (N, 3, 32, 32)),
texts through the one tokenizer (int64 (N, MAX_TEXT_LEN)).

| loader | Debian package | rows | stands in for |
|---|---|---|---|
| load_fashion_mnist | dataset-fashion-mnist | 60,000 train / 10,000 test, 10 classes | CIFAR-100 |
| load_wordnet_topics | wordnet-base | 39,195 train / 9,799 test glosses, 8 topics | AG News |
| load_emoji_pairs | fonts-noto-color-emoji, unicode-data | 1,496 train (public set P) / 374 test | MS-COCO |
| load_tuxpaint_pairs | tuxpaint-stamps-default | 760 train / 190 test, 16 categories | Flickr30k |

The first load of a data set reads the packaged files (see fetch.py), renders or rasterises its images,
tokenizes its texts and writes both splits to `cache_dir()/prepared/<name>-<split>-v1.npz` (atomically,
no pickle: strings are fixed-width unicode arrays); later loads read those files. Splits other than
Fashion-MNIST's own are stratified by label and drawn with a fixed seed from numpy's legacy RandomState,
whose stream numpy keeps stable across versions, so the split never changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from fedafd.runtime.data.fetch import DataMissingError, cache_dir, fetch, locate
from fedafd.runtime.data.images import IMAGE_SIZE, from_grayscale_28, from_pil

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
CACHE_VERSION = 1
"""Bumped whenever what a prepared file holds changes, so stale caches are never read."""
TEST_FRACTION = 0.2
"""Share of every label's rows that goes to "test" (WordNet topics, emoji, Tux Paint)."""
SPLIT_SEED = 20240611
"""Seed of the fixed train/test splits."""

FASHION_MNIST_DIR = "usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}

WORDNET_NOUNS = "usr/share/wordnet/data.noun"
# WordNet 3.0's lexicographer files, indexed by field 2 of a data.* line (lexnames(5WN)).
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time",
)
# Concrete topics that the emoji names also cover (clothing and objects, people, plants, animals, places,
# substances, food, body parts); the class index is the position here.
WORDNET_TOPICS = ("artifact", "person", "plant", "animal", "location", "substance", "food", "body")

EMOJI_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
EMOJI_FONT_SIZE = 109  # the only size at which FreeType loads the font's 136x128 colour bitmaps
_SKIN_TONES = range(0x1F3FB, 0x1F400)

TUXPAINT_STAMPS = "usr/share/tuxpaint/stamps"
_SVG_RENDER_PX = 4 * IMAGE_SIZE  # SVGs are rasterised at this longest side, then resized like any picture


@dataclass(frozen=True, eq=False)
class ImageClassData:
    """Labelled images: the image task (Fashion-MNIST)."""

    images: np.ndarray
    """uint8 (N, 3, 32, 32), RGB."""
    labels: np.ndarray
    """int64 (N,), indices into class_names."""
    class_names: tuple[str, ...]

    ROWS: ClassVar[tuple[str, ...]] = ("images", "labels")

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

    ROWS: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "labels", "texts")

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

    ROWS: ClassVar[tuple[str, ...]] = ("images", "input_ids", "attention_mask", "captions", "groups")

    def __post_init__(self) -> None:
        _check_rows(self)

    def __len__(self) -> int:
        return len(self.groups)


Data = TypeVar("Data", ImageClassData, TextClassData, PairData)


def _check_rows(data: ImageClassData | TextClassData | PairData) -> None:
    lengths = {name: len(getattr(data, name)) for name in data.ROWS}
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
        changes[name] = tuple(value[i] for i in indices) if isinstance(value, tuple) else value[indices]
    return dataclasses.replace(data, **changes)


# --- the prepared-array cache -------------------------------------------------------------------


def prepared_path(name: str, split: str) -> Path:
    return cache_dir() / "prepared" / f"{name}-{split}-v{CACHE_VERSION}.npz"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _write(path: Path, data: ImageClassData | TextClassData | PairData) -> None:
    arrays = {}
    for field in dataclasses.fields(data):
        value = getattr(data, field.name)
        if isinstance(value, tuple):  # strings: fixed-width unicode, never object arrays
            value = np.array(value, dtype=str) if value else np.zeros(0, dtype="<U1")
        arrays[field.name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path, cls: type[Data]) -> Data | None:
    """The cached data, or None when the file is absent or unreadable (then it is built again)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            values = {}
            for field in dataclasses.fields(cls):
                array = stored[field.name]
                values[field.name] = tuple(array.tolist()) if array.dtype.kind == "U" else array
        return cls(**values)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        logger.warning("unreadable prepared data %s (%s); preparing it again", path, err)
        return None


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


def _load(name: str, split: str, cls: type[Data], build: Callable[[], dict[str, Data]]) -> Data:
    _check_split(split)
    path = prepared_path(name, split)
    data = _read(path, cls)
    if data is not None:
        return data
    with _build_lock(name):
        data = _read(path, cls)  # prepared by another process while this one waited
        if data is not None:
            return data
        built = build()
        for s, d in built.items():
            _write(prepared_path(name, s), d)
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


def _corrupt(what: str, path: Path, detail: str) -> DataMissingError:
    return DataMissingError(
        f"{what} at {path} is damaged or not what was expected ({detail}); remove "
        f"{cache_dir() / 'root'} and run `fedafd-cloud data fetch` again"
    )


# --- Fashion-MNIST -----------------------------------------------------------------------------


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An idx file (gzip): big-endian magic (0x08 = uint8, then the number of dimensions), the dimensions,
    then the bytes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise _corrupt("Fashion-MNIST file", path, str(err)) from None
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise _corrupt("Fashion-MNIST file", path, f"magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != int(np.prod(dims)):
        raise _corrupt("Fashion-MNIST file", path, f"{len(raw) - header} bytes of data for shape {dims}")
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
            raise _corrupt("Fashion-MNIST", image_path.parent,
                           f"{split}: images {images.shape}, labels {labels.shape}, expected {expected} of 28x28")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise _corrupt("Fashion-MNIST labels", label_path, f"label {labels.max()} out of range")
        out[split] = ImageClassData(from_grayscale_28(images), labels.astype(np.int64), FASHION_MNIST_CLASSES)
    return out


def load_fashion_mnist(split: str) -> ImageClassData:
    """Fashion-MNIST: "train" 60,000 / "test" 10,000 images, 10 balanced classes (white on black)."""
    return _load("fashion_mnist", split, ImageClassData, _build_fashion_mnist)


# --- WordNet topics ----------------------------------------------------------------------------


def _read_wordnet_glosses(path: Path) -> tuple[list[str], list[int]]:
    """Glosses of the noun synsets in WORDNET_TOPICS and their topic index. A data.noun line reads
    `offset lex_filenum n word_count words... pointers... | gloss`; licence lines start with two spaces."""
    wanted = {WORDNET_LEXNAMES.index(f"noun.{topic}"): label for label, topic in enumerate(WORDNET_TOPICS)}
    texts, labels, synsets = [], [], 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue
            fields = line.split(" ", 3)
            head, sep, gloss = line.partition(" | ")
            if len(fields) < 4 or not fields[1].isdigit() or not sep:
                raise _corrupt("WordNet noun file", path, f"line {number} is not a synset")
            lexfile = int(fields[1])
            if lexfile >= len(WORDNET_LEXNAMES):
                raise _corrupt("WordNet noun file", path, f"line {number}: lexicographer file {lexfile}")
            synsets += 1
            if lexfile in wanted and gloss.strip():
                texts.append(gloss.strip())
                labels.append(wanted[lexfile])
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(WORDNET_TOPICS))
    if synsets == 0 or counts.min() == 0:
        raise _corrupt("WordNet noun file", path, f"{synsets} synsets, per topic {counts.tolist()}")
    return texts, labels


def _build_wordnet() -> dict[str, TextClassData]:
    from fedafd.runtime.data.text import tokenize

    texts, labels = _read_wordnet_glosses(locate(WORDNET_NOUNS, "wordnet"))
    labels_array = np.asarray(labels, dtype=np.int64)
    input_ids, attention_mask = tokenize(texts)
    everything = TextClassData(input_ids, attention_mask, labels_array, WORDNET_TOPICS, tuple(texts))
    train, test = stratified_split(labels_array)
    return {"train": subset(everything, train), "test": subset(everything, test)}


def load_wordnet_topics(split: str) -> TextClassData:
    """WordNet 3.0 noun glosses labelled by topic (WORDNET_TOPICS, 48,994 texts): "train" 39,195 / "test"
    9,799, a fixed stratified 80/20 split."""
    return _load("wordnet", split, TextClassData, _build_wordnet)


# --- Emoji -------------------------------------------------------------------------------------


def _read_emoji_list(path: Path) -> list[tuple[str, str, str]]:
    """(emoji, English name, group) for every fully-qualified emoji of emoji-test.txt without a skin tone.
    Lines read `1F600 ; fully-qualified # 😀 E1.0 grinning face` under `# group: ...` headings."""
    rows, group = [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
                continue
            if not line.strip() or line.startswith("#"):
                continue
            codes, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            parts = comment.split(None, 2)
            try:
                points = [int(code, 16) for code in codes.split()]
            except ValueError:
                points = []
            if not points or len(parts) != 3 or group is None:
                raise _corrupt("emoji list", path, f"line {number} is not an emoji entry")
            if status.strip() != "fully-qualified" or any(p in _SKIN_TONES for p in points):
                continue
            rows.append(("".join(map(chr, points)), parts[2].strip(), group))
    if not rows:
        raise _corrupt("emoji list", path, "no fully-qualified emoji")
    return rows


def _render_emoji(font, emoji: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    _, _, right, bottom = font.getbbox(emoji)
    canvas = Image.new("RGB", (max(1, right), max(1, bottom)), (255, 255, 255))
    ImageDraw.Draw(canvas).text((0, 0), emoji, font=font, embedded_color=True)
    return from_pil(canvas)


def _build_emoji() -> dict[str, PairData]:
    from PIL import ImageFont

    from fedafd.runtime.data.text import tokenize

    rows = _read_emoji_list(locate(EMOJI_TEST, "emoji"))
    font_path = locate(EMOJI_FONT, "emoji")
    try:
        font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE)
    except OSError as err:
        raise _corrupt("emoji font", font_path, str(err)) from None
    images = np.stack([_render_emoji(font, emoji) for emoji, _, _ in rows])  # (N, 3, 32, 32)
    blank = np.flatnonzero((images == 255).all(axis=(1, 2, 3)))
    if len(blank):  # a glyph the font lacks: keep the pair set honest by dropping it
        logger.warning("the emoji font has no picture for %d emoji, e.g. %s", len(blank), rows[blank[0]][1])
        keep = np.setdiff1d(np.arange(len(rows)), blank)
        images, rows = images[keep], [rows[i] for i in keep]
    group_names = tuple(dict.fromkeys(group for _, _, group in rows))
    groups = np.array([group_names.index(group) for _, _, group in rows], dtype=np.int64)
    captions = tuple(name for _, name, _ in rows)
    input_ids, attention_mask = tokenize(list(captions))
    everything = PairData(images, input_ids, attention_mask, captions, groups, group_names)
    train, test = stratified_split(groups)
    return {"train": subset(everything, train), "test": subset(everything, test)}


def load_emoji_pairs(split: str) -> PairData:
    """1,870 base emoji (fully-qualified, no skin tones) drawn from Noto Color Emoji, captioned with their
    Unicode names, grouped by emoji group (9): "train" 1,496 (the public set P) / "test" 374 (the server's
    held-out retrieval split), a fixed stratified 80/20 split."""
    return _load("emoji", split, PairData, _build_emoji)


# --- Tux Paint stamps --------------------------------------------------------------------------


def _read_stamp_image(path: Path) -> np.ndarray:
    from PIL import Image

    if path.suffix == ".svg":
        import cairosvg

        # The longest side comes out >= _SVG_RENDER_PX whatever the aspect ratio; parsing costs more than
        # drawing, so one render at a fixed width beats measuring first.
        png = cairosvg.svg2png(url=str(path), output_width=_SVG_RENDER_PX, unsafe=True)
        return from_pil(Image.open(io.BytesIO(png)))
    with Image.open(path) as img:
        return from_pil(img)


def _build_tuxpaint() -> dict[str, PairData]:
    from fedafd.runtime.data.text import tokenize

    stamps = locate(TUXPAINT_STAMPS, "tuxpaint")
    images, captions, categories = [], [], []
    for text_path in sorted(stamps.rglob("*.txt"), key=lambda p: p.relative_to(stamps).as_posix()):
        # A stamp is picture + caption file; PNG preferred where both a PNG and an SVG exist (83 stamps).
        picture = next((p for p in (text_path.with_suffix(".png"), text_path.with_suffix(".svg")) if p.exists()), None)
        if picture is None or len(text_path.relative_to(stamps).parts) < 2:
            continue
        with open(text_path, encoding="utf-8-sig", errors="replace") as f:
            caption = f.readline().strip()
        if not caption:
            continue
        try:
            images.append(_read_stamp_image(picture))
        except Exception as err:  # noqa: BLE001 - one unreadable stamp should not sink the data set
            logger.warning("skipping Tux Paint stamp %s: %s", picture, err)
            continue
        captions.append(caption)
        categories.append(text_path.relative_to(stamps).parts[0])
    if len(captions) < 100:
        raise _corrupt("Tux Paint stamps", stamps, f"only {len(captions)} stamps with a picture and caption")
    group_names = tuple(sorted(set(categories)))
    groups = np.array([group_names.index(c) for c in categories], dtype=np.int64)
    input_ids, attention_mask = tokenize(captions)
    everything = PairData(np.stack(images), input_ids, attention_mask, tuple(captions), groups, group_names)
    train, test = stratified_split(groups)
    return {"train": subset(everything, train), "test": subset(everything, test)}


def load_tuxpaint_pairs(split: str) -> PairData:
    """950 Tux Paint stamps (785 PNG, 165 SVG) with their people-written English captions, grouped by
    category folder (16): "train" 760 / "test" 190, a fixed stratified 80/20 split."""
    return _load("tuxpaint", split, PairData, _build_tuxpaint)


# --- all at once -------------------------------------------------------------------------------

LOADERS: dict[str, Callable[[str], ImageClassData | TextClassData | PairData]] = {
    "fashion_mnist": load_fashion_mnist,
    "wordnet": load_wordnet_topics,
    "emoji": load_emoji_pairs,
    "tuxpaint": load_tuxpaint_pairs,
}


def prepare_all(log: Callable[[str], object] = print) -> None:
    """Fetch whatever Debian package is missing (see fetch.fetch), then prepare every data set's cached
    arrays. Idempotent; what is already prepared is only read back."""
    fetch(log=log)
    for name, loader in LOADERS.items():
        start = time.perf_counter()
        sizes = {split: len(loader(split)) for split in SPLITS}
        log(f"{name}: {sizes['train']} train / {sizes['test']} test ({time.perf_counter() - start:.1f} s)")
