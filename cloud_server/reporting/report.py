"""Reading a run's metrics.jsonl: per-round summaries by client kind (the CLI's progress line, the
benchmarks' tables)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

METRICS_FILE = "metrics.jsonl"
"""In a run folder: one JSON record per finished round (the server appends it)."""
CONFIG_FILE = "config.json"
"""In a run folder: the server's effective config."""


TIMING_KEYS = frozenset({"timings", "train_seconds", "compute_seconds", "comm", "compute", "round_trip", "seconds"})
"""The wall-clock figures of a round's record: the only part two runs of the same simulation may differ in."""


def without_timings(value):
    """A record (or list of records) with every wall-clock figure removed."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """A run folder's round records (metrics.jsonl) and its effective config (config.json; {} if absent)."""
    config_path = run_dir / CONFIG_FILE
    return read_metrics(run_dir / METRICS_FILE), json.loads(config_path.read_text()) if config_path.exists() else {}


CLASSIFIER_KEYS = ("top1", "pers_top1", "top1_bound")
"""A classification device's metrics: full-test top-1, personalised top-1, and the full-test bound."""
RETRIEVAL_KEYS = ("i2t_r1", "t2i_r1", "pers_i2t_r1", "pers_t2i_r1")


def summarize_round(record: dict) -> dict[str, float]:
    """Means per client kind of the task metrics, the server's retrieval (and its R@1 sum before stage 3 with
    stage 3's change of it, in rounds where stage 3 distilled), and bytes per client."""
    by_kind: dict[str, list[dict]] = {}
    for client in record["clients"].values():
        by_kind.setdefault(client["kind"], []).append(client["metrics"])
    summary: dict[str, float] = {"round": record["round"]}
    for kind, prefix, keys in (("image", "image", CLASSIFIER_KEYS), ("text", "text", CLASSIFIER_KEYS),
                               ("multimodal", "mm", RETRIEVAL_KEYS)):
        for key in keys:
            values = [m[key] for m in by_kind.get(kind, []) if key in m]
            if values:
                summary[f"{prefix}_{key}"] = mean(values)
    summary["server_r1_sum"] = record["server"]["r1_sum"]
    summary["server_rsum"] = record["server"]["rsum"]
    server_diagnostics = record.get("diagnostics", {}).get("server", {})
    if "r1_sum_before_stage3" in server_diagnostics:  # stage 3 distilled this round: what it did to the server
        summary["server_r1_sum_before_stage3"] = server_diagnostics["r1_sum_before_stage3"]
        summary["server_stage3_r1_sum_delta"] = server_diagnostics["stage3_r1_sum_delta"]
    per_client = [c for c in record["bytes"].values()]
    if per_client:
        summary["up_bytes_per_client"] = mean(sum(c.get("up", {}).values()) for c in per_client)
        summary["down_bytes_per_client"] = mean(sum(c.get("down", {}).values()) for c in per_client)
    summary["seconds"] = sum(record["timings"].values())
    return summary


def progress_line(record: dict, rounds: int) -> str:
    s = summarize_round(record)
    parts = [f"round {record['round'] + 1}/{rounds}",
             f"server R@1 sum {s['server_r1_sum']:.1f} rsum {s['server_rsum']:.1f}"]
    for label, full, personal in (("image top-1", "image_top1", "image_pers_top1"), ("text top-1", "text_top1", "text_pers_top1"),
                                  ("multimodal i2t R@1", "mm_i2t_r1", "mm_pers_i2t_r1")):
        if full in s:
            parts.append(f"{label} {s[full]:.1f}" + (f" (pers. {s[personal]:.1f})" if personal in s else ""))
    if "up_bytes_per_client" in s:
        parts.append(f"{s['up_bytes_per_client'] / 1e6:.2f} MB up / {s['down_bytes_per_client'] / 1e6:.2f} MB down per client")
    parts.append(f"{s['seconds']:.0f}s")
    if record["dropped"]:
        parts.append(f"dropped {sorted(record['dropped'])}")
    return " | ".join(parts)


NOT_COMPARED = frozenset({"round", "seconds"})


def compare_runs(run: tuple[list[dict], dict], against: tuple[list[dict], dict]) -> dict:
    """The last round of a run beside the last round of another (read_run's records and config each): every
    summarize_round number of both with the difference, and the config keys in which the two runs differ (a fair
    comparison differs in its strategy alone)."""
    (records, config), (other_records, other_config) = run, against
    if not records or not other_records:
        raise ValueError("both runs need at least one finished round in metrics.jsonl")
    last, other = summarize_round(records[-1]), summarize_round(other_records[-1])
    keys = [k for k in last if k in other and k not in NOT_COMPARED]
    return {"rounds": [last["round"] + 1, other["round"] + 1],
            "config_differs": sorted(k for k in set(config) | set(other_config)
                                     if config.get(k) != other_config.get(k)),
            "metrics": {k: {"run": last[k], "against": other[k], "difference": last[k] - other[k]} for k in keys}}
