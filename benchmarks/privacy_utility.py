"""The privacy-utility curve: what each defence costs the devices and the server, and what it leaves the attack.

    python -m fedafd.benchmarks.privacy_utility --seeds 0,1,2 --epsilons 8,2 --upload-noise 0.05 \
        --out benchmarks/results/privacy

For each arm (no defence; upload noise of the given std; DP-SGD at each epsilon) and seed, one FedAFD federation
of classification devices (`image=3,text=3`; retrieval devices cannot train with DP-SGD) in the adapters regime
(DP-SGD cannot wrap the mixed fleet's BatchNorm CNN or GRU), without BAA (its default paired schedule mixes public
rows into private steps); every arm the same budget. A DP arm's noise multiplier is Opacus's for its epsilon over
the whole budget (rounds x local epochs x ceil(N / batch) Poisson steps at q = 1 / ceil(N / batch)). Then the
label-set attack of `benchmarks/privacy.py` on the devices' last uploads, its shadows trained with the same
defence. Writes privacy_utility.json, a markdown table (PRIVACY-UTILITY.md) and a plot (privacy_utility.png).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated

import typer
from opacus.accountants.utils import get_noise_multiplier

from fedafd.benchmarks.accuracy import federation_progress, run_variant
from fedafd.benchmarks.privacy import PROBE_ROWS, attack, probe_rows, real_devices
from fedafd.edge_client.privacy import sample_rate, steps_per_epoch
from fedafd.runtime.data.modal import load_public_data
from fedafd.cloud_server.reporting.report import METRICS_FILE, read_metrics, summarize_round

FLEET = "image=3,text=3"
BASE = {"strategy": "fedafd", "baa": "false", "device_regime": "adapters", "rounds": "5", "local_epochs": "2",
        "max_private": "500", "max_test": "500", "alpha": "0.1"}
"""Every arm's federation (the DP arms add their device settings)."""
BATCH = 64
DELTA = 1e-5
ARM_FILE = "arm.json"
"""In an arm's run folder: the settings its federation finished with, and its wall time."""
ATTACK_FILE = "attack.json"
"""In an arm's run folder: the attack's results on it."""
COLUMNS = [("image_pers_top1", "image pers. top-1"), ("text_pers_top1", "text pers. top-1"),
           ("image_top1", "image top-1"), ("text_top1", "text top-1"), ("server_r1_sum", "server R@1 sum")]


def dp_noise_for(epsilon: float, base: dict[str, str]) -> float:
    """The noise multiplier that spends `epsilon` (at DELTA) over the whole budget of `base`."""
    private = int(base["max_private"])
    steps = int(base["rounds"]) * int(base["local_epochs"]) * steps_per_epoch(private, BATCH)
    return get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=sample_rate(private, BATCH),
                                steps=steps, accountant="rdp", epsilon_tolerance=0.005)


def arms(epsilons: list[float], upload_noise: float, base: dict[str, str]) -> dict[str, dict[str, str]]:
    chosen = {"no defence": {}}
    if upload_noise:
        chosen[f"upload noise {upload_noise:g}"] = {"client.upload_noise": str(upload_noise)}
    for epsilon in epsilons:
        # a budget a hair above the target, so the accountant's own rounding never stops the last round
        chosen[f"DP-SGD eps {epsilon:g}"] = {"client.dp": "true", "client.dp_epsilon": str(epsilon * 1.01),
                                             "client.dp_delta": str(DELTA), "client.dp_clip": "1.0",
                                             "client.dp_noise": f"{dp_noise_for(epsilon, base):.6f}",
                                             "client.batch_size": str(BATCH)}
    return chosen


def arm_result(name: str, overrides: dict[str, str], run_dir: Path, shadows: int, probe, seed: int) -> dict:
    """One arm's federation and the attack on it. Both are kept in the run folder (the federation's config and
    metrics.jsonl, the attack's ATTACK_FILE): an interrupted benchmark run again goes on where it stopped, and a
    finished arm whose federation settings are the same is not run twice."""
    done = _finished(run_dir, overrides)
    if done is None:
        result = run_variant(name, overrides, run_dir, fleet=FLEET)
        (run_dir / ARM_FILE).write_text(json.dumps({"overrides": overrides, "wall_seconds": result["wall_seconds"]}))
    records = read_metrics(run_dir / METRICS_FILE)
    attack_file = run_dir / ATTACK_FILE
    if attack_file.is_file() and json.loads(attack_file.read_text())["shadows"] == shadows:
        found = json.loads(attack_file.read_text())["results"]
    else:
        found = attack(real_devices(run_dir, probe), shadows, int(overrides["rounds"]) * int(overrides["local_epochs"]),
                       int(overrides["max_private"]), probe, seed, int(overrides.get("feature_dim", 256)))
        attack_file.write_text(json.dumps({"shadows": shadows, "results": found}, indent=2) + "\n")
    return {"seed": seed, "last": summarize_round(records[-1]), "epsilon": spent_epsilon(records[-1]), "attack": found,
            "wall_seconds": json.loads((run_dir / ARM_FILE).read_text())["wall_seconds"], "run_dir": str(run_dir)}


def _finished(run_dir: Path, overrides: dict[str, str]) -> dict | None:
    """The arm file of a finished federation with these settings, or None."""
    arm = run_dir / ARM_FILE
    if not arm.is_file() or json.loads(arm.read_text())["overrides"] != overrides:
        return None
    if len(read_metrics(run_dir / METRICS_FILE)) != int(overrides["rounds"]):
        return None
    return json.loads(arm.read_text())


def spent_epsilon(record: dict) -> float | None:
    values = [c["metrics"]["dp_epsilon"] for c in record["clients"].values() if "dp_epsilon" in c["metrics"]]
    return max(values) if values else None


def _stats(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def main(
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    epsilons: Annotated[str, typer.Option(help="Comma-separated DP budgets (epsilon at delta 1e-5).")] = "8,2",
    upload_noise: Annotated[float, typer.Option(help="Std of the upload-noise arm (0: no such arm).")] = 0.05,
    shadows: Annotated[int, typer.Option(help="Shadow devices per kind for the attack.")] = 20,
    out: Annotated[Path, typer.Option(help="Where the runs, JSON, table and plot go.")] = Path("runs/bench/privacy"),
    overrides: Annotated[list[str], typer.Option("-c", "--set", help="key=value for every federation.")] = [],
) -> None:
    base = {**BASE, **dict(item.split("=", 1) for item in overrides)}
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    chosen = arms([float(e) for e in epsilons.split(",") if e.strip()], upload_noise, base)
    probe = probe_rows(len(load_public_data("train")), 0)
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    with federation_progress(len(seed_list) * len(chosen)) as advance:
        for seed in seed_list:
            for name, extra in chosen.items():
                advance(f"{name}, seed {seed}")
                run_dir = out / "runs" / f"seed{seed}" / name.replace(" ", "_")
                overrides = {**base, **extra, "seed": str(seed)}
                runs[name].append(arm_result(name, overrides, run_dir, shadows, probe, seed))
        advance("done")
    table = {}
    for name, results in runs.items():
        row = {key: _stats([r["last"].get(key) for r in results]) for key, _ in COLUMNS}
        row["epsilon"] = _stats([r["epsilon"] for r in results])
        for kind in ("image", "text"):
            row[f"{kind}_attack_auc"] = _stats([r["attack"][kind]["auc"] for r in results])
            row[f"{kind}_shadow_auc"] = _stats([r["attack"][kind]["shadow_cv_auc"] for r in results])
        table[name] = row
    report = {"fleet": FLEET, "settings": base, "seeds": seed_list, "delta": DELTA, "probe_rows": PROBE_ROWS,
              "arms": chosen, "table": table, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_utility.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = markdown_table(table, base, seed_list)
    (out / "PRIVACY-UTILITY.md").write_text(markdown)
    plot(table, out / "privacy_utility.png")
    typer.echo(markdown)


def _cell(stats: dict | None, digits: int = 1) -> str:
    return "n/a" if stats is None else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(table: dict[str, dict], base: dict[str, str], seeds: list[int]) -> str:
    header = (["arm", "epsilon spent"] + [label for _, label in COLUMNS]
              + ["attack AUC image / text (chance 0.5)", "held-out shadow AUC image / text"])
    lines = [f"`{FLEET}`, seeds {', '.join(map(str, seeds))}, " + ", ".join(f"{k}={v}" for k, v in base.items())
             + "; last round, mean ± std over seeds.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.items():
        cells = [name, _cell(row["epsilon"], 2) if row["epsilon"] else "∞ (no DP)"]
        cells += [_cell(row[key]) for key, _ in COLUMNS]
        cells.append(f"{_cell(row['image_attack_auc'], 2)} / {_cell(row['text_attack_auc'], 2)}")
        cells.append(f"{_cell(row['image_shadow_auc'], 2)} / {_cell(row['text_shadow_auc'], 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict], path: Path) -> None:
    """Utility (personalised top-1 per kind, server R@1 sum) and the attack's held-out AUC by arm."""
    from fedafd.cloud_server.reporting.plots import new_figure, png_bytes

    names = list(table)
    figure, [[left, right]] = new_figure(1100, 420, 1, 2)
    for key, label in COLUMNS[:2] + COLUMNS[4:]:
        means = [table[n][key]["mean"] if table[n][key] else float("nan") for n in names]
        stds = [table[n][key]["std"] if table[n][key] else 0.0 for n in names]
        left.errorbar(range(len(names)), means, yerr=stds, marker="o", capsize=3, label=label)
    left.set_xticks(range(len(names)), names, rotation=20, ha="right")
    left.set_ylabel("% (R@1 sum: i2t + t2i)")
    left.set_title("utility")
    left.legend(fontsize=8)
    for kind in ("image", "text"):
        for which, style in (("attack", "-"), ("shadow", "--")):
            stats = [table[n][f"{kind}_{which}_auc"] for n in names]
            right.errorbar(range(len(names)), [s["mean"] if s else float("nan") for s in stats],
                           yerr=[s["std"] if s else 0.0 for s in stats], marker="o", capsize=3, linestyle=style,
                           label=f"{kind}: {'real devices' if which == 'attack' else 'held-out shadows'}")
    right.axhline(0.5, color="grey", linewidth=0.8)
    right.set_xticks(range(len(names)), names, rotation=20, ha="right")
    right.set_ylabel("label-set attack AUC (chance 0.5)")
    right.set_title("what the uploads give away")
    right.legend(fontsize=8)
    path.write_bytes(png_bytes(figure))


if __name__ == "__main__":
    typer.run(main)
