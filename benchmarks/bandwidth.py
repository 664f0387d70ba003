"""Bandwidth benchmark: a short real federation (server + one device per shipped profile, each shaping its
own link with `fedafd-edge join --profile`), once per feature codec; writes a table of bytes, communication
vs compute seconds, the round's critical path, and FedAvg for three client model sizes.

    python -m fedafd.benchmarks.bandwidth                      # about 3 minutes on 2 CPU cores
    python -m fedafd.benchmarks.bandwidth --codecs int8_row --kind image -c public_size=0 -c feature_dim=256

Measured: bytes (every frame), communication seconds (server's RoundStart hand-off to the upload's
arrival, minus the device's reported compute; on loopback this is the profile's emulated link) and compute
seconds on *this* machine. Projected: compute x the profile's compute_factor (an estimate unless the
profile came from `fedafd-edge bench` on the device), and FedAvg's transfer seconds on the same link
(num_params x 4 bytes each way, through the profile's token bucket and RTT). Writes RESULTS.md and
results.json in --out.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Annotated

import typer

from fedafd.cloud_server.reporting.bandwidth import REFERENCE_MODELS, fedavg_bytes
from fedafd.cloud_server.reporting.report import METRICS_FILE, read_metrics
from fedafd.runtime.shaping import load_profile, shipped_profiles

SETTING = {"rounds": "2", "local_epochs": "1", "public_size": "500", "feature_dim": "128", "image_arch": "cnn_small",
           "text_arch": "gru", "seed": "0", "tower_codec": "fp16", "join_timeout_s": "300", "round_deadline_s": "900"}
"""Server config of every run (the accuracy benchmark's quick setting's sizes)."""
CLIENT_SETTING = {"max_private": "160", "max_test": "64", "threads": "1", "heartbeat_s": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_federation(codec: str, profiles: list[str], kind: str, out_dir: Path, extra: dict[str, str]) -> Path:
    """One server + one `kind` device per profile, on loopback; returns the run folder."""
    run_dir = out_dir / f"codec_{codec}"
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    settings = {**SETTING, "feature_codec": codec, "expected_clients": str(len(profiles)),
                "min_clients": str(len(profiles)), **extra}
    server_cmd = [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--bind", endpoint, "--out", str(run_dir),
                  "--insecure"]
    for key, value in settings.items():
        server_cmd += ["-c", f"{key}={value}"]
    typer.echo(f"[{codec}] {' '.join(server_cmd[2:])}", err=True)
    server = subprocess.Popen(server_cmd)
    clients = []
    for index, name in enumerate(profiles):
        command = [sys.executable, "-m", "fedafd.edge_client.cli", "join", "--server", endpoint, "--kind", kind,
                   "--partition", str(index), "--num-partitions", str(len(profiles)), "--client-id", f"{name}",
                   "--state-dir", str(run_dir / "clients" / name), "--profile", name, "--insecure"]
        for key, value in {**CLIENT_SETTING, "seed": settings["seed"]}.items():
            command += ["-c", f"{key}={value}"]
        (run_dir / "clients" / name).mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "clients" / name / "log.txt", "wb")
        clients.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        if server.wait(timeout=3600) != 0:
            raise RuntimeError(f"server failed (exit {server.returncode}); see {run_dir}")
        for process, _ in clients:
            process.wait(timeout=60)
    finally:
        for process, log in clients:
            if process.poll() is None:
                process.kill()
            log.close()
        if server.poll() is None:
            server.kill()
    return run_dir


def summarize(run_dir: Path, codec: str) -> list[dict]:
    """One row per device from the run's last round (steady state: the tower is re-sent every round, and a
    device that joined twice while the server was starting gets round 0's RoundStart twice), with FedAvg
    equivalents on its link."""
    records = read_metrics(run_dir / METRICS_FILE)[-1:]
    rows = []
    devices = sorted({cid for r in records for cid in r["clients"]})
    critical = [max(r["link"][c]["round_trip"] for c in r["link"]) for r in records if r.get("link")]
    for cid in devices:
        mine = [r for r in records if cid in r["clients"] and cid in r.get("link", {})]
        profile = load_profile(cid)
        up = mean(sum(r["bytes"][cid]["up"].values()) for r in mine)
        down = mean(sum(r["bytes"][cid]["down"].values()) for r in mine)
        features_up = mean(r["bytes_by_part"][cid]["up"].get("public_features", 0) for r in mine)
        tower_down = mean(r["bytes_by_part"][cid]["down"].get("global_tower", 0) for r in mine)
        comm = mean(r["link"][cid]["comm"] for r in mine)
        compute = mean(r["link"][cid]["compute"] for r in mine)
        num_params = max(r["clients"][cid]["metrics"].get("num_params", 0.0) for r in mine)
        models = {"ours": num_params, **REFERENCE_MODELS}
        fedavg = {}
        for name, n in models.items():
            nbytes = fedavg_bytes(n)
            fedavg[name] = {"num_params": n, "bytes_each_way": nbytes, "uplink_ratio": up / nbytes,
                            "seconds": profile.transfer_seconds(int(nbytes), "up") + profile.transfer_seconds(int(nbytes), "down")}
        rows.append({"codec": codec, "profile": cid, "kind": records[0]["clients"][cid]["kind"],
                     "up_bytes": up, "down_bytes": down, "features_up_bytes": features_up, "tower_down_bytes": tower_down,
                     "comm_s": comm, "compute_s": compute, "compute_factor": profile.compute_factor,
                     "projected_compute_s": compute * profile.compute_factor, "fedavg": fedavg,
                     "critical_path_s": mean(critical) if critical else float("nan")})
    return rows


def table(rows: list[dict]) -> str:
    header = ["codec", "profile (up/down Mbit/s, RTT)", "up MB/round", "down MB/round (tower)", "comm s", "compute s here",
              "compute s projected", "round critical path s", "FedAvg MB each way: ours / ResNet-18 / ViT-B/16",
              "uplink vs FedAvg: ours / ResNet-18 / ViT-B/16", "FedAvg comm s: ours / ResNet-18 / ViT-B/16"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        p = load_profile(row["profile"])
        f = [row["fedavg"][k] for k in ("ours", "resnet18", "vit_b16")]
        lines.append("| " + " | ".join([
            row["codec"], f"{row['profile']} ({p.uplink_mbps:g}/{p.downlink_mbps:g}, {p.rtt_ms:g} ms)",
            f"{row['up_bytes'] / 1e6:.3f}", f"{row['down_bytes'] / 1e6:.2f} ({row['tower_down_bytes'] / 1e6:.2f})",
            f"{row['comm_s']:.2f}", f"{row['compute_s']:.2f}",
            f"{row['projected_compute_s']:.1f} (x{row['compute_factor']:g})", f"{row['critical_path_s']:.2f}",
            " / ".join(f"{x['bytes_each_way'] / 1e6:.1f}" for x in f),
            " / ".join(f"1/{1 / x['uplink_ratio']:.0f}" for x in f),
            " / ".join(f"{x['seconds']:.1f}" for x in f),
        ]) + " |")
    return "\n".join(lines)


def main(
    out: Annotated[Path, typer.Option(help="Where the runs and the table go.")] = Path("runs/bench/bandwidth"),
    codecs: Annotated[str, typer.Option(help="Comma-separated feature codecs, one federation each.")] = "fp32,fp16,int8_row",
    kind: Annotated[str, typer.Option(help="Kind of every device (multimodal sends two feature matrices).")] = "multimodal",
    profiles: Annotated[str, typer.Option(help="Comma-separated device profiles, one device each.")] = ",".join(shipped_profiles()),
    overrides: Annotated[list[str], typer.Option("-c", "--set", help="Extra server key=value for every run.")] = [],
    summarize_only: Annotated[bool, typer.Option(help="Rebuild the table from the runs already in --out.")] = False,
) -> None:
    chosen = [p.strip() for p in profiles.split(",") if p.strip()]
    extra = dict(item.split("=", 1) for item in overrides)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for codec in [c.strip() for c in codecs.split(",") if c.strip()]:
        run_dir = out / f"codec_{codec}" if summarize_only else run_federation(codec, chosen, kind, out, extra)
        rows += summarize(run_dir, codec)
    setting = {**SETTING, **extra}
    report = {"setting": setting, "client_setting": CLIENT_SETTING, "kind": kind, "rows": rows,
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "wall_seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = (f"One {kind} device per profile, " + ", ".join(f"{k}={v}" for k, v in setting.items())
                + ". Per device, last round. comm s = server's RoundStart hand-off to the upload's "
                  "arrival minus the device's compute (training, evaluation, feature extraction), i.e. the emulated "
                  "link plus message handling; compute projected = compute here x the profile's compute_factor; "
                  "critical path = the slowest device's round trip, measured here. FedAvg = num_params x 4 B each way; "
                  "its comm s = that many bytes through the same emulated link, up and down.\n\n"
                + table(rows) + "\n")
    (out / "RESULTS.md").write_text(markdown)
    typer.echo(markdown)


if __name__ == "__main__":
    typer.run(main)
