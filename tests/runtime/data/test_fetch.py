"""Fetching Debian data packages into the cache and locating their files, with a fake apt-get and a
tiny .deb built on the spot (no network)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from fedafd.runtime.data import fetch as fetch_module
from fedafd.runtime.data.fetch import DEBIAN_PACKAGES, DataMissingError, cache_dir, fetch, locate

STAMP_DIR = "usr/share/tuxpaint/stamps/animals"
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """FEDAFD_CACHE in an empty folder, and an empty 'system' so nothing counts as installed."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDAFD_CACHE", str(cache))
    monkeypatch.setattr(fetch_module, "SYSTEM_ROOT", tmp_path / "system")
    return cache


def _fake_apt_get(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    apt_get = bin_dir / "apt-get"
    apt_get.write_text("#!/bin/sh\n" + script)
    apt_get.chmod(0o755)


def _build_stamp_deb(tmp_path: Path) -> Path:
    """A two-stamp stand-in for tuxpaint-stamps-default: pictures, captions and .ogg sounds."""
    tree = tmp_path / "debtree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: tuxpaint-stamps-default\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: test stamps\n"
    )
    stamps = tree / STAMP_DIR
    stamps.mkdir(parents=True)
    for name in ("frog", "duck"):
        (stamps / f"{name}.png").write_bytes(b"png")
        (stamps / f"{name}.txt").write_text(f"A {name}.\n")
        (stamps / f"{name}.ogg").write_bytes(b"ogg")
        (stamps / f"{name}_desc_fr.ogg").write_bytes(b"ogg")
    deb = tmp_path / "tuxpaint-stamps-default_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True, capture_output=True)
    return deb


def test_packages_per_data_set():
    assert DEBIAN_PACKAGES == {
        "fashion_mnist": ("dataset-fashion-mnist",),
        "wordnet": ("wordnet-base",),
        "emoji": ("fonts-noto-color-emoji", "unicode-data"),
        "tuxpaint": ("tuxpaint-stamps-default",),
    }


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDAFD_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "fedafd"


def test_locate_missing_file_raises_with_the_fetch_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDAFD_CACHE", str(tmp_path))  # empty cache; the made-up path is on no system
    with pytest.raises(DataMissingError) as raised:
        locate("usr/share/fedafd-no-such-data/made-up.txt", "emoji")
    message = str(raised.value)
    assert isinstance(raised.value, RuntimeError)
    assert "emoji" in message and "made-up.txt" in message
    assert "run `fedafd-cloud data fetch` (or `apt-get install fonts-noto-color-emoji unicode-data`)" in message


def test_locate_prefers_the_cache_root_then_the_system(empty_cache, tmp_path):
    in_system = tmp_path / "system" / "usr/share/wordnet/data.noun"
    in_system.parent.mkdir(parents=True)
    in_system.write_text("system")
    assert locate("usr/share/wordnet/data.noun", "wordnet") == in_system
    in_cache = empty_cache / "root" / "usr/share/wordnet/data.noun"
    in_cache.parent.mkdir(parents=True)
    in_cache.write_text("cache")
    assert locate("/usr/share/wordnet/data.noun", "wordnet") == in_cache


def test_unknown_data_set_is_refused(empty_cache):
    with pytest.raises(ValueError, match="known: fashion_mnist"):
        locate("usr/share/x", "cifar")
    with pytest.raises(ValueError, match="unknown data set"):
        fetch(["cifar"], log=lambda _: None)


@needs_dpkg
def test_fetch_downloads_unpacks_and_drops_sounds(empty_cache, tmp_path, monkeypatch):
    # Prepare: an apt-get that "downloads" the tiny .deb into its working folder
    deb = _build_stamp_deb(tmp_path)
    _fake_apt_get(tmp_path / "bin", f'[ "$1" = download ] && cp "{deb}" . && echo "$@" >> "{tmp_path}/calls"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    lines = []
    # Execute
    fetch(["tuxpaint"], log=lines.append)
    # Assert: unpacked into the cache root, sounds gone, the .deb kept, marked as complete
    stamps = empty_cache / "root" / STAMP_DIR
    assert sorted(p.name for p in stamps.iterdir()) == ["duck.png", "duck.txt", "frog.png", "frog.txt"]
    assert (empty_cache / "debs" / deb.name).is_file()
    assert (tmp_path / "calls").read_text().split() == ["download", "-q", "tuxpaint-stamps-default"]
    assert locate(f"{STAMP_DIR}/frog.txt", "tuxpaint") == stamps / "frog.txt"
    assert any("unpacking" in line for line in lines)

    # A second fetch neither downloads nor unpacks
    _fake_apt_get(tmp_path / "bin", "exit 99\n")
    lines.clear()
    fetch(["tuxpaint"], log=lines.append)
    assert lines == ["data packages present: tuxpaint-stamps-default"]


@needs_dpkg
def test_fetch_reuses_a_downloaded_deb(empty_cache, tmp_path, monkeypatch):
    (empty_cache / "debs").mkdir(parents=True)
    shutil.copy(_build_stamp_deb(tmp_path), empty_cache / "debs")
    _fake_apt_get(tmp_path / "bin", "exit 99\n")  # would fail if called
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    fetch(["tuxpaint"], log=lambda _: None)
    assert (empty_cache / "root" / STAMP_DIR / "duck.png").is_file()


def test_fetch_skips_packages_installed_system_wide(empty_cache, tmp_path, monkeypatch):
    installed = tmp_path / "system" / "usr/share/wordnet/data.noun"
    installed.parent.mkdir(parents=True)
    installed.write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no apt-get, no dpkg-deb: must not be needed
    lines = []
    fetch(["wordnet"], log=lines.append)
    assert lines == ["data packages present: wordnet-base"]


def test_apt_get_without_package_lists_says_run_apt_get_update(empty_cache, tmp_path, monkeypatch):
    _fake_apt_get(tmp_path / "bin", 'echo "E: Unable to locate package wordnet-base" >&2\nexit 100\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(DataMissingError, match="run `apt-get update`"):
        fetch(["wordnet"], log=lambda _: None)
    assert list((empty_cache / "debs").iterdir()) == []  # the temporary download folder is gone


def test_no_apt_get_says_what_is_needed(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(DataMissingError, match="`apt-get` not found.*dataset-fashion-mnist"):
        fetch(["fashion_mnist"], log=lambda _: None)


@needs_dpkg
def test_damaged_deb_is_removed_with_a_hint(empty_cache, tmp_path, monkeypatch):
    debs = empty_cache / "debs"
    debs.mkdir(parents=True)
    (debs / "wordnet-base_1_all.deb").write_bytes(b"not a deb")
    with pytest.raises(DataMissingError, match="fedafd-cloud data fetch"):
        fetch(["wordnet"], log=lambda _: None)
    assert not (debs / "wordnet-base_1_all.deb").exists()
