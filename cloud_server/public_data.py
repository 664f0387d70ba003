"""The server's data, as its config names it: the public set P's pool (public_data, optionally cut to the rows of
public_subset) and the retrieval test set (eval_data, or public_data's test split), checked before any round:
the subset's ids must name rows of the pool, and no eval picture may also be a public one."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedafd.runtime.config import ServerConfig
from fedafd.runtime.data.modal import ModalData, PublicSpec, load_public_data, public_source, public_spec
from fedafd.runtime.data.prepared import row_blocks
from fedafd.runtime.data.sources.records import DataFormatError
from fedafd.runtime.data.sources.registry import DEMO, DEMO_DEFAULTS, PUBLIC

log = logging.getLogger("fedafd.cloud")


@dataclass(frozen=True)
class ServerData:
    spec: PublicSpec
    eval_spec: PublicSpec | None
    digest: str
    """sha256 of the public source's rows: what every device's Join must name."""
    location: str

    bundled: bool = False
    """The eval set is the bundled emoji test split (two of its flags are drawn like public ones: a warning only)."""

    def load(self, backbones: tuple[str, ...]) -> tuple[ModalData, ModalData]:
        """(the pool P is drawn from, the retrieval test set), with the backbones' cached features. An eval
        picture that is also a public one is an error (on_bad_sample=skip: its rows are left out, counted)."""
        public = load_public_data("train", backbones, self.spec, self.eval_spec)
        test = load_public_data("test", backbones, self.spec, self.eval_spec)
        shared = _shared_rows(self.spec, self.eval_spec)
        if shared and self.bundled:
            log.warning("%s: %s", shared_line(shared, self.eval_location), BUNDLED_FLAGS)
        elif shared:
            if self.spec.on_bad_sample != "skip":
                raise DataFormatError(f"{shared_line(shared, self.eval_location)}: {NOT_ON_WHAT_IT_TRAINS_ON}; "
                                      "remove them, or set on_bad_sample = skip to leave them out")
            log.warning("%s: left out (on_bad_sample=skip)", shared_line(shared, self.eval_location))
            in_public = np.isin(test.picture_ids(), test.picture_ids()[[e for _, e in shared]])
            test = test.select(np.flatnonzero(~in_public))
        return public, test

    def check(self, config: ServerConfig) -> tuple[ModalData, ModalData, np.ndarray]:
        """What `serve` reads before it binds: the public pool, the eval set (no eval picture among the public
        ones) and the rows P is drawn from (public_subset's ids checked), without backbone features."""
        public, test = self.load(())
        return public, test, candidate_rows(config, len(public))

    def skipped_rows(self) -> int:
        """Bad rows left out of the public and eval sets (on_bad_sample=skip)."""
        return public_source(self.spec).skipped + (public_source(self.eval_spec).skipped if self.eval_spec else 0)

    @property
    def eval_location(self) -> str:
        return self.eval_spec.location if self.eval_spec is not None else self.location


@functools.lru_cache(maxsize=None)
def _shared_rows(spec: PublicSpec, eval_spec: PublicSpec | None) -> tuple[tuple[int, int], ...]:
    """shared_pictures of the public pool and the eval set, hashed once per process (serve checks before it binds,
    then ServerApp loads the same sets with their features)."""
    return tuple(shared_pictures(load_public_data("train", (), spec, eval_spec),
                                 load_public_data("test", (), spec, eval_spec)))


def server_data(config: ServerConfig) -> ServerData:
    """The public source read (or taken from its cache), so that its digest is known before devices join."""
    spec = public_spec(config.public_data, config.public_data_config, config.on_bad_sample)
    eval_spec = (public_spec(config.eval_data, config.eval_data_config, config.on_bad_sample)
                 if config.eval_data else None)
    source = public_source(spec)
    return ServerData(spec, eval_spec, source.digest, source.location, eval_is_bundled(config))


def eval_is_bundled(config: ServerConfig) -> bool:
    """Whether the server is tested on the bundled emoji's test split (whose shared flags are only a warning)."""
    return (config.eval_data or config.public_data or DEMO_DEFAULTS[PUBLIC]).startswith(DEMO)


def candidate_rows(config: ServerConfig, pool_size: int) -> np.ndarray:
    """The pool rows P is drawn from: public_subset's ids (sorted), or every row."""
    if not config.public_subset:
        return np.arange(pool_size)
    return read_subset(Path(config.public_subset), pool_size)


def read_subset(path: Path, pool_size: int) -> np.ndarray:
    """Row ids from a file: one integer per line (blank lines and # comments ignored) or one JSON list."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataFormatError(f"public_subset file not found: {path}") from None
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: not a JSON list of row ids ({err})") from None
        items = [(i + 1, v) for i, v in enumerate(values)]
    else:
        items = [(n, line.split("#")[0].strip()) for n, line in enumerate(text.splitlines(), 1)]
        items = [(n, v) for n, v in items if v]
    ids, seen = [], set()
    for row, value in items:
        try:
            rid = int(value)
            if isinstance(value, (bool, float)):
                raise ValueError
        except (TypeError, ValueError):
            raise DataFormatError(f"{path}, row {row}: {value!r} is not an integer row id") from None
        if not 0 <= rid < pool_size:
            raise DataFormatError(f"{path}, row {row}: row id {rid} is outside the public set's {pool_size} rows")
        if rid in seen:
            raise DataFormatError(f"{path}, row {row}: row id {rid} is listed twice")
        seen.add(rid)
        ids.append(rid)
    if not ids:
        raise DataFormatError(f"{path}: no row ids")
    return np.sort(np.asarray(ids, dtype=np.int64))


BUNDLED_FLAGS = ("the bundled emoji test split has pictures drawn like public ones (e.g. the flags of France and "
                 "Clipperton Island); kept, as the demo always has")
NOT_ON_WHAT_IT_TRAINS_ON = "the server would be tested on what it trains on"


def shared_line(shared: Sequence[tuple[int, int]], eval_location: str) -> str:
    """What names the eval pictures that are also public ones (the first five, 1-based rows)."""
    rows = ", ".join(f"eval row {e + 1} = public row {p + 1}" for p, e in shared[:5])
    return f"{eval_location}: {len(shared)} eval picture(s) are also in the public set ({rows})"


def picture_hashes(data: ModalData) -> dict[str, int]:
    """sha256 of each distinct picture's pixels -> its first row, read a block of rows at a time (a memory-mapped
    set's pages are let go as it goes)."""
    images, pictures = data.inputs["image"][0], data.picture_ids()
    first = set(np.unique(pictures, return_index=True)[1].tolist())
    hashes: dict[str, int] = {}
    row = 0
    for block in row_blocks(images):
        for offset, pixels in enumerate(block):
            if row + offset in first:
                hashes.setdefault(hashlib.sha256(pixels.tobytes()).hexdigest(), row + offset)
        row += len(block)
    return hashes


def shared_pictures(public: ModalData, test: ModalData) -> list[tuple[int, int]]:
    """(public row, eval row) of every eval picture whose pixels are also a public picture's."""
    public_hashes = picture_hashes(public)
    return [(public_hashes[h], row) for h, row in picture_hashes(test).items() if h in public_hashes]
