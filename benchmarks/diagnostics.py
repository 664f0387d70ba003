"""The learning diagnostics of a FedAFD run and a LOCAL run side by side (docs/results.md's table).

    python -m fedafd.benchmarks.diagnostics --seed 0 --out benchmarks/results/diagnostics

Runs the accuracy benchmark's quick setting (paper fleet, 10 rounds) once per strategy with `fedafd-cloud
simulate`, or reads run folders already made (--runs fedafd=DIR,local=DIR), and prints, for the first, middle
and last round, each diagnostic's mean over the devices of a kind (and the server's), as markdown and JSON.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedafd.benchmarks.accuracy import FLEET, SETTINGS
from fedafd.cloud_server.reporting.report import METRICS_FILE, read_metrics

DEVICE_KEYS = ("disc_acc_intra", "disc_acc_cross", "gate1_mean", "gate1_std", "gate2_mean", "upload_cos", "logit_norm",
               "task_loss")
SERVER_KEYS = ("sed_entropy", "teacher_cos")


def device_means(record: dict) -> dict[str, dict[str, float]]:
    """Per device kind, each diagnostic's mean over its devices (and over a multimodal device's modalities)."""
    values: dict[str, dict[str, list[float]]] = {}
    for client in record["clients"].values():
        by_key = values.setdefault(client["kind"], {})
        diagnostics = client.get("diagnostics", {})
        for key, value in diagnostics.items():
            for name, number in (value.items() if isinstance(value, dict) else [(key, value)]):
                if name in DEVICE_KEYS:
                    by_key.setdefault(name, []).append(number)
    return {kind: {key: statistics.fmean(v) for key, v in by_key.items()} for kind, by_key in values.items()}


def server_values(record: dict) -> dict[str, float]:
    server = record.get("diagnostics", {}).get("server", {})
    result = {f"{m}_{key}": server[m][key] for m in ("image", "text") if m in server for key in SERVER_KEYS
              if key in server[m]}
    if "stage3_r1_sum_delta" in server:
        result["stage3_r1_sum_delta"] = server["stage3_r1_sum_delta"]
    return result


def side_by_side(runs: dict[str, list[dict]]) -> tuple[str, dict]:
    """Markdown rows (diagnostic, kind, then per run its value at the first, middle and last round) and JSON."""
    names = list(runs)
    picks = {name: [records[0], records[len(records) // 2], records[-1]] for name, records in runs.items()}
    table: dict[str, dict[str, list[float | None]]] = {}
    for name in names:
        for index, record in enumerate(picks[name]):
            rows = {f"{key} ({kind})": value for kind, keys in device_means(record).items() for key, value in keys.items()}
            rows.update({f"{key} (server)": value for key, value in server_values(record).items()})
            for row, value in rows.items():
                table.setdefault(row, {n: [None, None, None] for n in names})[name][index] = value
    rounds = {name: [r["round"] + 1 for r in picks[name]] for name in names}
    header = ["diagnostic"] + [f"{name} rounds {'/'.join(map(str, rounds[name]))}" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(table):
        cells = [" / ".join("-" if v is None else f"{v:.2f}" for v in table[row][name]) for name in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines), {"rounds": rounds, "table": table}


def main(
    seed: Annotated[int, typer.Option(help="The federations' seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Where the runs, DIAGNOSTICS.md and diagnostics.json go.")] =
        Path("runs/bench/diagnostics"),
    runs: Annotated[Optional[str], typer.Option(help="NAME=RUN_DIR,... of finished runs to read instead.")] = None,
) -> None:
    if runs:
        folders = {name: Path(path) for name, path in (item.split("=", 1) for item in runs.split(","))}
    else:
        folders = {}
        for strategy in ("fedafd", "local"):
            folders[strategy] = run_dir = out / f"seed{seed}" / strategy
            settings = dict(SETTINGS["quick"], seed=str(seed), strategy=strategy)
            command = [sys.executable, "-m", "fedafd.simulation.cli", "simulate", "--fleet", FLEET, "--out", str(run_dir),
                       *(arg for key, value in settings.items() for arg in ("-c", f"{key}={value}"))]
            typer.echo(f"[{strategy}] {' '.join(command[2:])}", err=True)
            subprocess.run(command, check=True, stdout=sys.stderr)
    markdown, result = side_by_side({name: read_metrics(folder / METRICS_FILE) for name, folder in folders.items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "DIAGNOSTICS.md").write_text(markdown + "\n")
    (out / "diagnostics.json").write_text(json.dumps(dict(result, runs={n: str(f) for n, f in folders.items()}),
                                                     indent=2) + "\n")
    typer.echo(markdown)


if __name__ == "__main__":
    typer.run(main)
