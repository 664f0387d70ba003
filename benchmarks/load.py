"""Load: one real `fedafd-cloud serve` against many simulated devices on loopback.

    python -m fedafd.benchmarks.load --clients 50,100,200,500 --out benchmarks/results/load.json

Each simulated device (benchmarks/sim_clients.py) speaks the real protocol over its own ZeroMQ socket
and answers every RoundStart at once with a realistic FeatureUpload (|P| x d float32 per modality), so
the numbers are the server's: per round, the wall time of each stage, the messages it handled per
second while sending RoundStarts and collecting uploads (RoundStart + FeatureUpload + Ack per device),
and its peak resident memory (VmHWM). Devices are image devices by default: the text tower (a 16 MB
embedding) would make the downlink, not the server, the thing measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedafd.benchmarks.sim_clients import _process_main


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
             processes: int, timeout_s: float) -> dict:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--bind", endpoint, "--out", tmp, "--insecure",
             "-c", f"rounds={rounds}", "-c", f"expected_clients={clients}", "-c", f"min_clients={clients}",
             "-c", f"public_size={public_size}", "-c", f"feature_dim={feature_dim}", "-c", "image_arch=cnn_small",
             "-c", "text_arch=gru", "-c", "join_timeout_s=600", "-c", f"round_deadline_s={timeout_s}",
             "-c", "heartbeat_timeout_s=600", "-c", "device=cpu"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        devices = [(f"{kinds[i % len(kinds)]}-{i}", kinds[i % len(kinds)]) for i in range(clients)]
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
            time.sleep(0.2)
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
    ok = len(records) == rounds and all(p["uploads"] == clients for p in per_round)
    return {
        "clients": clients, "ok": ok, "server_returncode": server.returncode, "wall_s": wall,
        "server_peak_rss_mb": peak,
        "round_s": sum(p["round_s"] for p in per_round) / max(len(per_round), 1),
        "exchange_s": sum(p["exchange_s"] for p in per_round) / max(len(per_round), 1),
        "msgs_per_s": sum(p["msgs_per_s"] for p in per_round) / max(len(per_round), 1),
        "upload_bytes": public_size * feature_dim * 4,
        "rounds": per_round,
        "sims": {"uploads": sum(s["uploads"] for s in sims), "acks": sum(s["acks"] for s in sims),
                 "byes": sum(s["byes"] for s in sims), "errors": sum(s["num_errors"] for s in sims),
                 "error_examples": [e for s in sims for e in s["errors"]][:5]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="50,100,200,500", help="comma-separated device counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--public-size", type=int, default=256, help="|P| rows per upload")
    parser.add_argument("--feature-dim", type=int, default=256, help="d (the paper's width)")
    parser.add_argument("--kinds", default="image", help="device kinds to cycle through, e.g. image,text,multimodal")
    parser.add_argument("--processes", type=int, default=2, help="processes the devices are spread over")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per federation before giving up")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    results = []
    print(f"{'clients':>7} | {'round s':>8} | {'exchange s':>10} | {'msgs/s':>8} | {'peak RSS MB':>11} | ok")
    for n in (int(x) for x in args.clients.split(",")):
        r = run_load(n, args.rounds, args.public_size, args.feature_dim, args.kinds.split(","), args.processes, args.timeout)
        results.append(r)
        print(f"{n:>7} | {r['round_s']:>8.2f} | {r['exchange_s']:>10.2f} | {r['msgs_per_s']:>8.0f} | "
              f"{r['server_peak_rss_mb']:>11.0f} | {r['ok']}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
