"""Accuracy benchmark: LOCAL, LOCAL + backbone, FedAFD and its ablations and codecs, each a whole
federation, over several seeds.

    python -m fedafd.benchmarks.accuracy --quick --seeds 0,1,2       # docs/results.md's table
    python -m fedafd.benchmarks.accuracy --seeds 0                   # the paper's protocol: 40 rounds x 5 local epochs
    python -m fedafd.benchmarks.accuracy --quick --format json > results.json   # JSON on stdout, progress on stderr
    python -m fedafd.benchmarks.accuracy --quick --variants paper --seeds 0,1,2 # the paper's comparison table
    python -m fedafd.benchmarks.accuracy --quick --variants paper --seeds 0,1,2 --finished-only  # its table so far

The paper's client mix (3 image, 3 text, 4 multimodal devices; Dirichlet alpha 0.1) runs once per
variant and seed through `fedafd-cloud simulate` (--engine simulate, the default: one process, the same
numbers every time) or `fedafd-cloud serve --local` (--engine processes: a process per device over
ZeroMQ, the end-to-end check). Every variant gets the same budget (rounds, local epochs, private samples,
server epochs). Writes RESULTS-<setting>.md and results-<setting>.json in --out; each federation's own
output goes to RUN_DIR/log.txt, and a progress bar over the federations estimates the time left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Iterator

import typer

from fedafd.cloud_server.reporting.report import METRICS_FILE, read_metrics, summarize_round

FLEET = "image=3,text=3,multimodal=4"

# Every device an adapter over the frozen backbone (instead of the fleet's mix with small nets).
ALL_ADAPTERS = {"device_regime": "adapters"}
# GFF's gates at the rate of the rest of the device (the paper's one Adam rate, and the default before
# docs/learning.md H10) instead of their own fusion_lr.
ONE_LR = {"client.fusion_lr": "0"}
VARIANTS: dict[str, dict[str, str]] = {
    "LOCAL": {"strategy": "local"},
    "LOCAL + backbone": {"strategy": "local", **ALL_ADAPTERS},
    "FedAFD": {"strategy": "fedafd"},
    "FedAFD w/o BAA": {"strategy": "fedafd", "baa": "false"},  # the default since H7 (docs/learning.md)
    "FedAFD with BAA": {"strategy": "fedafd", "baa": "true"},  # the paper's method
    "FedAFD w/o GFF": {"strategy": "fedafd", "gff": "false"},
    "FedAFD w/o SED": {"strategy": "fedafd", "sed": "false"},
    # Feature codecs on the wire (uplink features, and downlink global features where they travel).
    "FedAFD fp16": {"strategy": "fedafd", "feature_codec": "fp16"},
    "FedAFD int8": {"strategy": "fedafd", "feature_codec": "int8_row"},
}
# Not run by default: sensitivity to single choices.
SENSITIVITY: dict[str, dict[str, str]] = {
    "FedAFD + backbone": {"strategy": "fedafd", **ALL_ADAPTERS},
    "FedAFD beta 0.1": {"strategy": "fedafd", "beta": "0.1"},
    "FedAFD disc lr 1e-3": {"strategy": "fedafd", "client.disc_lr": "1e-3"},
    "FedAFD init from global": {"strategy": "fedafd", "local_init": "global"},
    "FedAFD distill lr 1e-4": {"strategy": "fedafd", "distill_lr": "1e-4"},
    "FedAFD distill lr 1e-3": {"strategy": "fedafd", "distill_lr": "1e-3"},
    "FedAFD one lr": {"strategy": "fedafd", **ONE_LR},
    "FedAFD + backbone one lr": {"strategy": "fedafd", **ALL_ADAPTERS, **ONE_LR},
    "FedAFD with BAA one lr": {"strategy": "fedafd", "baa": "true", **ONE_LR},
    "FedAFD local loss": {"strategy": "fedafd", "client.local_task_weight": "1"},  # H14
}
# The FedAFD paper's comparison (its Table 1), in its row order; each baseline is a strategy (docs/strategies.md).
PAPER: dict[str, dict[str, str]] = {
    "LOCAL": {"strategy": "local"},
    "FedMD": {"strategy": "fedmd"},
    "FedGEMS": {"strategy": "fedgems"},
    "CreamFL": {"strategy": "creamfl"},
    "FedET": {"strategy": "fedet"},
    "FedCMI": {"strategy": "fedcmi"},
    "FedAFD": {"strategy": "fedafd"},
}
NOT_RUN = {
    "FedMKD": "not pinned down: the only public match (NeurIPS 2024, self-supervised, clients send encoders) gives no "
              "loss weights and no multimodal form, and FedAFD's code has no baselines",
    "FedDFA": "not pinned down: its adversarial sample weighting runs PGD on the inputs, which is unspecified for "
              "text, and how FedAFD adapted it to retrieval is not public",
}
"""Rows of the paper's table this runtime leaves empty, and why (docs/results.md: what is missing)."""
KNOWN_VARIANTS = {**VARIANTS, **SENSITIVITY, **PAPER}

SETTINGS: dict[str, dict[str, str]] = {
    # Edge devices with few samples (at most 100 private ones each), so that LOCAL is not at its ceiling; 5 local
    # epochs a round, where LOCAL's personalised metrics stop moving by round 10 (docs/learning.md H1).
    "quick": {"rounds": "10", "local_epochs": "5", "max_private": "100", "max_test": "500", "alpha": "0.1"},
    # The paper's protocol: 40 rounds of 5 local epochs.
    "full": {"rounds": "40", "local_epochs": "5", "max_private": "100", "max_test": "1000", "alpha": "0.1",
             "device": "auto"},
}

COLUMNS = [
    ("image_top1", "image top-1"),
    ("image_pers_top1", "image pers. top-1"),
    ("text_top1", "text top-1"),
    ("text_pers_top1", "text pers. top-1"),
    ("mm_i2t_r1", "multimodal i2t R@1"),
    ("mm_t2i_r1", "multimodal t2i R@1"),
    ("mm_pers_i2t_r1", "multimodal pers. i2t R@1"),
    ("mm_pers_t2i_r1", "multimodal pers. t2i R@1"),
    ("server_r1_sum", "server R@1 sum"),
    ("server_rsum", "server rsum"),
]
BOUNDS = [("image_top1_bound", "image top-1 bound"), ("text_top1_bound", "text top-1 bound")]


ENGINES = {
    "simulate": ["simulate", "--workers", "2", "--fleet"],
    "processes": ["serve", "--local"],
}
"""How a federation runs: the simulation engine, or a real process per device (fedafd-cloud's commands, before
the fleet)."""


def federation_command(engine: str, overrides: dict[str, str], run_dir: Path, fleet: str = FLEET) -> list[str]:
    """The fedafd-cloud command line of one federation; "client.KEY" is a device setting (--local-set)."""
    command = [sys.executable, "-m", "fedafd.simulation.cli", *ENGINES[engine], fleet, "--out", str(run_dir)]
    for key, value in overrides.items():
        command += ["--local-set", f"{key[7:]}={value}"] if key.startswith("client.") else ["-c", f"{key}={value}"]
    return command


def run_variant(name: str, overrides: dict[str, str], run_dir: Path, engine: str = "simulate",
                fleet: str = FLEET, launch: bool = True) -> dict | None:
    """One federation; its per-round summaries and wall time. Its own output goes to RUN_DIR/log.txt.

    A run folder that already holds this exact command's finished federation (all its rounds in metrics.jsonl) is
    read back instead of run again, so an interrupted benchmark resumes where it stopped. With launch=False a
    federation that has not finished is not started either: None."""
    command = federation_command(engine, overrides, run_dir, fleet)
    command_line = " ".join(command[2:])
    defaults = config_defaults()
    finished = finished_run(run_dir, command_line, int(overrides.get("rounds", 0)), defaults)
    if finished is None and not launch:
        return None
    if finished is None:
        if run_dir.exists():  # an unfinished or different federation: start afresh (its device states would refuse it)
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        started = time.perf_counter()
        with open(run_dir / "log.txt", "w") as log:
            log.write(command_line + "\n")
            log.flush()
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        if returncode != 0:
            typer.secho(f"error: the {name} federation failed; see {run_dir}/log.txt"
                        + (" and clients/*/log.txt" if engine == "processes" else ""), fg="red", err=True)
            raise typer.Exit(1)
        wall = time.perf_counter() - started
        (run_dir / DONE_FILE).write_text(json.dumps({"command": command_line, "defaults": defaults,
                                                        "wall_seconds": wall}) + "\n")
        records = read_metrics(run_dir / METRICS_FILE)
    else:
        records, wall = finished
    return {"name": name, "overrides": overrides, "wall_seconds": wall, "resumed": finished is not None,
            "rounds": [summarize_round(record) for record in records], "run_dir": str(run_dir)}


DONE_FILE = "done.json"
"""Written when a federation finishes: its command line, the defaults it ran under (both what resuming checks) and
its wall time."""


def config_defaults() -> dict[str, dict]:
    """Every server and device setting's default: a command line means these too, so a run made under other
    defaults (say, before a default changed) is not this command's run."""
    from fedafd.runtime.config import ClientConfig, ServerConfig

    defaults = {cls.__name__: {f.name: f.default for f in dataclasses.fields(cls)} for cls in (ServerConfig, ClientConfig)}
    return json.loads(json.dumps(defaults))  # as done.json reads back (a tuple default comes back a list)


def finished_run(run_dir: Path, command_line: str, rounds: int, defaults: dict[str, dict]
                 ) -> tuple[list[dict], float] | None:
    """The records and wall time of RUN_DIR's finished federation if it ran exactly COMMAND_LINE under DEFAULTS
    (config_defaults()), else None."""
    try:
        done = json.loads((run_dir / DONE_FILE).read_text())
        records = read_metrics(run_dir / METRICS_FILE)
    except (OSError, ValueError):
        return None
    if done.get("command") != command_line or done.get("defaults") != defaults or len(records) != rounds:
        return None
    return records, float(done["wall_seconds"])


@contextlib.contextmanager
def federation_progress(total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over the federations on stderr, with the time left estimated from those done; the
    caller says which federation starts (each call after the first counts one as finished)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("federations", total=total)
        started = [False]

        def advance(what: str) -> None:
            progress.update(task, advance=1 if started[0] else 0, description=what)
            started[0] = True

        yield advance


def rounds_to_reach(rounds: list[dict], target: float) -> int | None:
    """1-based round at which the server's R@1 sum first reached `target` (None: never)."""
    for index, summary in enumerate(rounds, start=1):
        if summary["server_r1_sum"] >= target:
            return index
    return None


def aggregate(runs_by_variant: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: mean and standard deviation over seeds of every final-round number, rounds to reach
    LOCAL's final server R@1 sum of the same seed, bytes per device-round and wall time."""
    local_finals = {run["seed"]: run["rounds"][-1] for run in runs_by_variant.get("LOCAL", [])}
    table = {}
    for name, runs in runs_by_variant.items():
        finals = [run["rounds"][-1] for run in runs]
        keys = sorted(set().union(*finals))
        row = {key: _mean_std([final[key] for final in finals if key in final]) for key in keys}
        reached = [rounds_to_reach(run["rounds"], local_finals[run["seed"]]["server_r1_sum"]) for run in runs
                   if run["seed"] in local_finals]
        row["rounds_to_local_server"] = reached
        row["wall_seconds"] = _mean_std([run["wall_seconds"] for run in runs])
        if name != "LOCAL" and local_finals:
            row["minus_local"] = paired_differences(runs, local_finals)
        table[name] = row
    return table


def paired_differences(runs: list[dict], baseline_finals: dict[int, dict]) -> dict[str, dict]:
    """Each column's final-round difference from the baseline's final round of the same seed (seed -> summary):
    mean and standard deviation over the seeds both ran, and on how many of them the variant is ahead. A seed gives
    every method the same private partitions, which move the numbers more than most methods do, so the paired
    difference is the comparison."""
    pairs = [(run["rounds"][-1], baseline_finals[run["seed"]]) for run in runs if run["seed"] in baseline_finals]
    differences = {}
    for key, _ in COLUMNS:
        values = [final[key] - other[key] for final, other in pairs if key in final and key in other]
        if values:
            differences[key] = {**_mean_std(values), "ahead": sum(value > 0 for value in values)}
    return differences


def _mean_std(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def markdown_table(table: dict[str, dict]) -> str:
    header = (["method"] + [label for _, label in COLUMNS]
              + ["up / down per device-round", "rounds to LOCAL's server R@1 sum", "wall s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.items():
        if "not_run" in row:
            lines.append("| " + " | ".join([name] + ["-"] * (len(header) - 2) + [row["not_run"]]) + " |")
            continue
        cells = [name] + [_cell(row.get(key)) for key, _ in COLUMNS]
        up, down = row.get("up_bytes_per_client", {}), row.get("down_bytes_per_client", {})
        cells.append(f"{_bytes(up.get('mean'))} / {_bytes(down.get('mean'))}")
        reached = row["rounds_to_local_server"]
        cells.append(", ".join(str(r) if r else "not reached" for r in reached) if reached else "-")
        cells.append(f"{row['wall_seconds']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    bounds = next((row for row in table.values() if "not_run" not in row), {})
    notes = ", ".join(f"{label} {bounds[key]['mean']:.1f}" for key, label in BOUNDS if bounds.get(key))
    return "\n".join(lines) + (f"\n\nFull-test bounds (share of test samples in the classes a device holds, mean over devices): {notes}." if notes else "")


def difference_table(table: dict[str, dict]) -> str:
    """Each variant minus LOCAL on the same seed: mean ± std over seeds (seeds ahead / seeds)."""
    header = ["method − LOCAL"] + [label for _, label in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.items():
        if "minus_local" not in row:
            continue
        cells = [name]
        for key, _ in COLUMNS:
            stats = row["minus_local"].get(key)
            cells.append(f"{_cell(stats, sign='+')} ({stats['ahead']}/{stats['n']})" if stats else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(stats: dict | None, sign: str = "") -> str:
    """mean ± std over seeds, the mean alone for one seed; sign "+" writes a difference's sign."""
    if not stats:
        return "-"
    mean = format(stats["mean"], f"{sign}.2f")
    return f"{mean} ± {stats['std']:.2f}" if stats["n"] > 1 else mean


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f} MB" if value >= 1e6 else f"{value / 1e3:.1f} kB"


def main(
    quick: Annotated[bool, typer.Option(help="10 rounds of 5 local epochs (docs/results.md's table); without it the paper's 40 x 5.")] = False,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; mean and standard deviation over them.")] = "0",
    out: Annotated[Path, typer.Option(help="Where the runs and the tables go.")] = Path("runs/bench/accuracy"),
    variants: Annotated[str, typer.Option(help="paper (the FedAFD paper's comparison), or a comma-separated subset of: "
                                               + ", ".join(KNOWN_VARIANTS))] = ",".join(VARIANTS),
    overrides: Annotated[list[str], typer.Option("-c", "--set", help="Extra key=value for every run.")] = [],
    fmt: Annotated[str, typer.Option("--format", help="text (a markdown table) or json (on stdout; progress on stderr)")] = "text",
    engine: Annotated[str, typer.Option(help="simulate (one process, deterministic; the default) or processes "
                                             "(serve --local: a process per device over ZeroMQ).")] = "simulate",
    tag: Annotated[str, typer.Option(help="Names the tables written in --out (RESULTS-<tag>.md, results-<tag>.json), so "
                                          "that two tables over the same runs keep their own files. Default: the "
                                          "setting, with -paper for --variants paper.")] = "",
    finished_only: Annotated[bool, typer.Option("--finished-only", help="Run nothing: the tables of the federations "
                                                "that have finished (under today's defaults), the rest listed as not "
                                                "finished; for a campaign still under way.")] = False,
) -> None:
    if fmt not in ("text", "json"):
        raise typer.BadParameter(f"--format must be text or json, got {fmt!r}")
    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    setting = "quick" if quick else "full"
    paper = variants.strip() == "paper"
    chosen = list(PAPER) if paper else [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in KNOWN_VARIANTS]
    if unknown or "LOCAL" not in chosen:
        raise typer.BadParameter(f"variants must include LOCAL and come from {list(KNOWN_VARIANTS)}; unknown: {unknown}")
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    extra = dict(item.split("=", 1) for item in overrides)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    not_finished: dict[str, list[int]] = {}
    with federation_progress(len(seed_list) * len(chosen)) as advance:
        for seed in seed_list:
            for name in chosen:
                # One folder per variant and seed, whichever table asks: the paper's table reads LOCAL's and FedAFD's too.
                run_dir = out / setting / f"seed{seed}" / name.replace(" ", "_").replace("/", "").replace("+", "plus")
                advance(f"{name}, seed {seed}")
                variant = KNOWN_VARIANTS[name]  # a variant is what it says, whatever -c sets for every run
                run_settings = {**SETTINGS[setting], **variant, **{k: v for k, v in extra.items() if k not in variant},
                                "seed": str(seed)}
                result = run_variant(name, run_settings, run_dir, engine, launch=not finished_only)
                if result is None:
                    not_finished.setdefault(name, []).append(seed)
                    continue
                runs[name].append(dict(result, seed=seed))
        advance("done")
    not_finished = {name: not_finished[name] for name in chosen if name in not_finished}  # in the table's order
    table = aggregate({name: finished for name, finished in runs.items() if finished})
    # The paper's row order, with its two rows this runtime cannot pin down.
    order = ["LOCAL", "FedMD", "FedGEMS", "CreamFL", "FedET", "FedMKD", "FedDFA", "FedCMI", "FedAFD"] if paper else chosen
    table = {name: table.get(name) or {"not_run": NOT_RUN.get(name, "not finished on any seed")} for name in order}
    tag = tag or (f"{setting}-paper" if paper else setting)
    report = {"setting": setting, "settings": {**SETTINGS[setting], **extra}, "fleet": FLEET, "seeds": seed_list,
              "engine": engine,
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "table": table, "runs": runs, "not_finished": not_finished}
    (out / f"results-{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = (f"Setting `{setting}`: {FLEET}, seeds {seeds}, "
                + ", ".join(f"{k}={v}" for k, v in {**SETTINGS[setting], **extra}.items())
                + "\n\nFinal-round means over the devices of a kind, then mean ± standard deviation over seeds (top-1 %, "
                  "R@1 %); pers. = personalised (weighted to each device's own label distribution); server R@1 sum = "
                  "i2t R@1 + t2i R@1 on the server's held-out pairs (eval_data; by default the 374 held-out emoji), "
                  "rsum = R@1+R@5+R@10 both ways.\n\n"
                + markdown_table(table)
                + "\n\nPaired by seed (a seed gives every method the same private partitions), "
                  "then mean ± standard deviation over seeds, and (seeds ahead of LOCAL / seeds):\n\n"
                + difference_table(table) + "\n"
                + ("\nNot finished, left out (--finished-only): "
                   + "; ".join(f"{name} seed{'s' if len(left) > 1 else ''} {', '.join(map(str, left))}"
                               for name, left in not_finished.items())
                   + ". A method's means are over the seeds it finished; its differences pair each with LOCAL's.\n"
                   if not_finished else ""))
    (out / f"RESULTS-{tag}.md").write_text(markdown)
    typer.echo(json.dumps(report, indent=2) if fmt == "json" else markdown)


if __name__ == "__main__":
    typer.run(main)
