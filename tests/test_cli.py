"""What a new user meets at both command lines: choices are checked, every config key is listed, refused
commands leave nothing behind, a device must say its kind."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedafd.cloud_server.cli import app as cloud_cli
from fedafd.export.cli import fedafd_edge as edge_cli
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config, help_for

runner = CliRunner()

FORMAT_COMMANDS = [  # every command with --format, and what it needs before it
    (cloud_cli, "nodes list", []), (cloud_cli, "data info", []), (cloud_cli, "report", ["RUN"]),
    (cloud_cli, "profile", ["RUN"]), (cloud_cli, "config", []),
    (edge_cli, "bench", []), (edge_cli, "export", ["STATE", "--out", "MODEL"]), (edge_cli, "infer", ["MODEL", "x.png"]),
    (edge_cli, "config", []), (edge_cli, "data check", ["--kind", "image", "--data", "x"]), (cloud_cli, "data check", []),
]


def flat(output: str) -> str:
    """The words of typer's rich output, without its box and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def commands_with_format(app: typer.Typer) -> list[str]:
    def walk(command, path: tuple[str, ...]):
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, path + (name,))
        if any("--format" in getattr(param, "opts", ()) for param in command.params):
            yield " ".join(path)

    return sorted(walk(typer.main.get_command(app), ()))


def test_every_command_with_a_format_option_is_tested_below() -> None:
    for app in (cloud_cli, edge_cli):
        assert commands_with_format(app) == sorted(name for cli, name, _ in FORMAT_COMMANDS if cli is app)


@pytest.mark.parametrize("app, name, argv", FORMAT_COMMANDS, ids=[name for _, name, _ in FORMAT_COMMANDS])
def test_a_misspelt_format_is_refused_naming_the_choices(app: typer.Typer, name: str, argv: list[str]) -> None:
    result = runner.invoke(app, [*name.split(), *argv, "--format", "jsn"])
    assert result.exit_code == 2
    assert "'jsn' is not one of" in flat(result.output) and "'json'" in result.output
    assert ("'markdown'" if name == "profile" else "'text'") in result.output


@pytest.mark.parametrize("app, cls", [(cloud_cli, ServerConfig), (edge_cli, ClientConfig)])
def test_config_lists_every_key_with_its_type_and_a_default_that_reads_back(app: typer.Typer, cls: type) -> None:
    # Execute
    result = runner.invoke(app, ["config"])
    # Assert: one row per field, KEY TYPE DEFAULT DESCRIPTION; the shown default typed after `-c KEY=` is the default.
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[3:]}
    defaults = build_config(cls, {})
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    assert list(rows) == list(hints)
    for key, line in rows.items():
        _, type_name, shown, description = re.split(r"\s{2,}", line, maxsplit=3)
        assert type_name == hints[key]
        value = getattr(build_config(cls, {key: "" if shown == '""' else shown}), key)
        assert value == getattr(defaults, key), key
        assert description == help_for(cls)[key]


@pytest.mark.parametrize("app, cls", [(cloud_cli, ServerConfig), (edge_cli, ClientConfig)])
def test_config_json_round_trips_through_build_config(app: typer.Typer, cls: type) -> None:
    result = runner.invoke(app, ["config", "--format", "json"])
    listed = json.loads(result.stdout)
    assert list(listed) == [f.name for f in dataclasses.fields(cls)]
    assert {key: entry["help"] for key, entry in listed.items()} == help_for(cls)
    assert build_config(cls, {key: entry["default"] for key, entry in listed.items()}) == build_config(cls, {})
    assert listed["rounds" if cls is ServerConfig else "kind"]["default"] == ("image" if cls is ClientConfig else 3)


def test_the_set_options_point_to_the_config_commands() -> None:
    serve = flat(runner.invoke(cloud_cli, ["serve", "--help"]).output)
    assert "lists every key" in serve and "`fedafd-cloud config`" in serve and "`fedafd-edge config`" in serve
    join = flat(runner.invoke(edge_cli, ["join", "--help"]).output)
    assert "`fedafd-edge config` lists every key" in join


@pytest.mark.parametrize("argv, reason", [
    ([], "--insecure"),  # neither --keys nor --insecure
    (["--keys", "no_such_keys"], "not found"),
    (["--insecure", "--keys", "k"], "exclude each other"),
    (["--insecure", "-c", "rounds=0"], "rounds must be > 0"),
    (["--insecure", "--bind", "bogus://x"], "cannot bind"),
])
def test_a_refused_serve_leaves_no_run_folder(tmp_path: Path, monkeypatch, argv: list[str], reason: str) -> None:
    monkeypatch.chdir(tmp_path)
    for out in ([], ["--out", "run"]):  # the default runs/<timestamp> and an explicit one
        result = runner.invoke(cloud_cli, ["serve", *out, *argv])
        assert result.exit_code == 2 and reason in flat(result.output)
        assert list(tmp_path.iterdir()) == []


def test_join_needs_a_kind_and_lists_the_kinds(tmp_path: Path) -> None:
    for argv in ([], ["--kind", "audio"]):
        result = runner.invoke(edge_cli, ["join", "--server", "tcp://127.0.0.1:1", "--insecure", *argv])
        assert result.exit_code == 2
        assert all(kind in result.output for kind in ("image", "text", "multimodal"))
    assert "Missing option '--kind'" in flat(runner.invoke(edge_cli, ["join", "--server", "x"]).output)


def test_join_warns_a_device_holding_the_whole_data_set_and_writes_nothing_when_refused(tmp_path: Path,
                                                                                       caplog) -> None:
    # Execute: valid device settings, then refused for want of keys (so nothing connects).
    base = ["join", "--server", "tcp://127.0.0.1:1", "--kind", "text", "--state-dir", str(tmp_path / "state")]
    with caplog.at_level(logging.WARNING, logger="fedafd.edge"):
        whole = runner.invoke(edge_cli, base)
        warned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        shared = runner.invoke(edge_cli, [*base, "--num-partitions", "3", "--partition", "1"])
    # Assert
    assert whole.exit_code == 2 and shared.exit_code == 2 and "--key FILE" in flat(whole.output)
    assert any("num_partitions is 1: this device holds the whole text data set" in m for m in warned)
    assert not caplog.records
    assert not (tmp_path / "state").exists()


def test_serve_and_simulate_share_their_options_and_name_the_extras_to_install() -> None:
    from fedafd.simulation.cli import fedafd_cloud

    helps = {}
    for command in ("serve", "simulate"):
        result = runner.invoke(fedafd_cloud, [command, "--help"], env={"COLUMNS": "300"}, terminal_width=300)
        assert result.exit_code == 0, result.output
        helps[command] = flat(result.output)
        assert "(needs fedafd[tensorboard])" in helps[command] and "(needs fedafd[mlflow])" in helps[command]
    for phrase in ("TOML file of ServerConfig values", "KEY=VALUE of ServerConfig, repeatable",
                   "KEY=VALUE of ClientConfig for every local or simulated device", "Log every message event"):
        assert phrase in helps["serve"] and phrase in helps["simulate"], phrase
