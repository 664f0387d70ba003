"""What every file reader produces and how it reports bad input: rows as records (lazy images, texts,
labels), each with the file and row it came from, and the problems found on the way.

A reader never decodes a picture itself: an ImageRecord holds a function that opens it, so a reader only
walks the index of a data set (folders, a manifest, a JSON) and build.py decodes the pictures one at a time.
A bad row is reported through `Problems`: with on_bad_sample=error the first one raises DataFormatError
naming the file and row; with skip it is counted, left out, and the count goes into the run's metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

from fedafd.runtime.errors import FedafdError

ON_BAD_SAMPLE = ("error", "skip")
MAX_LISTED_PROBLEMS = 20
"""Problems kept with their text; the rest are only counted."""


class DataFormatError(FedafdError):
    """A data file or row is not what its format says; the message names the file and the row."""


@dataclass(frozen=True, slots=True)
class Where:
    """The file (and, where there is one, the row: 1-based line, record or list index) a record came from."""

    file: str
    row: int | None = None

    def __str__(self) -> str:
        return self.file if self.row is None else f"{self.file}, row {self.row}"


OpenImage = Callable[[], Any]
"""Returns the record's picture as a PIL image (opened when called; may raise on a bad file). A record whose
picture is the file its Where names holds None instead (one object less per picture: an index of a large data
set stays small)."""


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """A labelled picture (image classification)."""

    image: OpenImage | None
    label: int | str
    where: Where
    natural_id: str = ""
    """The row's value of the data config's natural_id_column (the `natural` partitioner's key), else ""."""


@dataclass(frozen=True, slots=True)
class TextRecord:
    """A labelled text (text classification)."""

    text: str
    label: int | str
    where: Where
    natural_id: str = ""


@dataclass(frozen=True, slots=True)
class PairRecord:
    """A picture with every caption written for it (image-text pairs; COCO and Flickr30k have five)."""

    image: OpenImage
    captions: tuple[str, ...]
    image_key: str
    """What identifies the picture in its source (a file name, an image id): two records with one key are one image."""
    where: Where
    group: int | str = 0
    """A category for partitioning (a folder, an emoji group); 0 where the source has none."""
    natural_id: str = ""


Record = Union[ImageRecord, TextRecord, PairRecord]


class LazyRecords:
    """Records made when iterated, from a compact index a reader keeps (file names, offsets): the same records
    on every pass, `len` of them. A reader of a large data set returns one instead of a list, so the rows it
    describes are never all objects at once."""

    def __init__(self, count: int, make: Callable[[], Iterator[Record]]):
        self.count = count
        self.make = make

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Record]:
        return self.make()
RECORD_OF_KIND: dict[str, type] = {"image": ImageRecord, "text": TextRecord, "multimodal": PairRecord}


class Splits(dict):
    """What a reader may return instead of a plain dict: its records per split, with the class names its files
    give in label order (CIFAR's batches.meta.txt, an npz's class_names, a ClassLabel feature), so integer
    labels keep their meaning and a class without rows keeps its place; the data config's class_names win."""

    def __init__(self, splits: dict | None = None, class_names: tuple[str, ...] = ()) -> None:
        super().__init__(splits or {})
        self.class_names = tuple(class_names)


@dataclass
class Problems:
    """Bad rows found while reading: raised at the first (error) or counted and skipped (skip)."""

    on_bad_sample: str = "error"
    listed: list[str] = field(default_factory=list)
    """The first MAX_LISTED_PROBLEMS, as `where: what` lines."""
    count: int = 0
    collect: bool = False
    """`data check`: keep going whatever on_bad_sample says, so every problem is listed and counted."""

    def __post_init__(self) -> None:
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise DataFormatError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, got {self.on_bad_sample!r}")

    def bad(self, where: Where | str, what: str) -> None:
        """A bad row: raise (on_bad_sample=error), else count it; the caller leaves the row out."""
        line = f"{where}: {what}"
        if self.on_bad_sample == "error" and not self.collect:
            raise DataFormatError(line)
        self.count += 1
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append(line)

    def fatal(self, where: Where | str, what: str) -> DataFormatError:
        """What to raise for a problem no row can be skipped for (a missing file, an unknown format): raised
        whatever on_bad_sample says; `data check` lists it too."""
        line = f"{where}: {what}"
        if self.collect:
            self.count += 1
            if len(self.listed) < MAX_LISTED_PROBLEMS:
                self.listed.append(line)
        return DataFormatError(line)
