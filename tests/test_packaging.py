"""The Python version the package claims is the one its code needs, and setup.sh refuses older ones."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_package_claims_the_python_its_code_needs() -> None:
    # The metadata pip installed (not pyproject's text): what a resolver on another machine reads.
    from importlib.metadata import metadata

    installed = metadata("fedafd")
    assert installed["Requires-Python"] == ">=3.11"
    classifiers = installed.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert not any(c.endswith(":: 3.10") for c in classifiers)  # 3.11: tomllib and enum.StrEnum


def test_setup_refuses_an_older_python_before_making_a_venv(tmp_path: Path) -> None:
    # Prepare: a copy of setup.sh without a .venv, and a stand-in python3.10 (fails the version check).
    shutil.copy(ROOT / "setup.sh", tmp_path / "setup.sh")
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "Python 3.10.12"; exit 0; }\nexit 1\n')
    old.chmod(0o755)
    # Execute
    done = subprocess.run(["bash", str(tmp_path / "setup.sh")], env={"PYTHON": str(old), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    # Assert: a clear error naming the version, and nothing installed.
    assert done.returncode == 1
    assert "needs Python 3.11+" in done.stderr and "Python 3.10.12" in done.stderr
    assert not (tmp_path / ".venv").exists()


def test_every_console_script_is_a_typer_app_with_its_commands() -> None:
    # The entry points as pip installs them (`fedafd-edge` is mounted in export/cli.py, not edge_client/).
    import importlib

    import typer
    from typer.main import get_command

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        app = getattr(importlib.import_module(module), attr)
        assert isinstance(app, typer.Typer), name
        commands[name] = set(get_command(app).commands)
    assert {"join", "keys", "convert-state", "config", "data", "export", "infer", "bench"} == commands["fedafd-edge"]
    assert {"serve", "simulate", "report", "profile", "config", "data", "nodes", "keys", "convert-checkpoint"} == commands["fedafd-cloud"]
