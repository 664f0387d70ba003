"""Reading a TOML file the user wrote (config files, device profiles, data configs, fleet files): one place
that turns a missing or malformed file into the caller's error, naming what the file is and where."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path, what: str, error: type[Exception]) -> dict[str, Any]:
    """The TOML file at `path`; a missing or malformed file raises `error` naming `what` and the path."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{what} {path} is not valid TOML: {err}") from None
