"""What a run's rounds cost on the wire, read from its metrics.jsonl: bytes per client kind split by what
they carry, beside what FedAvg would send for the same model, and a PNG of cumulative bytes per client.

FedAvg-equivalent: every round FedAvg sends the whole model down and the whole update up, so per client
and round it moves `num_params x bytes_per_param` each way (fp32: 4 bytes; headers ignored, which
flatters FedAvg). `num_params` is what each device reports: its whole local model (encoders, fusion,
head, discriminators). The crossover is the model size at which FedAvg's bytes equal the measured ones:
above it features are cheaper, below it weights are.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from .accounting import PARTS

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
        clients[cid] = {"kind": kind, "num_params": int(max(params, default=0)), "rounds": per_round,
                        "cumulative_bytes": cumulative}

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


# ---------------------------------------------------------------------------------------------------
# PNG (Pillow; matplotlib is not a dependency)

_KIND_COLOURS = {"image": (31, 119, 180), "text": (255, 127, 14), "multimodal": (44, 160, 44), "?": (120, 120, 120)}


def plot_cumulative(profile: dict, path: Path, size: tuple[int, int] = (900, 520)) -> Path:
    """Line chart of cumulative bytes (up + down, MB) per client over rounds, coloured by kind."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 80, 190, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    series = {cid: c["cumulative_bytes"] for cid, c in profile["clients"].items() if c["cumulative_bytes"]}
    rounds = max((len(v) for v in series.values()), default=1)
    peak = max((max(v) for v in series.values()), default=1) or 1
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def xy(i: int, value: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * (i / max(rounds - 1, 1))
        return x, y0 - (y0 - y1) * value / peak

    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black", width=2)
    for t in range(5):
        value = peak * t / 4
        _, y = xy(0, value)
        draw.line([(x0 - 5, y), (x0, y)], fill="black")
        draw.text((8, y - 6), f"{value / 1e6:.2f}", fill="black")
    for i in range(rounds):
        x, _ = xy(i, 0)
        draw.line([(x, y0), (x, y0 + 5)], fill="black")
        draw.text((x - 4, y0 + 8), str(i + 1), fill="black")
    draw.text((x0 + (x1 - x0) // 2 - 20, height - 25), "round", fill="black")
    draw.text((8, 12), "cumulative MB per client (up + down)", fill="black")
    for n, (cid, values) in enumerate(sorted(series.items())):
        colour = _KIND_COLOURS.get(profile["clients"][cid]["kind"], _KIND_COLOURS["?"])
        points = [xy(i, v) for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 16 * n
        draw.line([(x1 + 15, ly + 6), (x1 + 35, ly + 6)], fill=colour, width=3)
        draw.text((x1 + 40, ly), cid, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def write_profile(run_dir: Path, out_dir: Path | None = None) -> dict:
    """Reads RUN_DIR/metrics.jsonl (+ config.json); writes profile.json, profile.md, profile.png; returns the profile."""
    from .report import read_metrics

    out_dir = out_dir or run_dir
    records = read_metrics(run_dir / "metrics.jsonl")
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    profile = profile_records(records, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile["plot"] = str(plot_cumulative(profile, out_dir / "profile.png"))
    (out_dir / "profile.json").write_text(json.dumps(profile, indent=2) + "\n")
    (out_dir / "profile.md").write_text(profile_markdown(profile) + "\n")
    return profile
