"""The accuracy benchmark's arithmetic: means and spreads over seeds, rounds to LOCAL's final server
R@1 sum of the same seed, the table's cells."""

from __future__ import annotations

import pytest

from fedafd.benchmarks.accuracy import aggregate, difference_table, markdown_table, rounds_to_reach


def _run(seed: int, server: list[float], image_pers: float) -> dict:
    return {"seed": seed, "wall_seconds": 10.0 * (seed + 1),
            "rounds": [{"server_r1_sum": value, "image_pers_top1": image_pers, "up_bytes_per_client": 2e6,
                        "down_bytes_per_client": 5e5} for value in server]}


def test_aggregate_means_spreads_and_rounds_to_locals_final_of_the_same_seed() -> None:
    runs = {"LOCAL": [_run(0, [10, 20, 30], 70.0), _run(1, [10, 20, 40], 80.0)],
            "FedAFD": [_run(0, [25, 35, 36], 74.0), _run(1, [10, 30, 35], 79.0)]}
    table = aggregate(runs)
    assert table["FedAFD"]["image_pers_top1"] == {"mean": 76.5, "std": pytest.approx(3.5355, abs=1e-4), "n": 2}
    # Seed 0: LOCAL ends at 30, FedAFD reaches it in round 2; seed 1: LOCAL ends at 40, FedAFD never does.
    assert table["FedAFD"]["rounds_to_local_server"] == [2, None]
    assert table["LOCAL"]["rounds_to_local_server"] == [3, 3]
    assert table["LOCAL"]["wall_seconds"]["mean"] == 15.0
    lines = markdown_table(table).splitlines()
    assert lines[3].startswith("| FedAFD |") and "76.50 ± 3.54" in lines[3] and "2, not reached" in lines[3]
    assert "2.00 MB / 500.0 kB" in lines[3]


def test_differences_from_local_are_paired_by_seed_with_the_seeds_ahead() -> None:
    # FedAFD - LOCAL, seed by seed: image 74 - 70 = +4 and 79 - 80 = -1; server 36 - 30 = +6 and 35 - 40 = -5.
    # Seed 2 has no LOCAL run to pair with, so it counts in FedAFD's mean but not in its differences.
    runs = {"LOCAL": [_run(0, [10, 20, 30], 70.0), _run(1, [10, 20, 40], 80.0)],
            "FedAFD": [_run(0, [25, 35, 36], 74.0), _run(1, [10, 30, 35], 79.0), _run(2, [50], 99.0)]}
    table = aggregate(runs)
    minus_local = table["FedAFD"]["minus_local"]
    assert minus_local["image_pers_top1"] == {"mean": 1.5, "std": pytest.approx(3.5355, abs=1e-4), "n": 2, "ahead": 1}
    assert minus_local["server_r1_sum"] == {"mean": 0.5, "std": pytest.approx(7.7782, abs=1e-4), "n": 2, "ahead": 1}
    assert "minus_local" not in table["LOCAL"] and "image_top1" not in minus_local  # not measured: no cell
    lines = difference_table(table).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| FedAFD |")
    assert "+1.50 ± 3.54 (1/2)" in lines[2] and "+0.50 ± 7.78 (1/2)" in lines[2] and "| - |" in lines[2]
    # One seed has no spread to show.
    single = difference_table(aggregate({name: seeds[:1] for name, seeds in runs.items()})).splitlines()[2]
    assert "| +4.00 (1/1) |" in single and "±" not in single


def test_rounds_to_reach_is_one_based_and_none_when_never() -> None:
    rounds = [{"server_r1_sum": v} for v in (1.0, 5.0, 4.0)]
    assert rounds_to_reach(rounds, 5.0) == 2 and rounds_to_reach(rounds, 6.0) is None


def test_each_engine_runs_the_same_federation_with_device_settings_as_local_set(tmp_path) -> None:
    from fedafd.benchmarks.accuracy import FLEET, federation_command

    overrides = {"rounds": "2", "client.disc_lr": "1e-3"}
    simulate = federation_command("simulate", overrides, tmp_path)
    processes = federation_command("processes", overrides, tmp_path)
    assert simulate[3] == "simulate" and simulate[simulate.index("--fleet") + 1] == FLEET
    assert processes[3:5] == ["serve", "--local"] and processes[5] == FLEET
    other = federation_command("simulate", overrides, tmp_path, fleet="image=3,text=3")
    assert other[other.index("--fleet") + 1] == "image=3,text=3"
    for command in (simulate, processes):
        assert command[-6:] == ["--out", str(tmp_path), "-c", "rounds=2", "--local-set", "disc_lr=1e-3"]


def test_a_finished_federation_with_the_same_command_is_read_back_and_nothing_else_is(tmp_path, monkeypatch) -> None:
    import json
    import shutil
    import subprocess
    from pathlib import Path

    from fedafd.benchmarks import accuracy

    # Prepare: a real finished run (LOCAL seed 0 of the paper regime, kept as a fixture) and the settings it ran with.
    source = Path(__file__).parent / "fixtures" / "paper-quick-seed0-LOCAL"
    settings = {**accuracy.SETTINGS["quick"], "strategy": "local", "device_regime": "paper", "seed": "0"}
    run_dir = tmp_path / "LOCAL"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("clients"))
    command_line = " ".join(accuracy.federation_command("simulate", settings, run_dir)[2:])
    defaults = accuracy.config_defaults()
    done = {"command": command_line, "defaults": defaults, "wall_seconds": 12.5}
    (run_dir / accuracy.DONE_FILE).write_text(json.dumps(done))
    launched = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: launched.append(command) or subprocess.CompletedProcess(command, 1))
    # Execute / Assert: the same command is read back, without a federation, with the run's wall time and rounds.
    result = accuracy.run_variant("LOCAL", settings, run_dir)
    assert not launched and result["resumed"] and result["wall_seconds"] == 12.5 and len(result["rounds"]) == 10
    # Another setting, a run cut short, or the same command run under other defaults (a default changed since, so
    # the same command line meant another federation) is run again (here the stubbed launch fails, which the
    # benchmark reports). The folder is emptied first: an unfinished federation's device states would refuse a new one.
    earlier = {**defaults, "ClientConfig": {**defaults["ClientConfig"], "fusion_lr": 0.5}}
    for changed, rounds, ran_under in (({**settings, "seed": "1"}, 10, defaults), (settings, 9, defaults),
                                       (settings, 10, earlier)):
        lines = (source / "metrics.jsonl").read_text().splitlines()[:rounds]
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (run_dir / accuracy.DONE_FILE).write_text(json.dumps({**done, "defaults": ran_under}))
        (run_dir / "clients" / "image-0").mkdir(parents=True)
        with pytest.raises(accuracy.typer.Exit):
            accuracy.run_variant("LOCAL", changed, run_dir)
        assert sorted(p.name for p in run_dir.iterdir()) == ["log.txt"]
    assert len(launched) == 3


def test_a_variants_own_settings_win_and_every_table_reads_the_same_run_folders_into_files_of_its_own(tmp_path, monkeypatch) -> None:
    import json

    from fedafd.benchmarks import accuracy

    # Prepare: capture the settings each federation would run with instead of running it.
    ran, folders = {}, {}

    def fake_run(name, overrides, run_dir, engine="simulate", fleet=accuracy.FLEET, launch=True):
        ran[name] = overrides
        folders.setdefault(name, []).append(run_dir)
        return {"name": name, "overrides": overrides, "wall_seconds": 1.0, "run_dir": str(run_dir),
                "rounds": [{"round": 0, "server_r1_sum": 40.0, "up_bytes_per_client": 0.0,
                            "down_bytes_per_client": 0.0}]}

    monkeypatch.setattr(accuracy, "run_variant", fake_run)
    # Execute: -c device_regime=paper for every run, beside a variant that is the adapters regime.
    accuracy.main(quick=True, seeds="0", out=tmp_path, variants="LOCAL,LOCAL + backbone",
                  overrides=["device_regime=paper", "alpha=0.5"], fmt="json", engine="simulate")
    # Assert: LOCAL takes -c's regime, LOCAL + backbone keeps its own; -c's other keys reach both.
    assert ran["LOCAL"]["device_regime"] == "paper" and ran["LOCAL + backbone"]["device_regime"] == "adapters"
    assert ran["LOCAL"]["alpha"] == ran["LOCAL + backbone"]["alpha"] == "0.5"
    # The paper's table runs its LOCAL in the same folder: one federation, read by both tables.
    accuracy.main(quick=True, seeds="0", out=tmp_path, variants="paper", overrides=["device_regime=paper"],
                  fmt="json", engine="simulate")
    assert folders["LOCAL"] == [tmp_path / "quick/seed0/LOCAL"] * 2 and folders["FedAFD"] == [tmp_path / "quick/seed0/FedAFD"]
    # Each table keeps its own files; --tag names another one over the same runs.
    accuracy.main(quick=True, seeds="0", out=tmp_path, variants="LOCAL,FedAFD", fmt="json", engine="simulate", tag="two")
    tables = {path.name: json.loads(path.read_text())["runs"].keys() for path in tmp_path.glob("results-*.json")}
    assert tables == {"results-quick.json": {"LOCAL", "LOCAL + backbone"}, "results-two.json": {"LOCAL", "FedAFD"},
                      "results-quick-paper.json": set(accuracy.PAPER)}
    assert {path.name for path in tmp_path.glob("RESULTS-*.md")} == {"RESULTS-quick.md", "RESULTS-two.md",
                                                                     "RESULTS-quick-paper.md"}


def test_finished_only_tables_the_finished_federations_and_launches_or_deletes_nothing(tmp_path, monkeypatch) -> None:
    import json
    import subprocess

    from fedafd.benchmarks import accuracy

    # Prepare: LOCAL finished on seeds 0 and 1, FedMD on seed 0 only (seed 1 cut short: a folder without done.json),
    # CreamFL on neither. FedMD - LOCAL on seed 0: image pers. 74 - 70 = +4.
    finished = {("LOCAL", 0): 70.0, ("LOCAL", 1): 80.0, ("FedMD", 0): 74.0}

    def fake_finished(run_dir, command_line, rounds, defaults):
        seed, name = int(run_dir.parent.name[4:]), run_dir.name
        if (name, seed) not in finished:
            return None
        return [{"round": 1, "server_r1_sum": 40.0, "image_pers_top1": finished[name, seed]}], 5.0

    monkeypatch.setattr(accuracy, "finished_run", fake_finished)
    monkeypatch.setattr(accuracy, "summarize_round", lambda record: record)
    launched, real_run = [], subprocess.run  # platform.processor() runs a command of its own

    def run(command, **kw):
        if "fedafd.simulation.cli" in command:
            launched.append(command)
            return subprocess.CompletedProcess(command, 1)
        return real_run(command, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    cut_short = tmp_path / "quick/seed1/FedMD"
    cut_short.mkdir(parents=True)
    (cut_short / "metrics.jsonl").write_text("{}\n")
    # Execute
    accuracy.main(quick=True, seeds="0,1", out=tmp_path, variants="LOCAL,FedMD,CreamFL", fmt="json",
                  engine="simulate", tag="so-far", finished_only=True)
    # Assert: nothing ran and nothing was deleted; each method's seeds are the ones it finished, and the rest are named.
    assert not launched and (cut_short / "metrics.jsonl").exists()
    report = json.loads((tmp_path / "results-so-far.json").read_text())
    assert list(report["not_finished"].items()) == [("FedMD", [1]), ("CreamFL", [0, 1])]
    assert [run["seed"] for run in report["runs"]["FedMD"]] == [0] and report["runs"]["CreamFL"] == []
    assert report["table"]["FedMD"]["minus_local"]["image_pers_top1"] == {"mean": 4.0, "std": 0.0, "n": 1, "ahead": 1}
    assert report["table"]["LOCAL"]["image_pers_top1"]["mean"] == 75.0
    assert report["table"]["CreamFL"] == {"not_run": "not finished on any seed"}
    markdown = (tmp_path / "RESULTS-so-far.md").read_text()
    assert "| CreamFL | - |" in markdown and "not finished on any seed |" in markdown
    assert "Not finished, left out (--finished-only): FedMD seed 1; CreamFL seeds 0, 1." in markdown
