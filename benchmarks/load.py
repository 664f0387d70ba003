"""Load: one real `fedafd-cloud serve` against many simulated devices on loopback.

    python -m fedafd.benchmarks.load --clients 100,250,500,1000 --out benchmarks/results/load.json

Each simulated device (benchmarks/sim_clients.py) speaks the real protocol over its own ZeroMQ socket
and answers every RoundStart at once with a realistic FeatureUpload (|P| x d float32 per modality), so
the numbers are the server's: per round, the wall time of each stage, the messages it handled per
second while sending RoundStarts and collecting uploads (RoundStart + FeatureUpload + Ack per device),
and its peak resident memory (VmHWM). Devices are image devices by default: the text tower (a 16 MB
embedding) would make the downlink, not the server, the thing measured. The server runs torch on one thread
(`-c threads=1`): the simulated devices take the other core, and two threads on a shared 2-core machine
make each upload's SED scores ten times slower (thread hand-offs), not faster.

Over the device counts it fits straight lines (least squares) to the server's peak memory and to the
exchange time, and draws both against the devices to a PNG (--plot). An upload is lost when a simulated
device sent it and the round's record in metrics.jsonl does not count it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedafd.benchmarks.sim_clients import _process_main
from fedafd.runtime.cli_support import raise_open_files_limit

DEVICES_PER_PROCESS = 500
"""At most this many simulated devices share one process (each holds a socket and its descriptors)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_load(clients: int, rounds: int, public_size: int, feature_dim: int, kinds: list[str],
             processes: int, timeout_s: float, overrides: list[str] = ()) -> dict:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--bind", endpoint, "--out", tmp, "--insecure",
             "-c", f"rounds={rounds}", "-c", f"expected_clients={clients}", "-c", f"min_clients={clients}",
             "-c", f"public_size={public_size}", "-c", f"feature_dim={feature_dim}", "-c", "image_arch=cnn_small",
             "-c", "text_arch=gru", "-c", "join_timeout_s=600", "-c", f"round_deadline_s={timeout_s}",
             "-c", "heartbeat_timeout_s=600", "-c", "device=cpu", "-c", "threads=1",
             *(item for setting in overrides for item in ("-c", setting))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        devices = [(f"{kinds[i % len(kinds)]}-{i}", kinds[i % len(kinds)]) for i in range(clients)]
        processes = max(processes, math.ceil(clients / DEVICES_PER_PROCESS))
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        workers = [ctx.Process(target=_process_main, args=(endpoint, devices[k::processes], timeout_s, k * 100_000, queue))
                   for k in range(processes)]
        started = time.perf_counter()
        for w in workers:
            w.start()
        peak = 0.0
        deadline = time.monotonic() + timeout_s + 60
        while server.poll() is None and time.monotonic() < deadline:
            peak = max(peak, _peak_rss_mb(server.pid) or 0.0)
            time.sleep(0.1)
        wall = time.perf_counter() - started
        if server.poll() is None:
            server.kill()
        server.wait()
        sims = [queue.get(timeout=60) for _ in workers]
        for w in workers:
            w.join(timeout=30)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()] \
            if (Path(tmp) / "metrics.jsonl").exists() else []
    per_round = []
    for r in records:
        t = r["timings"]
        exchange = t["downlink"] + t["collect"]
        per_round.append({"round": r["round"], "uploads": len(r["clients"]), "dropped": len(r["dropped"]),
                          "round_s": sum(t.values()), "exchange_s": exchange, "timings": t,
                          "msgs_per_s": 3 * len(r["clients"]) / exchange if exchange > 0 else 0.0})
    sent = sum(s["uploads"] for s in sims)
    recorded = sum(p["uploads"] for p in per_round)
    ok = len(records) == rounds and all(p["uploads"] == clients for p in per_round) and sent == recorded
    return {
        "clients": clients, "ok": ok, "server_returncode": server.returncode, "wall_s": wall,
        "server_peak_rss_mb": peak,
        "round_s": sum(p["round_s"] for p in per_round) / max(len(per_round), 1),
        "exchange_s": sum(p["exchange_s"] for p in per_round) / max(len(per_round), 1),
        "msgs_per_s": sum(p["msgs_per_s"] for p in per_round) / max(len(per_round), 1),
        "upload_bytes": public_size * feature_dim * 4,
        "uploads_sent": sent, "uploads_recorded": recorded, "uploads_lost": sent - recorded,
        "rounds": per_round,
        "sims": {"uploads": sum(s["uploads"] for s in sims), "acks": sum(s["acks"] for s in sims),
                 "byes": sum(s["byes"] for s in sims), "errors": sum(s["num_errors"] for s in sims),
                 "error_examples": [e for s in sims for e in s["errors"]][:5]},
    }


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = slope * x + intercept, and R^2 (1: the points lie on the line)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - residual / total if total else 1.0}


def fits(results: list[dict]) -> dict:
    """Peak memory (MB per device) and exchange time (ms per device) against the device count."""
    devices = [r["clients"] for r in results]
    rss = fit_line(devices, [r["server_peak_rss_mb"] for r in results])
    exchange = fit_line(devices, [r["exchange_s"] * 1000 for r in results])
    return {"rss_mb_per_device": rss["slope"], "rss_intercept_mb": rss["intercept"], "rss_r2": rss["r2"],
            "exchange_ms_per_device": exchange["slope"], "exchange_intercept_ms": exchange["intercept"],
            "exchange_r2": exchange["r2"]}


def plot(results: list[dict], fit: dict, path: Path) -> Path:
    """Exchange time and server peak memory against the devices, each with its fitted line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    devices = np.array([r["clients"] for r in results], float)
    line = np.linspace(0, devices.max(), 50)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(devices, [r["exchange_s"] for r in results], "o", label="measured")
    left.plot(line, (fit["exchange_ms_per_device"] * line + fit["exchange_intercept_ms"]) / 1000, "--",
              label=f"fit: {fit['exchange_ms_per_device']:.2f} ms/device")
    left.set(xlabel="devices", ylabel="exchange s (RoundStarts + uploads)", title="time per round's exchange")
    right.plot(devices, [r["server_peak_rss_mb"] for r in results], "o", label="measured")
    right.plot(line, fit["rss_mb_per_device"] * line + fit["rss_intercept_mb"], "--",
               label=f"fit: {fit['rss_mb_per_device']:.3f} MB/device")
    right.set(xlabel="devices", ylabel="server peak RSS MB", title="server memory")
    for axis in (left, right):
        axis.set_ylim(bottom=0)  # from zero: a flat memory curve looks flat
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="100,250,500,1000", help="comma-separated device counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--public-size", type=int, default=256, help="|P| rows per upload")
    parser.add_argument("--feature-dim", type=int, default=256, help="d (the paper's width)")
    parser.add_argument("--kinds", default="image", help="device kinds to cycle through, e.g. image,text,multimodal")
    parser.add_argument("--processes", type=int, default=2, help="processes the devices are spread over "
                        f"(at least one per {DEVICES_PER_PROCESS})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per federation before giving up")
    parser.add_argument("-c", "--set", dest="overrides", action="append", default=[],
                        help="KEY=VALUE for the server's config, after the benchmark's own (e.g. -c threads=0)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of time and memory against devices")
    args = parser.parse_args()
    raise_open_files_limit()  # the server and the simulating processes inherit it

    results = []
    print(f"{'clients':>7} | {'round s':>8} | {'exchange s':>10} | {'msgs/s':>8} | {'peak RSS MB':>11} | "
          f"{'uploads recorded':>16} | ok")
    for n in (int(x) for x in args.clients.split(",")):
        r = run_load(n, args.rounds, args.public_size, args.feature_dim, args.kinds.split(","), args.processes, args.timeout,
                     args.overrides)
        results.append(r)
        print(f"{n:>7} | {r['round_s']:>8.2f} | {r['exchange_s']:>10.2f} | {r['msgs_per_s']:>8.0f} | "
              f"{r['server_peak_rss_mb']:>11.0f} | {r['uploads_recorded']:>7}/{r['uploads_sent']:<8} | {r['ok']}",
              flush=True)
    fit = fits(results) if len(results) >= 2 else {}
    if fit:
        print(f"fit: {fit['rss_mb_per_device']:.3f} MB peak RSS per device (R^2 {fit['rss_r2']:.3f}), "
              f"{fit['exchange_ms_per_device']:.2f} ms exchange per device (R^2 {fit['exchange_r2']:.3f})")
        if args.plot:
            print(f"plot: {plot(results, fit, args.plot)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "fit": fit,
                                        "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
