"""What a run's rounds cost on the wire, read from its metrics.jsonl: bytes per client kind split by what
they carry, beside what FedAvg would send for the same model, and a PNG of cumulative bytes per client
against FedAvg's.

FedAvg-equivalent: every round FedAvg sends the whole model down and the whole update up, so per client
and round it moves `num_params x bytes_per_param` each way (fp32: 4 bytes; headers ignored, which
flatters FedAvg). `num_params` is what each device reports: its whole local model (encoders, fusion,
head, discriminators). The crossover is the model size at which FedAvg's bytes equal the measured ones:
above it features are cheaper, below it weights are.
"""

from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path
from statistics import mean

from fedafd.runtime.accounting import PARTS

FEDAVG_BYTES_PER_PARAM = 4
REFERENCE_MODELS = {"resnet18": 11_689_512, "vit_b16": 86_567_656}
"""Parameter counts of torchvision's resnet18 and vit_b_16 (ImageNet heads): the issue's 11.7M and 86.6M."""


def _client_kinds(records: list[dict]) -> dict[str, str]:
    kinds = {}
    for record in records:
        for cid, client in record.get("clients", {}).items():
            kinds[cid] = client.get("kind", "?")
    return kinds


def _parts_of(record: dict, cid: str, direction: str) -> dict[str, int]:
    parts = record.get("bytes_by_part", {}).get(cid, {}).get(direction)
    if parts is not None:
        return parts
    # A run from before parts were counted: message types stand in (RoundStart unsplit).
    return dict(record.get("bytes", {}).get(cid, {}).get(direction, {}))


def fedavg_bytes(num_params: float, bytes_per_param: float = FEDAVG_BYTES_PER_PARAM) -> float:
    """FedAvg's bytes per client and round in one direction."""
    return num_params * bytes_per_param


def profile_records(records: list[dict], config: dict | None = None) -> dict:
    """The profile of a run (JSON-ready): per kind, per client, FedAvg equivalents, crossovers."""
    config = config or {}
    kinds = _client_kinds(records)
    clients: dict[str, dict] = {}
    for cid, kind in sorted(kinds.items()):
        cumulative, total = [], 0
        per_round = []
        for record in records:
            up = sum(_parts_of(record, cid, "up").values())
            down = sum(_parts_of(record, cid, "down").values())
            total += up + down
            cumulative.append(total)
            if cid in record.get("clients", {}):
                per_round.append({"round": record["round"], "up": up, "down": down,
                                  "up_parts": _parts_of(record, cid, "up"),
                                  "down_parts": _parts_of(record, cid, "down"),
                                  **{f"{k}_seconds": v for k, v in record.get("link", {}).get(cid, {}).items()
                                     if k in ("comm", "compute", "round_trip")}})
        params = [r["clients"][cid]["metrics"].get("num_params", 0.0) for r in records if cid in r.get("clients", {})]
        num_params = int(max(params, default=0))
        # FedAvg moves the model both ways in each round the device took part in, and nothing otherwise.
        fedavg_cumulative = list(accumulate(2 * fedavg_bytes(num_params) if cid in r.get("clients", {}) else 0
                                            for r in records))
        clients[cid] = {"kind": kind, "num_params": num_params, "rounds": per_round,
                        "cumulative_bytes": cumulative, "fedavg_cumulative_bytes": fedavg_cumulative}

    by_kind: dict[str, dict] = {}
    for kind in sorted(set(kinds.values())):
        members = [cid for cid, c in clients.items() if c["kind"] == kind]
        rows = [row for cid in members for row in clients[cid]["rounds"]]
        if not rows:
            continue
        per_round = {d: {p: mean(row[f"{d}_parts"].get(p, 0) for row in rows)
                         for p in sorted({p for row in rows for p in row[f"{d}_parts"]} | set(PARTS))}
                     for d in ("up", "down")}
        up, down = mean(row["up"] for row in rows), mean(row["down"] for row in rows)
        num_params = mean(clients[cid]["num_params"] for cid in members)
        fed = fedavg_bytes(num_params)
        entry = {
            "clients": members,
            "client_rounds": len(rows),
            "num_params": num_params,
            "per_round": {"up": per_round["up"], "down": per_round["down"], "up_total": up, "down_total": down},
            "run_totals": {"up": sum(row["up"] for row in rows) / len(members),
                           "down": sum(row["down"] for row in rows) / len(members)},
            "fedavg_per_round": {"up": fed, "down": fed, "bytes_per_param": FEDAVG_BYTES_PER_PARAM},
            "ratio_to_fedavg": {"up": up / fed if fed else None, "down": down / fed if fed else None,
                                "total": (up + down) / (2 * fed) if fed else None},
            # FedAvg's bytes equal ours at this many parameters: above it, features are cheaper.
            "crossover_params": {"up": up / FEDAVG_BYTES_PER_PARAM, "total": (up + down) / (2 * FEDAVG_BYTES_PER_PARAM)},
            "features_cheaper_for_this_model": {"up": fed > up, "total": 2 * fed > up + down},
            "reference_models": {name: {"num_params": n, "fedavg_per_round": fedavg_bytes(n),
                                        "ratio_up": up / fedavg_bytes(n), "ratio_total": (up + down) / (2 * fedavg_bytes(n))}
                                 for name, n in REFERENCE_MODELS.items()},
        }
        seconds = [row for row in rows if "comm_seconds" in row]
        if seconds:
            entry["seconds_per_round"] = {"comm": mean(r["comm_seconds"] for r in seconds),
                                          "compute": mean(r["compute_seconds"] for r in seconds)}
        by_kind[kind] = entry
    return {
        "rounds": len(records),
        "public_size": records[-1].get("public_size") if records else None,
        "feature_dim": config.get("feature_dim"),
        "codecs": records[-1].get("codecs", {"features": "fp32", "tower": "fp32"}) if records else {},
        "parts": list(PARTS),
        "kinds": by_kind,
        "clients": clients,
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def profile_markdown(profile: dict) -> str:
    lines = [f"Rounds: {profile['rounds']}, public set |P| = {profile['public_size']}, d = {profile['feature_dim']}, "
             f"codecs: features {profile['codecs'].get('features')}, tower {profile['codecs'].get('tower')}. "
             f"MB = 10^6 bytes per client and round (mean over the kind's devices); FedAvg = num_params x "
             f"{FEDAVG_BYTES_PER_PARAM} B each way.", ""]
    for kind, k in profile["kinds"].items():
        lines += [f"### {kind} devices ({', '.join(k['clients'])}; {k['num_params']:,.0f} parameters)", "",
                  "| per round | up MB | down MB |", "|---|---|---|"]
        for part in profile["parts"]:
            lines.append(f"| {part} | {_mb(k['per_round']['up'].get(part, 0))} | {_mb(k['per_round']['down'].get(part, 0))} |")
        fed = k["fedavg_per_round"]["up"]
        lines += [f"| **total** | **{_mb(k['per_round']['up_total'])}** | **{_mb(k['per_round']['down_total'])}** |",
                  f"| FedAvg, same model | {_mb(fed)} | {_mb(fed)} |",
                  f"| ours / FedAvg | {k['ratio_to_fedavg']['up']:.3g} | {k['ratio_to_fedavg']['down']:.3g} |", ""]
        cross = k["crossover_params"]
        verdict = "cheaper" if k["features_cheaper_for_this_model"]["total"] else "MORE expensive"
        lines.append(f"Run totals per device: {_mb(k['run_totals']['up'])} MB up, {_mb(k['run_totals']['down'])} MB down. "
                     f"Crossover: features beat FedAvg's uplink above {cross['up']:,.0f} parameters and its up+down "
                     f"above {cross['total']:,.0f}; for this {k['num_params']:,.0f}-parameter model features are {verdict} "
                     f"than weights (up+down).")
        refs = ", ".join(f"{name} ({r['num_params'] / 1e6:.1f}M): uplink {r['ratio_up']:.4f} of FedAvg, "
                         f"up+down {r['ratio_total']:.4f}" for name, r in k["reference_models"].items())
        lines.append(f"Same bytes against larger client models: {refs}.")
        if "seconds_per_round" in k:
            s = k["seconds_per_round"]
            lines.append(f"Seconds per round: communication {s['comm']:.2f}, compute {s['compute']:.2f}.")
        lines.append("")
    return "\n".join(lines)


def cumulative_figure(profile: dict, size: tuple[int, int] = (900, 520)):
    """Cumulative bytes (up + down) per device over rounds, solid, beside FedAvg's for that device's model,
    dashed in the same colour; a log axis, since the zoo's models differ by orders of magnitude."""
    from matplotlib.lines import Line2D

    from .plots import device_colours, new_figure

    figure, [[axes]] = new_figure(*size)
    colours = device_colours(profile["clients"])
    handles = [Line2D([], [], color="black", marker="o", label="measured"),
               Line2D([], [], color="black", linestyle="--", label="FedAvg, same model")]
    for cid, client in sorted(profile["clients"].items()):
        if not client["cumulative_bytes"]:
            continue
        rounds = range(1, len(client["cumulative_bytes"]) + 1)
        line, = axes.plot(rounds, [b / 1e6 for b in client["cumulative_bytes"]], marker="o", color=colours[cid],
                          label=f"{cid} ({client['num_params'] / 1e6:.2f}M params)")
        handles.append(line)
        if client["num_params"]:
            axes.plot(rounds, [b / 1e6 for b in client["fedavg_cumulative_bytes"]], linestyle="--", color=colours[cid],
                      alpha=0.8)
    axes.set_yscale("log")
    axes.set_xlabel("round")
    axes.set_ylabel("cumulative MB per device (up + down, log scale)")
    axes.set_title("Bytes on the wire against FedAvg for the same model")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return figure


def plot_cumulative(profile: dict, path: Path, size: tuple[int, int] = (900, 520)) -> Path:
    """`cumulative_figure` as a PNG file of exactly `size` pixels."""
    from .plots import png_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(cumulative_figure(profile, size)))
    return path


def write_profile(run_dir: Path, out_dir: Path | None = None) -> dict:
    """Reads RUN_DIR/metrics.jsonl (+ config.json); writes profile.json, profile.md, profile.png; returns the profile."""
    from .report import read_run

    out_dir = out_dir or run_dir
    records, config = read_run(run_dir)
    profile = profile_records(records, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile["plot"] = str(plot_cumulative(profile, out_dir / "profile.png"))
    (out_dir / "profile.json").write_text(json.dumps(profile, indent=2) + "\n")
    (out_dir / "profile.md").write_text(profile_markdown(profile) + "\n")
    return profile
