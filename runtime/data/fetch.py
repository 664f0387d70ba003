"""Getting the real data: Debian packages unpacked into a cache folder, and finding their files.

`fetch()` runs `apt-get download PKG` into `cache_dir()/debs` and `dpkg-deb -x` into `cache_dir()/root`,
so nothing is installed system-wide; packages already installed on the system are used where they are.
`locate()` finds a packaged file under the cache root first, then under `/`.

This is the only module that downloads anything, and it runs only when asked (`fedafd-cloud data fetch`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fedafd.runtime.errors import FedafdError

DEBIAN_PACKAGES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("dataset-fashion-mnist",),
    "wordnet": ("wordnet-base",),
    "emoji": ("fonts-noto-color-emoji", "unicode-data"),
    "tuxpaint": ("tuxpaint-stamps-default",),
}
"""Data-set name -> the Debian packages its files come from."""

# One path per package whose presence means the package's files are there (relative to a root).
PACKAGE_MARKER_FILES: dict[str, str] = {
    "dataset-fashion-mnist": "usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
    "wordnet-base": "usr/share/wordnet/data.noun",
    "fonts-noto-color-emoji": "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "unicode-data": "usr/share/unicode/emoji/emoji-test.txt",
    "tuxpaint-stamps-default": "usr/share/tuxpaint/stamps/animals",
}

# Globs removed after unpacking a package: Tux Paint's spoken descriptions are 184 of its 218 MB.
DROP_AFTER_UNPACK: dict[str, tuple[str, ...]] = {"tuxpaint-stamps-default": ("*.ogg",)}

SYSTEM_ROOT = Path("/")
"""Where system-wide installed packages live (a module constant so tests can point it elsewhere)."""

_UNPACKED_DIR = ".fedafd-unpacked"  # under the cache root: one empty file per fully unpacked package


class DataMissingError(FedafdError):
    """A data file or tool is missing; the message says what to run to get it."""


def cache_dir() -> Path:
    """`$FEDAFD_CACHE` if set, else `~/.cache/fedafd`."""
    env = os.environ.get("FEDAFD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedafd"


def _packages_of(name: str) -> tuple[str, ...]:
    try:
        return DEBIAN_PACKAGES[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DEBIAN_PACKAGES)}") from None


def _fetch_hint(packages: Iterable[str]) -> str:
    return f"run `fedafd-cloud data fetch` (or `apt-get install {' '.join(packages)}`)"


def locate(relative_path: str, name: str) -> Path:
    """The path of a packaged file (or folder) of data set `name`, e.g. `locate("usr/share/wordnet/data.noun",
    "wordnet")`: under `cache_dir()/root` if unpacked there, else under `/` if installed system-wide."""
    packages = _packages_of(name)
    relative = relative_path.lstrip("/")
    cache_root = cache_dir() / "root"
    for root in (cache_root, SYSTEM_ROOT):
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise DataMissingError(
        f"{name} data not found: /{relative} is neither under {cache_root} nor installed on the system; "
        + _fetch_hint(packages)
    )


def _unpacked_marker(package: str) -> Path:
    return cache_dir() / "root" / _UNPACKED_DIR / package


def is_present(package: str) -> bool:
    """Whether a package's files are there: fully unpacked into the cache, or installed system-wide."""
    if _unpacked_marker(package).exists():
        return True
    marker = PACKAGE_MARKER_FILES.get(package)
    return marker is not None and (SYSTEM_ROOT / marker).exists()


def _find_deb(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _require_tool(tool: str, packages: Iterable[str]) -> str:
    path = shutil.which(tool)
    if path is None:
        raise DataMissingError(
            f"`{tool}` not found: fetching data needs a Debian or Ubuntu system with apt and dpkg; "
            f"elsewhere install the Debian packages {' '.join(packages)} by other means"
        )
    return path


def _apt_download(packages: list[str], debs: Path, log: Callable[[str], object]) -> None:
    """`apt-get download` into a temporary folder, then moved next to the others: an interrupted
    download never leaves a truncated .deb that a later run would take for a good one."""
    apt_get = _require_tool("apt-get", packages)
    log(f"downloading {' '.join(packages)} (apt-get download)")
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        result = subprocess.run([apt_get, "download", "-q", *packages], cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            detail = " ".join(line.strip() for line in result.stderr.strip().splitlines()[-3:])
            if any(s in result.stderr for s in ("Unable to locate package", "candidate", "No packages found")):
                hint = "run `apt-get update` (as root) first, then `fedafd-cloud data fetch` again"
            else:
                hint = ("check the network and apt sources, or run `apt-get update`, or "
                        f"`apt-get install {' '.join(packages)}`")
            raise DataMissingError(f"apt-get download {' '.join(packages)} failed ({detail}); {hint}")
        for deb in Path(tmp).glob("*.deb"):
            os.replace(deb, debs / deb.name)


def _unpack(deb: Path, package: str, log: Callable[[str], object]) -> None:
    dpkg_deb = _require_tool("dpkg-deb", [package])
    root = cache_dir() / "root"
    root.mkdir(parents=True, exist_ok=True)
    log(f"unpacking {deb.name}")
    result = subprocess.run([dpkg_deb, "-x", str(deb), str(root)], capture_output=True, text=True)
    if result.returncode != 0:
        deb.unlink(missing_ok=True)  # most likely damaged: the next fetch downloads it again
        raise DataMissingError(
            f"dpkg-deb -x {deb.name} failed ({result.stderr.strip()}); the file was removed: "
            "run `fedafd-cloud data fetch` again"
        )
    for pattern in DROP_AFTER_UNPACK.get(package, ()):
        for path in (root / "usr").rglob(pattern):
            path.unlink()
    marker = _unpacked_marker(package)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(deb.name + "\n")


def fetch(names: Iterable[str] | None = None, *, log: Callable[[str], object] = print) -> None:
    """Download and unpack the Debian packages of data sets `names` (default: all of DEBIAN_PACKAGES).
    Packages already unpacked into the cache or installed system-wide are skipped; a .deb already in
    `cache_dir()/debs` is not downloaded again. Idempotent."""
    names = list(DEBIAN_PACKAGES) if names is None else [names] if isinstance(names, str) else list(names)
    packages = list(dict.fromkeys(p for name in names for p in _packages_of(name)))
    missing = [p for p in packages if not is_present(p)]
    if not missing:
        log(f"data packages present: {' '.join(packages)}")
        return
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    to_download = [p for p in missing if _find_deb(debs, p) is None]
    if to_download:
        _apt_download(to_download, debs, log)
    for package in missing:
        deb = _find_deb(debs, package)
        if deb is None:
            raise DataMissingError(
                f"apt-get download did not produce {package}_*.deb in {debs}; run `apt-get update`, "
                f"or `apt-get install {package}`"
            )
        _unpack(deb, package, log)
    log(f"data packages unpacked into {cache_dir() / 'root'}")
