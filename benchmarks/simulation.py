"""The simulation engine against real processes: speed side by side, and memory against the devices.

    python -m fedafd.benchmarks.simulation speed --out benchmarks/results/simulation/speed.json
    python -m fedafd.benchmarks.simulation memory --devices 10,100,300 \\
        --out benchmarks/results/simulation/memory.json --plot docs/img/simulation-memory.png

speed: the accuracy benchmark's quick setting, the paper's fleet, FedAFD, one seed, run once as
`fedafd-cloud serve --local` (a process per device) and once as `fedafd-cloud simulate`, one after the other
in one run on this machine; the wall time of each whole command (start-up included), their ratio, where a
round's time goes (the stage timings of metrics.jsonl, the devices' compute inside collect), and how far
apart the two runs' final numbers are for the same seed.

memory: `simulate` with N adapter devices of mixed kinds (image, text, multimodal in 3:3:1), one round, each
N in a fresh process; its peak resident memory (ru_maxrss) against N, with a least-squares line whose slope
is the memory per device beyond what is shared (the data sets, the backbones' cached features, torch).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from fedafd.benchmarks.accuracy import FLEET, SETTINGS
from fedafd.benchmarks.load import fit_line
from fedafd.cloud_server.reporting.report import METRICS_FILE, read_metrics, summarize_round

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0])

ADAPTERS = ["--local-set", "image_arch=effnet_linear", "--local-set", "text_arch=minilm_linear"]
"""Every device an adapter over the frozen backbones (the memory benchmark's devices)."""


def _cloud(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedafd.simulation.cli", *args]


def _settings(seed: int, rounds: int) -> list[str]:
    values = dict(SETTINGS["quick"], rounds=str(rounds), seed=str(seed), strategy="fedafd")
    return [arg for key, value in values.items() for arg in ("-c", f"{key}={value}")]


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    return time.perf_counter() - started


def where_time_goes(records: list[dict]) -> dict[str, float]:
    """Mean seconds per round: each server stage, and inside collect the devices' own compute (training,
    evaluation, features: the sum of their compute_seconds, which run one after another or on the workers)."""
    stages = sorted({stage for record in records for stage in record["timings"]})
    result = {stage: statistics.fmean(r["timings"].get(stage, 0.0) for r in records) for stage in stages}
    result["devices_compute_sum"] = statistics.fmean(
        sum(c["metrics"].get("compute_seconds", 0.0) for c in r["clients"].values()) for r in records)
    return result


@app.command()
def speed(
    seed: Annotated[int, typer.Option(help="The federation's seed (the same for both engines).")] = 0,
    rounds: Annotated[int, typer.Option(help="Rounds (the quick setting's 10).")] = 10,
    workers: Annotated[int, typer.Option(help="simulate --workers.")] = 2,
    out: Annotated[Path, typer.Option(help="JSON of the results.")] = Path("runs/bench/simulation/speed.json"),
) -> None:
    """serve --local against simulate, the same federation, one after the other."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine, command in (
            ("processes", _cloud("serve", "--local", FLEET, "--out", f"{tmp}/processes", *_settings(seed, rounds))),
            ("simulate", _cloud("simulate", "--fleet", FLEET, "--workers", str(workers), "--out", f"{tmp}/simulate",
                                *_settings(seed, rounds))),
        ):
            typer.echo(f"[{engine}] {' '.join(command[2:])}", err=True)
            wall = _timed(command)
            records = read_metrics(Path(tmp) / engine / METRICS_FILE)
            runs[engine] = {"wall_seconds": wall, "final": summarize_round(records[-1]), "round_seconds": where_time_goes(records)}
            typer.echo(f"[{engine}] {wall:.1f} s", err=True)
    processes, simulate = runs["processes"]["final"], runs["simulate"]["final"]
    differences = {key: simulate[key] - processes[key] for key in processes
                   if key in simulate and key not in ("round", "seconds")}
    result = {"seed": seed, "rounds": rounds, "workers": workers, "fleet": FLEET, "setting": "quick",
              "machine": _machine(), "ratio": runs["simulate"]["wall_seconds"] / runs["processes"]["wall_seconds"],
              "final_differences": differences, "runs": runs}
    _write(out, result)
    typer.echo(f"simulate / serve --local wall time: {result['ratio']:.2f} "
               f"({runs['simulate']['wall_seconds']:.0f} s / {runs['processes']['wall_seconds']:.0f} s)")
    typer.echo("largest difference in the final numbers: " +
               max((f"{abs(v):.2f} ({k})" for k, v in differences.items()), key=lambda t: float(t.split()[0])))


def memory_fleet(devices: int) -> str:
    """N devices as image:text:multimodal 3:3:1 (the 760 Tux Paint pairs give 300 devices' 43 at least 10 each)."""
    multimodal = max(devices // 7, 1)
    image = (devices - multimodal + 1) // 2
    return f"image={image},text={devices - multimodal - image},multimodal={multimodal}"


@app.command("memory-one", hidden=True)
def memory_one(devices: int, workers: int = 2) -> None:
    """One federation of N adapter devices in this process; prints its peak RSS (JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        command = ["simulate", "--fleet", memory_fleet(devices), "--workers", str(workers), "--out", f"{tmp}/run",
                   "-c", "rounds=1", "-c", "local_epochs=1", "-c", "max_private=100", "-c", "max_test=100",
                   # alpha 100: an even split, so that 43 multimodal devices each get 10 of the 760 pairs
                   "-c", "alpha=100", *ADAPTERS]
        from fedafd.simulation.cli import fedafd_cloud

        try:
            fedafd_cloud(command, standalone_mode=False)
        finally:
            records = read_metrics(Path(tmp) / "run" / METRICS_FILE) if (Path(tmp) / "run" / METRICS_FILE).exists() else []
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"devices": devices, "fleet": memory_fleet(devices), "peak_rss_mb": peak_mb,
                      "uploads_recorded": sum(len(r["clients"]) for r in records),
                      "seconds": time.perf_counter() - started}))


@app.command()
def memory(
    devices: Annotated[str, typer.Option(help="Comma-separated device counts.")] = "10,100,300",
    workers: Annotated[int, typer.Option(help="simulate --workers.")] = 2,
    out: Annotated[Path, typer.Option(help="JSON of the results.")] = Path("runs/bench/simulation/memory.json"),
    plot_path: Annotated[Path, typer.Option("--plot", help="PNG of peak RSS against devices.")] =
        Path("runs/bench/simulation/memory.png"),
) -> None:
    """Peak RSS of simulate against the number of devices, each count in a fresh process."""
    results = []
    for n in (int(x) for x in devices.split(",")):
        line = subprocess.run([sys.executable, "-m", "fedafd.benchmarks.simulation", "memory-one", str(n),
                               "--workers", str(workers)], check=True, capture_output=True, text=True).stdout
        results.append(json.loads(line.strip().splitlines()[-1]))
        typer.echo(f"{n:>5} devices: peak RSS {results[-1]['peak_rss_mb']:.0f} MB, "
                   f"{results[-1]['uploads_recorded']} uploads, {results[-1]['seconds']:.0f} s", err=True)
    fit = fit_line([r["devices"] for r in results], [r["peak_rss_mb"] for r in results]) if len(results) > 1 else {}
    _write(out, {"workers": workers, "machine": _machine(), "fit": fit, "results": results})
    if fit:
        typer.echo(f"{fit['slope']:.2f} MB per device beyond {fit['intercept']:.0f} MB shared (R^2 {fit['r2']:.3f})")
        _plot(results, fit, plot_path)
        typer.echo(f"plot: {plot_path}", err=True)


def _plot(results: list[dict], fit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = np.array([r["devices"] for r in results], float)
    line = np.linspace(0, devices.max(), 50)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(devices, [r["peak_rss_mb"] for r in results], "o", label="measured")
    axis.plot(line, fit["slope"] * line + fit["intercept"], "--", label=f"fit: {fit['slope']:.2f} MB/device")
    axis.set(xlabel="simulated devices (adapters, image:text:multimodal 3:3:1)", ylabel="peak RSS MB",
             title="fedafd-cloud simulate: memory")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app()
