"""Every data source fedafd reads, by format: `open_source(kind, location)` tells the format from the path (or
takes the data config's), reads it offline through its reader, builds the prepared arrays and caches them.

| format | kinds | what it reads |
|---|---|---|
| demo | all | the bundled Debian data sets, `demo:fashion_mnist`, `demo:wordnet`, `demo:emoji`, `demo:tuxpaint` |
| imagefolder | image, multimodal | `[train/|test/]<class>/<picture>`; pairs: a folder with `metadata.jsonl` (file_name, text) |
| csv, tsv, jsonl | all | a table: image (path, label), text (text columns, label), pairs (path, caption) |
| cifar | image | CIFAR-10/100 binary records (`data_batch_*.bin`, `train.bin`, `test.bin`) |
| npz | image | arrays `images` (N, H, W[, C]) and `labels`, read with allow_pickle=False |
| coco | multimodal | COCO captions JSON (`images` + `annotations`) |
| karpathy | multimodal | Karpathy's split JSON (`dataset_coco.json`, `dataset_flickr30k.json`) |
| parquet | all | Hugging Face parquet files (needs the `parquet` extra: pyarrow) |
| hf_disk | all | Hugging Face `save_to_disk` folders (needs the `parquet` extra: pyarrow) |

A reader is a module here with `KINDS` and `read(path, kind, options, problems) -> {split: [records]}`
(records.py). Pickle-based files are refused before they are opened; a name that looks like a hub id
and is no local path is refused too (fedafd never downloads).

A read source is cached under `cache_dir()/prepared/sources/<fingerprint>/` (the fingerprint covers the
format, the data config and the path, size and modification time of every file it may read: see
`source_fingerprint`), so a second load only maps arrays back. The folder holds, per split, one uncompressed
.npy per array (the pictures written as they are decoded, so a data set larger than memory builds and loads in
constant memory; their encoded originals beside them, pictures.py) and its strings as JSON, then `source.json`
(written last); no pickle. It is built in a temporary folder beside it and renamed into place. Its `digest`
(sha256 over every split's arrays, encoded pictures, class names and texts, streamed a block at a time) names it
in feature caches and in the public-set check at join.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedafd.runtime.data.fetch import cache_dir
from fedafd.runtime.data.pictures import Pictures
from fedafd.runtime.files import atomic_write
from fedafd.runtime.data.prepared import (
    ImageClassData, PairData, TextClassData, concat, file_lock, load_split, pictures_sha256, row_blocks,
    stratified_split, subset,
)
from fedafd.runtime.data.sources.build import Data, PictureSizes, build_splits, split_stem
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import DataFormatError, Problems

if TYPE_CHECKING:
    from fedafd.runtime.data.partition import PartitionerSpec

SOURCE_FORMAT = 3
"""Bumped whenever what a cached source holds changes, so stale caches are never read."""
DEMO = "demo:"
PUBLIC = "public"
"""The public image-text set's role: its records are pairs, like a multimodal device's."""

FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    # format -> (reader module under fedafd.runtime.data.sources, kinds it reads)
    "imagefolder": ("imagefolder", ("image", "multimodal")),
    "csv": ("tables", ("image", "text", "multimodal")),
    "tsv": ("tables", ("image", "text", "multimodal")),
    "jsonl": ("tables", ("image", "text", "multimodal")),
    "cifar": ("cifar", ("image",)),
    "npz": ("npz", ("image",)),
    "coco": ("coco", ("multimodal",)),
    "karpathy": ("coco", ("multimodal",)),
    "parquet": ("hf", ("image", "text", "multimodal")),
    "hf_disk": ("hf", ("image", "text", "multimodal")),
}
"""Every file format, the one place that says which reader reads it (docs/data.md)."""

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin.pkl")
PICKLE_FOLDERS = {
    "cifar-100-python": "download CIFAR-100's binary version (cifar-100-binary.tar.gz: train.bin, test.bin) and "
                        "point at that folder (format cifar)",
    "cifar-10-batches-py": "download CIFAR-10's binary version (cifar-10-binary.tar.gz: data_batch_*.bin) and "
                           "point at that folder (format cifar)",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """A read data source: its named splits as prepared arrays (a source without splits has one, "all")."""

    kind: str
    location: str
    format: str
    splits: dict[str, Data]
    digest: str
    """sha256 over every split's rows (equal for the same rows read through two formats that hold the same
    encoded pictures)."""
    skipped: int = 0
    """Rows left out with on_bad_sample=skip."""
    problems: tuple[str, ...] = ()
    """The first problems found (with skip or in `data check`)."""

    @property
    def name(self) -> str:
        """What names this source in feature caches: a demo set's own name, else `src` + its digest."""
        if self.format == "demo":
            return self.location[len(DEMO):]
        return f"src{self.digest[:16]}"

    def rows(self, splits: tuple[str, ...]) -> Data | None:
        """The named splits that exist, concatenated in the given order (None if none exists)."""
        present = [self.splits[s] for s in splits if s in self.splits]
        return concat(present) if present else None


# --- telling the format ------------------------------------------------------------------------


def refuse_unsafe(location: str) -> None:
    """Pickle files and hub ids are refused before anything is opened, each with what works instead."""
    path = Path(location)
    if path.name in PICKLE_FOLDERS:
        raise DataFormatError(f"{location}: the Python version of CIFAR is pickled, and fedafd never unpickles "
                              f"data; {PICKLE_FOLDERS[path.name]}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DataFormatError(
            f"{location}: {path.suffix} files are pickles, and fedafd never unpickles data; convert it once where "
            "you trust it, e.g. `python -c \"import numpy as np, pickle; d = pickle.load(open('IN', 'rb')); "
            "np.savez('OUT.npz', images=np.asarray(d['images']), labels=np.asarray(d['labels']))\"` (a .pt: torch's "
            "loader with weights_only=False), and point at the .npz (format npz)")
    if not path.exists() and _HUB_ID.match(location):
        raise DataFormatError(f"{location}: no such local path, and it looks like a hub id; fedafd never downloads "
                              "data: download it yourself (e.g. `datasets.load_dataset(...).save_to_disk(DIR)`) and "
                              "point at the folder")


def detect_format(path: Path, kind: str) -> str:
    """The format of a local path, told from its name and contents."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv", ".jsonl", ".npz", ".parquet"):
            return suffix[1:]
        if suffix == ".bin":
            return "cifar"
        if suffix == ".json":
            return _json_format(path)
        raise DataFormatError(f"{path}: cannot tell the format of a {suffix or 'suffix-less'} file; set format in "
                              f"the data config ({', '.join(FORMATS)})")
    if not path.is_dir():
        raise DataFormatError(f"{path}: no such file or folder")
    names = {p.name for p in path.iterdir()}
    if names & {"dataset_info.json", "state.json", "dataset_dict.json"}:
        return "hf_disk"
    if any(n.endswith(".bin") for n in names) and names & {"train.bin", "test.bin", "data_batch_1.bin"}:
        return "cifar"
    if any(n.endswith(".parquet") for n in names) or (path / "data").is_dir() and any(
            p.suffix == ".parquet" for p in (path / "data").iterdir()):
        return "parquet"
    if any(p.is_dir() for p in path.iterdir()) or names & {"metadata.jsonl", "metadata.csv"}:
        return "imagefolder"
    tables = {Path(n).suffix.lower() for n in names} & {".csv", ".tsv", ".jsonl"}
    if len(tables) == 1:  # a table per split: train.csv, test.csv
        return tables.pop()[1:]
    raise DataFormatError(f"{path}: cannot tell the format of this folder (no class folders, metadata.jsonl, "
                          f"tables of one kind, parquet, .bin or save_to_disk files); set format in the data config")


def _json_format(path: Path) -> str:
    """COCO captions or Karpathy's split JSON, told from the first kilobytes."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(1 << 16)
    if '"sentences"' in head or '"dataset"' in head and '"filename"' in head:
        return "karpathy"
    if '"annotations"' in head or '"images"' in head:
        return "coco"
    raise DataFormatError(f"{path}: a JSON that is neither COCO captions (images + annotations) nor Karpathy's "
                          "split JSON (images with sentences); for JSON lines name it .jsonl")


# --- reading -----------------------------------------------------------------------------------


def read_records(kind: str, path: Path, fmt: str, options: DataOptions, problems: Problems) -> dict:
    module_name, kinds = FORMATS[fmt]
    record_kind = "multimodal" if kind == PUBLIC else kind
    if record_kind not in kinds:
        raise DataFormatError(f"{path}: format {fmt} holds {' or '.join(kinds)} data, not {record_kind} "
                              f"({'pairs' if record_kind == 'multimodal' else record_kind + ' classification'})")
    module = importlib.import_module(f"fedafd.runtime.data.sources.{module_name}")
    return module.read(path, record_kind, dataclasses.replace(options, format=fmt), problems)


def resolve(kind: str, location: str | Path, options: DataOptions) -> tuple[Path, str]:
    """(the local path, its format) of a source location that is no demo set; unsafe or unknown ones refused."""
    location = str(location)
    refuse_unsafe(location)
    path = Path(location).expanduser()
    fmt = options.format if options.format != "auto" else detect_format(path, kind)
    if fmt not in FORMATS:
        raise DataFormatError(f"{location}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return path, fmt


def open_source(kind: str, location: str | Path, options: DataOptions | None = None, on_bad_sample: str = "error",
                problems: Problems | None = None, cache: bool = True) -> Source:
    """The source at `location` ("demo:NAME" or a local path) for a device `kind` (image, text, multimodal) or
    PUBLIC, read once and cached (its arrays memory-mapped, read-only). `problems` (data check) collects every
    problem instead of raising. Without the cache (tests) the rows are built in memory."""
    options = options or DataOptions()
    location = str(location)
    if location.startswith(DEMO):
        return demo_source(kind, location)
    path, fmt = resolve(kind, location, options)
    collecting = problems is not None and problems.collect
    problems = problems or Problems(on_bad_sample)
    if not cache or collecting:
        return read_source(kind, path, location, fmt, options, problems)
    fingerprint = source_fingerprint(kind, path, fmt, options, on_bad_sample)
    folder = sources_dir() / fingerprint
    cached = _read_cached(folder, kind, location)
    if cached is not None:
        return cached
    with file_lock(folder.parent / f".{fingerprint}.lock"):
        cached = _read_cached(folder, kind, location)
        if cached is not None:
            return cached
        with building_folder(folder.parent) as building:
            source = read_source(kind, path, location, fmt, options, problems, building)
            write_cached(building, source)
            install(building, folder)
    return _read_cached(folder, kind, location) or source


def sources_dir() -> Path:
    """Where read sources are cached, one folder per fingerprint."""
    return cache_dir() / "prepared" / "sources"


@contextlib.contextmanager
def building_folder(parent: Path) -> Iterator[Path]:
    """A fresh hidden folder in `parent` to build a source into; removed on the way out unless it was
    renamed into place (install)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(parent)
    building = Path(tempfile.mkdtemp(dir=parent, prefix=f".building-{os.getpid()}-"))
    try:
        yield building
    finally:
        shutil.rmtree(building, ignore_errors=True)


def remove_dead_builds(parent: Path) -> None:
    """Remove the building folders of processes that are gone (killed mid-build: nothing else removes them)."""
    for old in parent.glob(".building-*-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def install(building: Path, folder: Path) -> bool:
    """Rename a built source folder into its place (under the fingerprint's lock); a stale folder there (no
    source.json: a build that died) is removed first. False when a complete one is already there."""
    if (folder / "source.json").exists():
        return False
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    os.rename(building, folder)
    return True


def read_source(kind: str, path: Path, location: str, fmt: str, options: DataOptions, problems: Problems,
                folder: Path | None = None, sizes: dict[str, PictureSizes] | None = None) -> Source:
    """Read and build a source: into `folder` (streamed, memory-mapped) or memory (None). `sizes` gets each
    split's picture sizes as their files give them."""
    splits = read_records(kind, path, fmt, options, problems)
    if getattr(splits, "class_names", ()) and not options.class_names:  # records.Splits: the files' own class list
        options = options.with_values(class_names=splits.class_names)
    if options.split:
        if options.split not in splits:
            raise DataFormatError(f"{location}: no split {options.split!r} (it has {', '.join(sorted(splits))})")
        splits = {"all": splits[options.split]}
    built = build_splits("multimodal" if kind == PUBLIC else kind, splits, options, problems, folder, sizes)
    del splits  # the records (and what they hold open) before the digest streams over the arrays
    if not any(len(d) for d in built.values()):
        raise problems.fatal(location, "no usable rows")
    return Source(kind, location, fmt, built, data_digest(built), problems.count, tuple(problems.listed))


FINGERPRINT_SKIPS = ("prepared", "features")
"""Folders of the cache (cache_dir()) that a source's fingerprint never walks: what fedafd writes itself."""


def fingerprint_roots(path: Path, fmt: str, options: DataOptions) -> list[Path]:
    """What a source may read: its folder; or its file, every file under the file's folder (a manifest's
    pictures) and, for COCO, its images folder (`../val2017` beside the JSON's folder); and image_root."""
    roots = [path]
    if path.is_file():
        roots.append(path.parent)
        if fmt == "coco" and not options.image_root:
            from fedafd.runtime.data.sources.coco import coco_image_root

            roots.append(coco_image_root(path, options))
    if options.image_root:
        roots.append(Path(options.image_root).expanduser())
    resolved = [root.resolve() for root in roots]
    kept: list[Path] = []
    for root in sorted(set(resolved), key=lambda r: len(r.parts)):  # a root inside another is walked with it
        if not any(root.is_relative_to(other) and other.is_dir() for other in kept):
            kept.append(root)
    return kept


def _walk_files(root: Path, skips: set[str]) -> Iterator[str]:
    """Every file under `root` in a fixed order (sorted names, folder by folder), hidden entries and the folders
    in `skips` left out, without holding the whole listing."""
    if not root.is_dir():
        yield str(root)
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(folder, d) not in skips)
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(folder, name)


def source_fingerprint(kind: str, path: Path, fmt: str, options: DataOptions, on_bad_sample: str) -> str:
    """sha256 of what a cached source was built from: the settings and the path, size and mtime of every file
    under `fingerprint_roots` (hidden files and fedafd's own cache folders left out), so replacing one picture
    a manifest names builds the source again. Pictures a manifest names outside those folders (`../x.png`,
    absolute paths) are not covered: set image_root to their folder."""
    digest = hashlib.sha256(json.dumps({"v": SOURCE_FORMAT, "kind": kind, "format": fmt, "on_bad_sample": on_bad_sample,
                                        "options": options.as_dict(), "path": str(path.resolve())},
                                       sort_keys=True).encode())
    cache = cache_dir().resolve()
    skips = {str(cache / name) for name in FINGERPRINT_SKIPS}
    for root in fingerprint_roots(path, fmt, options):
        for file in _walk_files(root, skips):
            try:
                stat = os.stat(file)
                digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:  # a broken link or a file gone meanwhile: the reader reports it
                digest.update(f"{file}\0missing\n".encode())
    return digest.hexdigest()[:32]


STRINGS_CHUNK = 8192
"""Strings per json.dumps call in data_digest."""


def data_digest(splits: dict[str, Data]) -> str:
    """sha256 over every split's name, arrays, encoded pictures (pictures_sha256: each row's picture, wherever
    its bytes lie), class names and texts, in order; arrays are streamed a block at a time (memory-mapped ones
    released as it goes), so the value is the same in memory or on disk."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        data = splits[split]
        digest.update(f"{split};{type(data).__name__};".encode())
        for field in dataclasses.fields(data):
            value = getattr(data, field.name)
            if isinstance(value, np.ndarray):
                digest.update(f"{field.name}{value.dtype.str}{value.shape};".encode())
                for block in row_blocks(value) if value.ndim else [np.ascontiguousarray(value)]:
                    digest.update(memoryview(block).cast("B"))
            elif isinstance(value, Pictures):
                digest.update(f"{field.name}{pictures_sha256(value)};".encode())
            elif value is not None:
                digest.update(field.name.encode())
                _digest_strings(digest, list(value))
                digest.update(b";")
    return digest.hexdigest()


def _digest_strings(digest, values: list) -> None:
    """What `digest.update(json.dumps(values).encode())` adds, a chunk of strings at a time."""
    digest.update(b"[")
    for start in range(0, len(values), STRINGS_CHUNK):
        text = json.dumps(values[start:start + STRINGS_CHUNK])[1:-1]
        digest.update(((", " if start else "") + text).encode())
    digest.update(b"]")


_DATA_CLASSES = {"ImageClassData": ImageClassData, "TextClassData": TextClassData, "PairData": PairData}


def _read_cached(folder: Path, kind: str, location: str) -> Source | None:
    try:
        meta = json.loads((folder / "source.json").read_text())
        splits = {split: load_split(folder, entry["stem"], _DATA_CLASSES[entry["class"]])
                  for split, entry in meta["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Source(kind, location, meta["format"], splits, meta["digest"], meta["skipped"], tuple(meta["problems"]))


def write_cached(folder: Path, source: Source) -> None:
    """source.json beside the split files read_source built into `folder`, written last: a folder without it
    is not a cached source."""
    meta = {"format": source.format, "digest": source.digest, "skipped": source.skipped,
            "problems": list(source.problems), "location": source.location,
            "splits": {split: {"class": type(data).__name__, "stem": split_stem(i)}
                       for i, (split, data) in enumerate(source.splits.items())}}
    atomic_write(folder / "source.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))


# --- the bundled data sets as sources ----------------------------------------------------------


DEMO_DEFAULTS = {"image": "demo:fashion_mnist", "text": "demo:wordnet", "multimodal": "demo:tuxpaint",
                 PUBLIC: "demo:emoji"}
"""The source each role reads when none is configured: what the README's demo runs on."""


@functools.lru_cache(maxsize=None)
def demo_source(kind: str, location: str) -> Source:
    """A bundled data set as a source: the rows a federation has always read (Fashion-MNIST and WordNet cut to
    their TASK_POOL rows), "train" and "test"."""
    from fedafd.runtime.data.datasets import CATALOGUE, TASK_POOL, pool_rows

    name = location[len(DEMO):]
    dataset = next((d for d in CATALOGUE if d.name == name), None)
    if dataset is None:
        raise DataFormatError(f"{location}: no such bundled data set; known: "
                              f"{', '.join(DEMO + d.name for d in CATALOGUE)}")
    wanted = "multimodal" if kind == PUBLIC else kind
    serves = "multimodal" if dataset.serves == PUBLIC else dataset.serves
    if serves != wanted:
        raise DataFormatError(f"{location} holds {serves} data, not {wanted}")
    splits = {}
    for split in ("train", "test"):
        data = dataset.load(split)
        if dataset.serves in TASK_POOL:
            labels = data.labels
            data = subset(data, pool_rows(labels, TASK_POOL[dataset.serves][split]))
        splits[split] = data
    return Source(kind, location, "demo", splits, data_digest(splits))


# --- a device's train and test rows ------------------------------------------------------------


def split_labels(data: Data) -> np.ndarray:
    """What a split is stratified by (and what partitioners read): classes, or a pair's group."""
    return data.groups if isinstance(data, PairData) else data.labels


def train_test(source: Source, options: DataOptions, test: Source | None = None, test_fraction: float = 0.2,
               seed: int = 0) -> tuple[Data, Data]:
    """A device's (train, test) rows of a source: its train splits and its test splits; or, when it has no
    test split, the rows of `test` (test_data) or a stratified, seeded test_fraction of its train rows (the
    captions of one picture stay on one side)."""
    train = source.rows(options.train_splits) or source.rows(("all",))
    if train is None:
        raise DataFormatError(f"{source.location}: none of the train splits {list(options.train_splits)} "
                              f"(it has {', '.join(sorted(source.splits))})")
    if test is not None:
        held = test.rows(options.test_splits) or test.rows(("all",)) or test.rows(options.train_splits)
        if held is None:
            raise DataFormatError(f"{test.location}: it has no rows to test on")
        return train, held
    held = source.rows(options.test_splits) if options.test_splits else None
    if held is not None:
        return train, held
    if not 0 < test_fraction < 1:
        raise DataFormatError(f"{source.location} has no test split: give test_data, or test_fraction in (0, 1)")
    train_rows, test_rows = split_by_picture(train, test_fraction, seed)
    if len(test_rows) == 0 or len(train_rows) == 0:
        raise DataFormatError(f"{source.location}: {len(train)} rows are too few for test_fraction {test_fraction}")
    return subset(train, train_rows), subset(train, test_rows)


def split_by_picture(data: Data, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) rows; pairs are split by picture, so no picture is on both sides."""
    labels = split_labels(data)
    if not isinstance(data, PairData):
        return stratified_split(labels, test_fraction, seed)
    first = np.unique(data.image_ids, return_index=True)[1]  # one row per picture
    train_pics, test_pics = stratified_split(labels[first], test_fraction, seed)
    picture_ids = data.image_ids[first]
    in_test = np.isin(data.image_ids, picture_ids[test_pics])
    return np.flatnonzero(~in_test), np.flatnonzero(in_test)


def partition_data(data: Data, partitioner: "PartitionerSpec", num_partitions: int, seed: int) -> list[np.ndarray]:
    """Each device's rows of `data` by the partitioner, over its classes (pairs: their groups). Pairs are
    partitioned by picture, so the captions of one picture stay on one device."""
    from fedafd.runtime.data.partition import partition_rows

    labels = split_labels(data)
    natural = list(data.natural_ids) if data.natural_ids else None
    if not isinstance(data, PairData) or len(np.unique(data.image_ids)) == len(data.image_ids):
        return partition_rows(partitioner, labels, num_partitions, seed, natural)
    ids, first = np.unique(data.image_ids, return_index=True)
    parts = partition_rows(partitioner, labels[first], num_partitions, seed,
                           None if natural is None else [natural[i] for i in first])
    return [np.flatnonzero(np.isin(data.image_ids, ids[part])) for part in parts]
