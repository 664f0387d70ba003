"""The data config: how a source's columns and labels map onto fedafd's rows (`data_config = "FILE.toml"`).

Every key has a default and a one-line docstring; an unknown key or a value of the wrong type is an
error naming the key, so a typo never falls back silently. AG News' headerless CSV, for example:

    columns = ["class", "title", "description"]
    header = false
    label_column = "class"
    text_columns = ["title", "description"]
    label_offset = 1
    class_names = ["World", "Sports", "Business", "Sci/Tech"]
    unescape = true
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedafd.runtime.tomlfile import read_toml
from fedafd.runtime.data.sources.records import DataFormatError


@dataclass(frozen=True)
class DataOptions:
    format: str = "auto"
    """The source's format (registry.FORMATS), or auto: told from the path."""
    train_splits: tuple[str, ...] = ("train", "restval")
    """The source's splits that make the training rows (Karpathy's restval joins train, as is standard)."""
    test_splits: tuple[str, ...] = ("test",)
    """The source's splits that make the test rows (empty: none; then test_data or test_fraction)."""
    split: str = ""
    """Take only this split of the source as its rows (e.g. "test" of a Karpathy JSON for the server's eval_data)."""
    label_column: str = "label"
    """Column (CSV, JSONL, parquet) or field holding the class."""
    label_offset: int = 0
    """Subtracted from integer labels (1 for AG News' classes 1-4)."""
    class_names: tuple[str, ...] = ()
    """The classes in label order; empty: sorted label strings, or "0".."K-1" for integer labels."""
    num_classes: int = 0
    """K for integer labels without class_names (0: the largest label + 1)."""
    text_columns: tuple[str, ...] = ("text",)
    """Columns joined (with a space) into a row's text."""
    columns: tuple[str, ...] = ()
    """Column names of a CSV/TSV without a header row (set header = false)."""
    header: bool = True
    """Whether the CSV/TSV's first row names its columns."""
    delimiter: str = ""
    """CSV field delimiter ("": ',' for .csv, a tab for .tsv)."""
    unescape: bool = False
    """Replace a literal backslash-n in texts by a newline and backslash-quote by a quote (AG News stores them so)."""
    path_column: str = ""
    """Column of a manifest holding the image path ("": the first of path, file_name, image, filename present)."""
    caption_column: str = "text"
    """Column holding a caption (metadata.jsonl, parquet pairs)."""
    image_column: str = "image"
    """Column holding an image (parquet and save_to_disk: an HF Image struct or bytes)."""
    group_column: str = ""
    """Column holding a pair's category, for partitioning ("": none)."""
    group_names: tuple[str, ...] = ()
    """The pairs' categories in index order; empty: the sorted group strings."""
    natural_id_column: str = ""
    """Column holding each row's natural id (a writer, a user, a site): the `natural` partitioner's key."""
    image_root: str = ""
    """Folder that image paths are relative to ("": the manifest's own folder; COCO: its images folder)."""
    max_picture_side: int = 0
    """Longest side of the pictures kept at source resolution beside the 32 px ones (for towers with their own
    input size): a larger picture is kept downscaled, aspect ratio kept (Lanczos), as PNG; 0: as the source has it."""

    def __post_init__(self) -> None:
        if self.max_picture_side < 0:
            raise DataFormatError(f"data config: max_picture_side must be 0 (no cap) or a side in pixels, got "
                                  f"{self.max_picture_side}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "data config") -> "DataOptions":
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        converted = {}
        for key, value in values.items():
            if key not in fields:
                raise DataFormatError(f"{source}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
            converted[key] = _convert(source, key, value, hints[key])
        return cls(**converted)

    def with_values(self, **values: Any) -> "DataOptions":
        return dataclasses.replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def load_options(path: str | Path | None, **overrides: Any) -> DataOptions:
    """The data config TOML at `path` ("" or None: the defaults), then `overrides` that are not None/""."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        values = read_toml(path, "data config", DataFormatError)
    values.update({k: v for k, v in overrides.items() if v not in (None, "")})
    return DataOptions.from_dict(values, str(path) if path else "data config")


def _convert(source: str, key: str, value: Any, target: Any) -> Any:
    origin = typing.get_origin(target)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise DataFormatError(f"{source}: {key} must be a list of strings, got {value!r}")
        return tuple(value)
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise DataFormatError(f"{source}: {key} must be true or false, got {value!r}")
    if target is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataFormatError(f"{source}: {key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise DataFormatError(f"{source}: {key} must be an integer, got {value!r}") from None
    if not isinstance(value, str):
        raise DataFormatError(f"{source}: {key} must be a string, got {value!r}")
    return value


DEFAULT_OPTIONS = DataOptions()
