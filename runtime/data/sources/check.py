"""`data check`: what a device would train on, and every problem in its data, before anything trains.

`check_source(kind, location, options)` reads a source the way a device does (the format told from the path or
the data config, the test rows from its test split, test_data or test_fraction) with `Problems(collect=True)`,
so every bad file and row is listed (the first MAX_LISTED_PROBLEMS) and counted instead of stopping at the
first. The report (JSON-able) says:

    format, digest                  the source's, as the cache and the public-set check at join name it
    splits                          per split of the source: rows, and classes with rows per class (by name);
                                    pairs: pictures, captions per picture (min/mean/max), pictures per group
    train, test                     the same for the rows a device trains and tests on (train_test)
    images                          the pictures' own sizes, as their files give them (min/median/max width
                                    and height; array formats: the arrays' shape)
    problems, problem_count         the first problems as `where: what` lines, and how many there are

It streams like the cache build: pictures are decoded one at a time into a temporary folder beside the source
cache (only their 8-byte sizes are kept), so memory does not grow with the data set. When nothing was wrong, the
folder becomes the cached source that `join` then reads (the same rows it would build); otherwise it is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from fedafd.runtime.data.prepared import PairData, file_lock
from fedafd.runtime.data.sources.build import Data, PictureSizes
from fedafd.runtime.data.sources.options import DataOptions
from fedafd.runtime.data.sources.records import MAX_LISTED_PROBLEMS, DataFormatError, Problems
from fedafd.runtime.data.sources.registry import (
    DEMO, PUBLIC, Source, building_folder, install, open_source, read_source, resolve, source_fingerprint,
    sources_dir, train_test, write_cached,
)
from fedafd.runtime.errors import FedafdError

_HEAVY = ("images", "input_ids", "attention_mask")
"""Row fields a report never needs: replaced by zero-width arrays before the train/test rows are drawn."""


class CheckProblems(Problems):
    """Problems of `data check` (collect=True), remembering the last fatal line so that the error it raises is
    not listed twice."""

    def __init__(self, on_bad_sample: str = "error") -> None:
        super().__init__(on_bad_sample, collect=True)
        self.last_fatal = ""

    def fatal(self, where: Any, what: str) -> DataFormatError:
        error = super().fatal(where, what)
        self.last_fatal = str(error)
        return error

    def note(self, err: BaseException) -> None:
        """A failure that stopped the read (a missing folder, an unknown format), listed once."""
        line = str(err)
        if line == self.last_fatal:
            return
        self.count += 1
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append(line)


def check_source(kind: str, location: str, options: DataOptions | None = None, test_location: str = "",
                 test_fraction: float = 0.2, seed: int = 0, on_bad_sample: str = "error") -> dict[str, Any]:
    """The report of what a `kind` device (or PUBLIC) reading `location` would train on (see the module)."""
    with inspect_source(kind, location, options, test_location, test_fraction, seed, on_bad_sample) as (report, _):
        return report


@contextlib.contextmanager
def inspect_source(kind: str, location: str, options: DataOptions | None = None, test_location: str = "",
                   test_fraction: float = 0.2, seed: int = 0,
                   on_bad_sample: str = "error") -> Iterator[tuple[dict[str, Any], Source | None]]:
    """(the report, the source as built, None when it could not be read), the source's memory-mapped files kept
    until the block ends (the server's check compares the public and eval pictures)."""
    options = options or DataOptions()
    report: dict[str, Any] = {"kind": kind, "location": str(location)}
    with contextlib.ExitStack() as stack:
        source, found = stack.enter_context(_built(kind, str(location), options, on_bad_sample, report))
        test, test_found = None, None
        if test_location:
            test_report: dict[str, Any] = {"location": str(test_location)}
            test, test_found = stack.enter_context(_built(kind, str(test_location), options, on_bad_sample,
                                                          test_report))
            report["test_source"] = test_report
        rows = CheckProblems(on_bad_sample)  # what drawing the train and test rows finds
        if source is not None and kind != PUBLIC and (test is not None or not test_location):
            try:
                train, held = train_test(_light_source(source), options, _light_source(test), test_fraction, seed)
                report["train"], report["test"] = rows_report(train), rows_report(held)
            except DataFormatError as err:
                rows.note(err)
        every = [found, *([test_found] if test_found is not None else []), rows]
        report["problems"] = [line for problems in every for line in problems.listed][:MAX_LISTED_PROBLEMS]
        report["problem_count"] = sum(problems.count for problems in every)
        yield report, source


@contextlib.contextmanager
def _built(kind: str, location: str, options: DataOptions, on_bad_sample: str,
           report: dict[str, Any]) -> Iterator[tuple[Source | None, CheckProblems]]:
    """(the source read into a temporary folder, None when it could not be read; what was found), its part of the
    report filled in. A source without a problem stays as the cached source a device then reads."""
    problems = CheckProblems(on_bad_sample)
    report.update(format=None, digest=None, splits={}, images=None)
    if location.startswith(DEMO):
        try:
            source = open_source(kind, location)
        except FedafdError as err:
            problems.note(err)
            yield None, problems
            return
        _describe(report, source, None)
        yield source, problems
        return
    try:
        path, fmt = resolve(kind, location, options)
        fingerprint = source_fingerprint(kind, path, fmt, options, on_bad_sample)
    except (FedafdError, OSError) as err:
        problems.note(err)
        yield None, problems
        return
    report["format"] = fmt
    with building_folder(sources_dir()) as building:
        sizes: dict[str, PictureSizes] = {}
        try:
            source = read_source(kind, path, location, fmt, options, problems, building, sizes)
        except (FedafdError, OSError) as err:
            problems.note(err)
            source = None
        if source is None:
            yield None, problems
            return
        _describe(report, source, sizes)
        yield source, problems
        if not problems.count:  # nothing wrong: the very rows a device would build, so keep them for it
            write_cached(building, source)
            folder = sources_dir() / fingerprint
            with file_lock(folder.parent / f".{fingerprint}.lock"):
                install(building, folder)


def _describe(report: dict[str, Any], source: Source, sizes: dict[str, PictureSizes] | None) -> None:
    report["format"] = source.format
    report["digest"] = source.digest
    report["splits"] = {split: rows_report(_light(data)) for split, data in source.splits.items()}
    if sizes is None:  # a bundled set: its prepared arrays
        pictures = sum(len(d) for d in source.splits.values() if hasattr(d, "images"))
        first = next((d.images for d in source.splits.values() if hasattr(d, "images")), None)
        report["images"] = None if first is None else _sizes_report(
            np.full(pictures, first.shape[-1]), np.full(pictures, first.shape[-2]))
    elif sizes:
        widths = np.concatenate([np.frombuffer(s.widths, np.uint32) for s in sizes.values()])
        heights = np.concatenate([np.frombuffer(s.heights, np.uint32) for s in sizes.values()])
        report["images"] = _sizes_report(widths, heights)


def _sizes_report(widths: np.ndarray, heights: np.ndarray) -> dict[str, Any]:
    def spread(values: np.ndarray) -> dict[str, Any]:
        if not len(values):
            return {"min": None, "median": None, "max": None}
        return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}

    return {"pictures": int(len(widths)), "width": spread(widths), "height": spread(heights)}


def _light(data: Data) -> Data:
    """`data` without its pixels and tokens (zero-width arrays of as many rows): what a report reads, at no cost."""
    return dataclasses.replace(data, **{name: np.empty((len(data), 0), getattr(data, name).dtype)
                                        for name in _HEAVY if hasattr(data, name)})


def _light_source(source: Source | None) -> Source | None:
    if source is None:
        return None
    return dataclasses.replace(source, splits={split: _light(data) for split, data in source.splits.items()})


def rows_report(data: Data) -> dict[str, Any]:
    """Rows, and classes with rows per class; pairs: pictures, captions per picture, pictures per group."""
    if isinstance(data, PairData):
        ids, first, captions = np.unique(np.asarray(data.image_ids), return_index=True, return_counts=True)
        per_group = np.bincount(np.asarray(data.groups)[first], minlength=len(data.group_names))
        return {"rows": len(data), "pictures": int(len(ids)),
                "captions_per_picture": {"min": int(captions.min()) if len(ids) else 0,
                                         "mean": round(float(captions.mean()), 3) if len(ids) else 0.0,
                                         "max": int(captions.max()) if len(ids) else 0},
                "groups": len(data.group_names),
                "pictures_per_group": {name: int(n) for name, n in zip(data.group_names, per_group)}}
    counts = np.bincount(np.asarray(data.labels), minlength=len(data.class_names))
    return {"rows": len(data), "classes": len(data.class_names),
            "counts": {name: int(n) for name, n in zip(data.class_names, counts)}}


# --- text ------------------------------------------------------------------------------------------

LISTED_CLASSES = 12
"""Classes named in a text summary line; the rest are counted."""


def rows_line(name: str, rows: dict[str, Any]) -> str:
    """One line of a text summary: `train: 96 rows, 3 classes: a 32, b 32, c 32`."""
    if "pictures" in rows:
        per = rows["captions_per_picture"]
        captions = (f"{per['min']} caption{'s' if per['min'] != 1 else ''} each" if per["min"] == per["max"] else
                    f"{per['min']}-{per['max']} captions each, mean {per['mean']:g}")
        head = f"{name}: {rows['rows']} rows, {rows['pictures']} pictures ({captions}), {rows['groups']} groups"
        counts = rows["pictures_per_group"]
    else:
        head = f"{name}: {rows['rows']} rows, {rows['classes']} classes"
        counts = rows["counts"]
    shown = [f"{label} {n}" for label, n in list(counts.items())[:LISTED_CLASSES]]
    more = f", ... {len(counts) - LISTED_CLASSES} more" if len(counts) > LISTED_CLASSES else ""
    return f"{head}: {', '.join(shown)}{more}" if shown else head


def source_lines(report: dict[str, Any], indent: str = "") -> list[str]:
    """A source report as a short readable summary (no problems: problem_lines)."""
    lines = [f"{indent}{report['location']}: {report.get('format') or 'unreadable'}"
             + (f", digest {report['digest'][:12]}" if report.get("digest") else "")]
    for split, rows in report.get("splits", {}).items():
        lines.append(f"{indent}  split {rows_line(split, rows)}")
    if report.get("test_source"):
        lines += source_lines(report["test_source"], indent + "  test_data ")
    for role in ("train", "test"):
        if role in report:
            lines.append(f"{indent}{rows_line(role, report[role])}")
    images = report.get("images")
    if images and images["pictures"]:
        w, h = images["width"], images["height"]
        lines.append(f"{indent}pictures: {images['pictures']}, width {w['min']}-{w['max']} (median {w['median']:g}), "
                     f"height {h['min']}-{h['max']} (median {h['median']:g})")
    return lines


def problem_lines(listed: list[str], count: int, indent: str = "") -> list[str]:
    if not count:
        return [f"{indent}no problems"]
    lines = [f"{indent}{count} problem{'s' if count != 1 else ''}:"] + [f"{indent}  {line}" for line in listed]
    if count > len(listed):
        lines.append(f"{indent}  ... and {count - len(listed)} more")
    return lines


def report_text(report: dict[str, Any]) -> str:
    return "\n".join(source_lines(report) + problem_lines(report["problems"], report["problem_count"]))
