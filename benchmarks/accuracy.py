"""Accuracy benchmark: LOCAL vs FedAFD and its three ablations, each a real multi-process federation.

    python -m fedafd.benchmarks.accuracy --quick          # about 20 minutes on 2 CPU cores (7 federations)
    python -m fedafd.benchmarks.accuracy                  # the full setting (uses the GPU when there is one)

The paper's client mix (3 image, 3 text, 4 multimodal devices; Dirichlet alpha 0.1; fixed seed) runs
once per variant through `fedafd-cloud serve --local`. Writes RESULTS.md and results.json in --out.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fedafd.runtime.report import read_metrics, summarize_round

FLEET = "image=3,text=3,multimodal=4"

VARIANTS: dict[str, dict[str, str]] = {
    "LOCAL": {"strategy": "local"},
    "FedAFD": {"strategy": "fedafd"},
    "FedAFD w/o BAA": {"strategy": "fedafd", "baa": "false"},
    "FedAFD w/o GFF": {"strategy": "fedafd", "gff": "false"},
    "FedAFD w/o SED": {"strategy": "fedafd", "sed": "false"},
    # Feature codecs on the wire (uplink features and downlink global features; runtime/codecs.py).
    "FedAFD fp16": {"strategy": "fedafd", "feature_codec": "fp16"},
    "FedAFD int8": {"strategy": "fedafd", "feature_codec": "int8_row"},
}
# Not run by default: how sensitive the comparison is to the adversarial weight (paper: beta 0.5).
SENSITIVITY: dict[str, dict[str, str]] = {
    "FedAFD beta 0.1": {"strategy": "fedafd", "beta": "0.1"},
    "FedAFD disc lr 1e-4": {"strategy": "fedafd", "client.disc_lr": "1e-4"},
}
KNOWN_VARIANTS = {**VARIANTS, **SENSITIVITY}

SETTINGS: dict[str, dict[str, str]] = {
    "quick": {"rounds": "4", "local_epochs": "2", "max_private": "400", "max_test": "500", "public_size": "500",
              "feature_dim": "128", "image_arch": "cnn_small", "text_arch": "gru", "alpha": "0.1", "seed": "0"},
    "full": {"rounds": "10", "local_epochs": "2", "max_private": "2000", "max_test": "1000", "public_size": "0",
             "feature_dim": "256", "alpha": "0.1", "seed": "0", "device": "auto"},
}

COLUMNS = [
    ("image_top1", "image top-1"),
    ("text_top1", "text top-1"),
    ("mm_i2t_r1", "multimodal i2t R@1"),
    ("mm_t2i_r1", "multimodal t2i R@1"),
    ("server_r1_sum", "server R@1 sum"),
    ("server_rsum", "server rsum"),
    ("up_bytes_per_client", "up bytes per client-round"),
    ("down_bytes_per_client", "down bytes per client-round"),
]


def run_variant(name: str, overrides: dict[str, str], out_dir: Path) -> dict:
    run_dir = out_dir / name.replace(" ", "_").replace("/", "")
    command = [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--local", FLEET, "--out", str(run_dir)]
    for key, value in overrides.items():
        # "client.KEY" is a device setting (ClientConfig), passed to every --local device.
        command += ["--local-set", f"{key[7:]}={value}"] if key.startswith("client.") else ["-c", f"{key}={value}"]
    typer.echo(f"[{name}] {' '.join(command[2:])}", err=True)
    started = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        typer.secho(f"error: the {name} federation failed; see {run_dir}/clients/*/log.txt", fg="red", err=True)
        raise typer.Exit(1)
    wall = time.perf_counter() - started
    records = read_metrics(run_dir / "metrics.jsonl")
    return {"name": name, "overrides": overrides, "wall_seconds": wall,
            "rounds": [summarize_round(record) for record in records], "run_dir": str(run_dir)}


def rounds_to_reach(rounds: list[dict], target: float) -> int | None:
    """1-based round at which the server's R@1 sum first reached `target` (None: never)."""
    for index, summary in enumerate(rounds, start=1):
        if summary["server_r1_sum"] >= target:
            return index
    return None


def table(results: list[dict]) -> str:
    local_final = next(r for r in results if r["name"] == "LOCAL")["rounds"][-1]["server_r1_sum"]
    header = ["method"] + [label for _, label in COLUMNS] + ["rounds to LOCAL's server R@1 sum", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        final = result["rounds"][-1]
        reached = rounds_to_reach(result["rounds"], local_final)
        cells = [result["name"]] + [f"{final[key]:.2f}" if key in final else "-" for key, _ in COLUMNS]
        cells += [str(reached) if reached else "not reached", f"{result['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    quick: Annotated[bool, typer.Option(help="Small slices, 4 rounds of 2 local epochs: about 20 minutes for the 7 variants on 2 CPU cores.")] = False,
    out: Annotated[Path, typer.Option(help="Where the runs and the tables go.")] = Path("benchmarks/results/accuracy"),
    variants: Annotated[str, typer.Option(help="Comma-separated subset of: " + ", ".join(KNOWN_VARIANTS))] = ",".join(VARIANTS),
    overrides: Annotated[list[str], typer.Option("-c", "--set", help="Extra key=value for every run.")] = [],
) -> None:
    setting = "quick" if quick else "full"
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in KNOWN_VARIANTS]
    if unknown or "LOCAL" not in chosen:
        raise typer.BadParameter(f"variants must include LOCAL and come from {list(KNOWN_VARIANTS)}; unknown: {unknown}")
    extra = dict(item.split("=", 1) for item in overrides)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_variant(name, {**SETTINGS[setting], **KNOWN_VARIANTS[name], **extra}, out / setting) for name in chosen]
    report = {"setting": setting, "fleet": FLEET, "machine": {"cpu": platform.processor() or platform.machine(),
                                                               "python": platform.python_version()},
              "results": results}
    (out / f"results-{setting}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = (f"Setting `{setting}`: {FLEET}, " + ", ".join(f"{k}={v}" for k, v in {**SETTINGS[setting], **extra}.items())
                + "\n\nClient metrics are means over the devices of a kind at the last round (top-1 %, R@1 %); "
                  "server R@1 sum = i2t R@1 + t2i R@1 on the held-out public split, rsum = R@1+R@5+R@10 both ways.\n\n"
                + table(results) + "\n")
    (out / f"RESULTS-{setting}.md").write_text(markdown)
    typer.echo(markdown)


if __name__ == "__main__":
    typer.run(main)
