"""What both CLIs share: one place that turns known failures into clear one-line errors."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sys
from typing import Callable, Iterator

import typer

from fedafd.runtime.config import describe_config
from fedafd.runtime.vocabulary import CLIENT_KINDS


class Format(enum.StrEnum):
    """`--format` of a command whose output a program may read (typer refuses any other value)."""

    text = "text"
    json = "json"


class ProfileFormat(enum.StrEnum):
    """`--format` of `fedafd-cloud profile`."""

    markdown = "markdown"
    json = "json"


Kind = enum.StrEnum("Kind", {kind: kind for kind in CLIENT_KINDS})
"""A device's task, as a typer choice (`--kind`)."""


def config_listing(cls: type, fmt: Format, usage: str) -> str:
    """Every key of a config class with its type, default and description: JSON (key -> those three), or
    aligned text under a line saying how to set them."""
    fields = describe_config(cls)
    if fmt == Format.json:
        return json.dumps(fields, indent=2)
    rows = [(key, f["type"], _shown(f["default"]), f["help"]) for key, f in fields.items()]
    widths = [max(len(row[i]) for row in rows + [("KEY", "TYPE", "DEFAULT", "")]) for i in range(3)]
    lines = [usage, ""] + ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
                           for row in [("KEY", "TYPE", "DEFAULT", "DESCRIPTION"), *rows]]
    return "\n".join(lines)


def _shown(value: object) -> str:
    """A default as one writes it after `-c key=`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value != "" else '""'


def setup_logging(verbose: bool, default_level: str = "WARNING") -> None:
    level = logging.DEBUG if verbose else getattr(logging, default_level)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


def raise_open_files_limit() -> int:
    """Lifts this process's soft limit on open files to the hard one (children inherit it): a server holds
    one descriptor per connected device, and a common soft default of 1024 stops it near 1,000 devices
    (libzmq then fails to accept the rest). Returns the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # some systems cap it lower (macOS: OPEN_MAX); keep what we have
            pass
    return soft


@contextlib.contextmanager
def live_status() -> Iterator[Callable[[str], None]]:
    """A rich status line (spinner + text) on a terminal's stderr, updated by calling what this yields;
    off a terminal (logs, pipes, tests) it shows nothing, so the output stays one line per round."""
    if not sys.stderr.isatty():
        yield lambda text: None
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as status:
        yield lambda text: status.update(text)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Config mistakes, missing data, transport failures and refused peers end with 'error: ...' and exit 2
    (exit 1 for anything else), never a traceback for a known cause."""
    from fedafd.runtime.config import ConfigError
    from fedafd.runtime.data.fetch import DataMissingError
    from fedafd.runtime.transport import TransportError

    from fedafd.runtime.errors import FedafdError

    known = (ConfigError, DataMissingError, TransportError, FedafdError)
    try:
        yield
    except known as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="yellow", err=True)
        raise typer.Exit(130) from None
