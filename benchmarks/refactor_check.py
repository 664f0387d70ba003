"""Learning and bytes unchanged by a refactor: the same short federations on two trees, compared record by record.

    # on the tree before (e.g. a `git worktree` of the old commit, with its own install) and on this one:
    python -m fedafd.benchmarks.refactor_check run /tmp/before
    python -m fedafd.benchmarks.refactor_check run /tmp/after
    python -m fedafd.benchmarks.refactor_check compare /tmp/before /tmp/after

`run` makes one 3-round `fedafd-cloud simulate` federation (2 image, 2 text, 1 multimodal device: adapters and
small nets; one torch thread, so the numbers do not depend on the thread count) for every strategy, the three
ablations, local_init=global and int8 features. The simulation gives the same metrics.jsonl for the same
command, so `compare` asks for identical records but for the timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedafd.cloud_server.reporting.report import METRICS_FILE, without_timings
from fedafd.runtime.methods import STRATEGIES

app = typer.Typer(no_args_is_help=True, add_completion=False)

SETTINGS = ["-c", "rounds=3", "-c", "public_size=96", "-c", "max_private=40", "-c", "max_test=40", "-c", "local_epochs=1",
            "-c", "batch_size=16", "-c", "alpha=1.0", "-c", "threads=1", "-c", "seed=5", "--local-set", "batch_size=16"]
VARIANTS = {
    "fedafd": [], "no_baa": ["baa=false"], "no_gff": ["gff=false"], "no_sed": ["sed=false"],
    **{name: [f"strategy={name}"] for name in STRATEGIES if name != "fedafd"},  # every method, a new one too
    "init_global": ["local_init=global"], "int8": ["feature_codec=int8_row"],
}
def first_difference(a, b, path: str = "") -> str:
    """Where two records first differ ("" when they are equal)."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}/{key}: only on one side"
            found = first_difference(a[key], b[key], f"{path}/{key}")
            if found:
                return found
        return ""
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} != {len(b)} items"
        return next((d for d in (first_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))) if d), "")
    return "" if a == b else f"{path}: {a} != {b}"


@app.command()
def run(out: Annotated[Path, typer.Argument(help="Folder for one run folder per variant.")]) -> None:
    """The federations, one after the other."""
    for name, values in VARIANTS.items():
        command = [sys.executable, "-m", "fedafd.simulation.cli", "simulate", "--fleet", "image=2,text=2,multimodal=1",
                   "--workers", "2", "--out", str(out / name), *SETTINGS, *(a for v in values for a in ("-c", v))]
        typer.echo(f"[{name}]", err=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


@app.command()
def compare(before: Path, after: Path) -> None:
    """Every variant's records, but for timings: identical, or the first difference."""
    differing = 0
    for name in VARIANTS:
        records = [[without_timings(json.loads(line)) for line in (folder / name / METRICS_FILE).read_text().splitlines()]
                   for folder in (before, after)]
        difference = first_difference(*records)
        differing += bool(difference)
        typer.echo(f"{name}: {'identical, ' + str(len(records[0])) + ' rounds' if not difference else difference}")
    typer.echo("all identical" if not differing else f"{differing} differ")
    raise typer.Exit(1 if differing else 0)


if __name__ == "__main__":
    app()
