"""Chaos soak: a real local federation (one `fedafd-cloud serve`, one `fedafd-edge join` per device, on
loopback) in which devices and the server are SIGKILLed at random moments and restarted.

    python -m fedafd.benchmarks.chaos --out benchmarks/results/chaos.json   # 10 devices, 20 rounds, + a clean run
    python -m fedafd.benchmarks.chaos --short                               # 4 devices, 5 rounds (the CI test)

Every round, `--kill-fraction` of the devices are killed at random moments of the round and started again
after a moment (they rejoin and resume from their saved state); the server is killed in `--server-kills`
distinct rounds and started again with `serve --resume`. Then the run is checked:

- exactly once: metrics.jsonl holds every round 0..R-1 once, in order;
- no accepted upload lost. An upload is *accepted* when the server acknowledged it: it logs "accepted
  upload ID from X" just before sending the Ack. A server process *commits* a round when its checkpoint
  reaches it (after the round's record). Every upload accepted by the process that committed the round is
  in the round's record, and the record holds nothing else; an upload accepted by a process killed before
  it committed the round is void (the resumed server runs the round again and the device uploads again,
  counted as `voided`); and every Ack a device logged names an upload that some server process accepted.

Without --no-clean the same federation (same config and seed) also runs once without kills, and the final
round's metrics of both are compared (devices restarted mid-round draw fresh random numbers and dropped
devices change the teacher, so the two need not agree to the digit).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from fedafd.cloud_server.checkpoint import CHECKPOINT_FILE
from fedafd.cloud_server.fleet import LocalFleet, client_ids, parse_fleet
from fedafd.runtime.config import ServerConfig, load_config
from fedafd.cloud_server.reporting.report import METRICS_FILE, read_metrics, summarize_round
from fedafd.runtime.checkpoint import read_meta

SERVER_SETTING = {"public_size": "64", "feature_dim": "32", "local_epochs": "1", "server_epochs": "1",
                  "max_private": "96", "max_test": "64", "threads": "1", "join_timeout_s": "120",
                  "round_deadline_s": "120", "heartbeat_timeout_s": "20", "quorum": "0.5"}
"""A few seconds a round on 2 cores: a small public set and private shares, and (the defaults) towers that
are adapters over the cached features of frozen backbones; the devices take turns through the fleet's
architectures, as `serve --local` gives them."""
CLIENT_SETTING = ["heartbeat_s=0.5", "connect_timeout_s=120", "threads=1"]
FULL = {"fleet": "image=3,text=3,multimodal=4", "rounds": 20, "server_kills": 2}
SHORT = {"fleet": "image=1,text=1,multimodal=2", "rounds": 5, "server_kills": 1}

ACCEPTED = re.compile(r"round (\d+): accepted upload (\S+) from (\S+)")
ACKED = re.compile(r"(\S+) round (\d+): upload (\S+) acknowledged")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Federation:
    """The server and device processes of one run folder; each server process logs to server.K.log."""

    run_dir: Path
    fleet: dict[str, int]
    settings: dict[str, str]
    endpoint: str = field(default_factory=lambda: f"tcp://127.0.0.1:{_free_port()}")
    server: subprocess.Popen | None = None
    servers_started: int = 0
    devices: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = load_config(ServerConfig, None, [f"{k}={v}" for k, v in self.settings.items()])
        self.local = LocalFleet(self.fleet, self.endpoint, self.run_dir, config, client_overrides=CLIENT_SETTING)

    def start_server(self, resume: bool = False) -> None:
        command = [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--bind", self.endpoint,
                   "--out", str(self.run_dir), "--insecure", "-v", *(["--resume"] if resume else [])]
        for key, value in self.settings.items():
            command += ["-c", f"{key}={value}"]
        with open(self.server_log(self.servers_started), "wb") as log:
            self.server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.servers_started += 1

    def server_log(self, k: int) -> Path:
        return self.run_dir / f"server.{k}.log"

    def start_device(self, client_id: str) -> None:
        kind, index = client_id.rsplit("-", 1)
        state_dir = self.local.state_dir(client_id)
        state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.device_log(client_id), "ab") as log:
            self.devices[client_id] = subprocess.Popen(self.local.command(kind, int(index)), stdout=log,
                                                       stderr=subprocess.STDOUT)

    def device_log(self, client_id: str) -> Path:
        return self.local.state_dir(client_id) / "log.txt"

    def records(self) -> list[dict]:
        path = self.run_dir / METRICS_FILE
        try:
            return read_metrics(path) if path.exists() else []
        except ValueError:  # a line being written right now
            return []

    def committed_round(self) -> int:
        """The last round the checkpoint holds (-1: none); what a resumed server continues after."""
        path = self.run_dir / CHECKPOINT_FILE
        return read_meta(path)["round"] if path.exists() else -1

    def stop(self) -> None:
        for process in [self.server, *self.devices.values()]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _kill(process: subprocess.Popen) -> bool:
    """SIGKILL; False when it had already exited."""
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def _device_round_s(records: list[dict], default: float) -> float:
    """How long a round lasts for a device (1.5 x the median RoundStart-to-upload time of the last round):
    kills are drawn uniformly within it, so they fall in training, upload, Ack and the wait after."""
    trips = [link["round_trip"] for link in records[-1]["link"].values()] if records else []
    return 1.5 * median(trips) if trips else default


def _server_kill_rounds(rng: random.Random, rounds: int, kills: int) -> set[int]:
    """`kills` rounds in 1..R-2, at least 3 apart: a kill drawn late for its round lands in the next one,
    and must not hit the server resumed from the kill before while it is still starting."""
    if kills == 0:
        return set()
    for _ in range(1000):
        chosen = sorted(rng.sample(range(1, rounds - 1), kills))
        if all(b - a >= 3 for a, b in zip(chosen, chosen[1:])):
            return set(chosen)
    raise ValueError(f"{kills} server kills 3 rounds apart do not fit in {rounds} rounds; run more rounds")


def run_federation(run_dir: Path, fleet: dict[str, int], rounds: int, seed: int, kill_fraction: float,
                   server_kills: int, timeout_s: float, first_round_s: float = 3.0) -> dict:
    """One federation to the end; with kills when kill_fraction or server_kills. Returns what happened."""
    shutil.rmtree(run_dir, ignore_errors=True)  # the checks read every log in the folder
    fed = Federation(run_dir, fleet, {**SERVER_SETTING, "rounds": str(rounds), "seed": str(seed),
                                      "expected_clients": str(sum(fleet.values()))})
    rng = random.Random(seed)
    ids = client_ids(fleet)
    victims_per_round = round(kill_fraction * len(ids))
    server_kill_rounds = _server_kill_rounds(rng, rounds, server_kills)
    committed_by: list[int] = []  # per server process: the last round its checkpoint reached
    events: list[dict] = []
    pending: list[tuple[float, str, str]] = []  # (when, action, client id or "server")
    durations: list[float] = []
    started = time.monotonic()
    fed.start_server()
    for cid in ids:
        fed.start_device(cid)
    seen, round_started, planned = -1, 0.0, set()
    try:
        while True:
            now = time.monotonic()
            if now - started > timeout_s:
                raise RuntimeError(f"chaos run did not finish within {timeout_s:.0f}s; see {run_dir}")
            done = len(fed.records())
            if done > seen >= 0 and round_started:
                durations.append(now - round_started)
            # Round `done` runs now; round 0 once a device trains it (before that the devices are joining).
            started_now = (done > seen if seen >= 0 else
                           any("round 0: training" in fed.device_log(c).read_text(errors="replace") for c in ids))
            if started_now:
                seen, round_started = done, now
                if done < rounds and done not in planned:
                    planned.add(done)
                    est = _device_round_s(fed.records(), first_round_s)
                    # Not one still waiting for its kill or restart: a device runs as one process at a time.
                    free = [c for c in ids if not any(p[2] == c for p in pending)]
                    for cid in rng.sample(free, min(victims_per_round, len(free))):
                        at = now + rng.uniform(0.0, est)
                        pending += [(at, "kill", cid), (at + rng.uniform(0.2, 1.0), "start", cid)]
                    if done in server_kill_rounds:
                        at = now + rng.uniform(0.2, 0.8) * est
                        pending += [(at, "kill", "server"), (at + 0.5, "start", "server")]
            elif done < seen:  # a resumed server dropped the record of a round its checkpoint missed
                seen = done
            for item in sorted(p for p in pending if p[0] <= now):
                pending.remove(item)
                _, action, who = item
                if who == "server" and action == "kill":
                    if _kill(fed.server):
                        committed_by.append(fed.committed_round())
                        events.append({"t": now - started, "kill": "server", "round": len(fed.records()),
                                       "committed": committed_by[-1]})
                    else:  # it had finished: nothing to resume
                        pending = [p for p in pending if p[2] != "server"]
                elif who == "server":
                    fed.start_server(resume=True)
                elif action == "kill":
                    if _kill(fed.devices[who]):
                        events.append({"t": now - started, "kill": who, "round": len(fed.records())})
                elif fed.devices[who].poll() is not None:  # (the loop ends when the federation does)
                    fed.start_device(who)
            if fed.server.poll() is not None and not any(p[2] == "server" for p in pending):
                if fed.server.returncode != 0:
                    raise RuntimeError(f"server exited with {fed.server.returncode}; see "
                                       f"{fed.server_log(fed.servers_started - 1)}")
                break
            time.sleep(0.05)
        committed_by.append(rounds - 1)
        wall = time.monotonic() - started
        # They leave after the server's Bye; one restarted during the last round may still be loading.
        deadline = time.monotonic() + 10
        for process in fed.devices.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        fed.stop()
    return {"wall_s": wall, "events": events, "committed_by": committed_by,
            "round_s": median(durations) if durations else None, **check(fed, rounds, committed_by)}


def check(fed: Federation, rounds: int, committed_by: list[int]) -> dict:
    """The exactly-once and no-lost-upload properties (see the module docstring), from the run's files."""
    records = fed.records()
    accepted = []  # (server process, round, client id, upload id)
    for k in range(fed.servers_started):
        for line in fed.server_log(k).read_text(errors="replace").splitlines():
            if m := ACCEPTED.search(line):
                accepted.append((k, int(m[1]), m[3], m[2]))
    acks = []  # (client id, round, upload id)
    for cid in fed.devices:
        for line in fed.device_log(cid).read_text(errors="replace").splitlines():
            if m := ACKED.search(line):
                acks.append((m[1], int(m[2]), m[3]))
    by_round = {r["round"]: r for r in records}
    lost, extra, voided = [], [], []
    for r, record in by_round.items():
        # The process that committed round r: the first whose checkpoint reached it.
        k = next((k for k, c in enumerate(committed_by) if c >= r), None)
        kept = {cid for kk, rr, cid, _ in accepted if kk == k and rr == r}
        lost += [f"round {r}: {cid}" for cid in sorted(kept - set(record["clients"]))]
        extra += [f"round {r}: {cid}" for cid in sorted(set(record["clients"]) - kept)]
    for k, r, cid, upload in accepted:
        first_committer = next((kk for kk, c in enumerate(committed_by) if c >= r), None)
        if first_committer != k:
            voided.append(f"round {r}: {cid} ({upload}, server process {k})")
    accepted_ids = {upload for *_, upload in accepted}
    unmatched = [f"{cid} round {r}: {upload}" for cid, r, upload in acks if upload not in accepted_ids]
    round_list = [r["round"] for r in records]
    server_text = "".join(fed.server_log(k).read_text(errors="replace") for k in range(fed.servers_started))
    device_text = "".join(fed.device_log(cid).read_text(errors="replace") for cid in fed.devices)
    return {
        "exactly_once": round_list == list(range(rounds)),
        "rounds_recorded": round_list,
        "no_upload_lost": not lost and not extra and not unmatched,
        "accepted": len(accepted), "acks_logged": len(acks), "voided": voided,
        "lost": lost, "extra_in_record": extra, "acks_unmatched": unmatched,
        "uploads_recorded": sum(len(r["clients"]) for r in records),
        "dropped": sum(len(r["dropped"]) for r in records),
        "rounds_with_drops": sum(1 for r in records if r["dropped"]),
        "duplicates": sum(r["duplicates"] for r in records),
        "round_start_resent": server_text.count("resending RoundStart"),
        "upload_resent": device_text.count("RoundStart again; resending upload"),
        "rejoins": server_text.count("rejoined:"),
        "rounds_in_record_per_device": {cid: sum(cid in r["clients"] for r in records) for cid in sorted(fed.devices)},
        "final": summarize_round(records[-1]) if records else {},
        "final_every_device": summarize_round(latest_of_every_device(records)) if records else {},
    }


def latest_of_every_device(records: list[dict]) -> dict:
    """The last record, with each device's metrics from the last round it reported in: a device killed
    in the final round still counts with its previous report, so two runs compare the same devices."""
    clients = {}
    for record in records:
        clients.update(record["clients"])
    return dict(records[-1], clients=clients)


def compare(chaos: dict, clean: dict, tolerance: float = 1.0) -> dict:
    """Final metrics (points; every device's last report) of the chaos run minus the clean run's, and whether
    each is within tolerance."""
    keys = [k for k in chaos if k in clean and k not in ("round", "seconds") and "bytes" not in k]
    diff = {k: chaos[k] - clean[k] for k in keys}
    return {"difference": diff, "within": {k: abs(v) <= tolerance for k, v in diff.items()}, "tolerance": tolerance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help=f"the CI variant: {SHORT}")
    parser.add_argument("--fleet", default=None, help=f"devices, e.g. {FULL['fleet']}")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--server-kills", type=int, default=None, help="rounds in which the server is killed")
    parser.add_argument("--kill-fraction", type=float, default=0.3, help="share of the devices killed every round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-clean", action="store_true", help="skip the clean run without kills")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per federation before giving up")
    parser.add_argument("--work", type=Path, default=Path("runs/chaos"), help="run folders (chaos/, clean/)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    preset = SHORT if args.short else FULL
    fleet = parse_fleet(args.fleet or preset["fleet"])
    rounds = args.rounds or preset["rounds"]
    server_kills = preset["server_kills"] if args.server_kills is None else args.server_kills

    chaos = run_federation(args.work / "chaos", fleet, rounds, args.seed, args.kill_fraction, server_kills, args.timeout)
    kills = [e for e in chaos["events"] if e["kill"] != "server"]
    print(f"chaos: {rounds} rounds in {chaos['wall_s']:.0f}s, {len(kills)} device kills, "
          f"{len(chaos['events']) - len(kills)} server kills; exactly once: {chaos['exactly_once']}; "
          f"accepted {chaos['accepted']}, recorded {chaos['uploads_recorded']}, voided {len(chaos['voided'])}, "
          f"lost {len(chaos['lost'])}; no upload lost: {chaos['no_upload_lost']}", flush=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "fleet": fleet, "rounds": rounds,
              "settings": SERVER_SETTING, "client_settings": CLIENT_SETTING, "chaos": chaos}
    if not args.no_clean:
        clean = run_federation(args.work / "clean", fleet, rounds, args.seed, 0.0, 0, args.timeout)
        result["clean"] = clean
        result["comparison"] = compare(chaos["final_every_device"], clean["final_every_device"])
        print(f"clean: {rounds} rounds in {clean['wall_s']:.0f}s; final chaos - clean: "
              + ", ".join(f"{k} {v:+.2f}" for k, v in result["comparison"]["difference"].items()), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not (chaos["exactly_once"] and chaos["no_upload_lost"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
