"""Faults with real processes on loopback: a device killed mid-round (kill -9) and the server killed
mid-run (SIGKILL) then resumed. Tiny slices, as in test_end_to_end."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedafd.cloud_server.reporting.report import read_metrics

SMALL_SERVER = ["-c", "public_size=96", "-c", "feature_dim=32", "-c", "image_arch=cnn_small", "-c", "text_arch=gru",
                "-c", "join_timeout_s=120", "-c", "round_deadline_s=240"]
SMALL_CLIENT = ["-c", "max_test=64", "-c", "heartbeat_s=0.5", "-c", "connect_timeout_s=120"]
KINDS = ("image", "text", "multimodal")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(endpoint: str, run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--bind", endpoint,
                             "--out", str(run_dir), "--insecure", *SMALL_SERVER, *extra],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def start_client(endpoint: str, kind: str, state_dir: Path, log: Path, max_private: int = 160) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedafd.edge_client.cli", "join", "--server", endpoint, "--kind", kind,
                             "--partition", "0", "--num-partitions", "1", "--state-dir", str(state_dir), "--insecure",
                             "-c", f"max_private={max_private}", *SMALL_CLIENT],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def rounds_done(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["round"] for r in read_metrics(path)] if path.exists() else []


def stop_all(processes) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_device_killed_mid_round_is_dropped_and_rejoins(tmp_path: Path) -> None:
    # Prepare: three devices; image-0 has more data so it is still training when we kill it.
    endpoint, run_dir = f"tcp://127.0.0.1:{free_port()}", tmp_path / "run"
    server = start_server(endpoint, run_dir, tmp_path / "server.log", "-c", "rounds=4", "-c", "expected_clients=3",
                          "-c", "min_clients=2", "-c", "heartbeat_timeout_s=10", "-c", "quorum=0.5")
    logs = {kind: tmp_path / f"{kind}.log" for kind in KINDS}
    clients = {kind: start_client(endpoint, kind, tmp_path / kind, logs[kind], 2000 if kind == "image" else 160)
               for kind in KINDS}
    restarted = None
    try:
        # Execute: kill -9 the image device while it trains round 0, restart it once round 0 is recorded.
        wait_for(lambda: "image-0 round 0: training" in logs["image"].read_text(), 240, "image-0 to start round 0")
        time.sleep(0.5)
        clients["image"].send_signal(signal.SIGKILL)
        clients["image"].wait()
        wait_for(lambda: 0 in rounds_done(run_dir), 120, "round 0 to finish without image-0")
        restarted = start_client(endpoint, "image", tmp_path / "image", logs["image"])
        server.wait(timeout=300)
        restarted.wait(timeout=60)
        for kind in ("text", "multimodal"):
            clients[kind].wait(timeout=60)
    finally:
        stop_all([server, *clients.values(), *([restarted] if restarted else [])])

    # Assert: round 0 went on with the quorum and recorded the dead device; it came back later.
    assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert restarted.returncode == 0, logs["image"].read_text()[-3000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    first = records[0]
    assert set(first["clients"]) == {"text-0", "multimodal-0"}
    assert "silent" in first["dropped"]["image-0"] and "heartbeat_timeout_s" in first["dropped"]["image-0"]
    assert first["quorum_met"] is True and first["server"]["distill_loss"] > 0
    assert "image-0" in records[-1]["clients"], [sorted(r["clients"]) for r in records]
    assert records[-1]["dropped"] == {}


@pytest.mark.slow
def test_server_killed_mid_run_resumes_with_every_round_once(tmp_path: Path) -> None:
    # Prepare: a server for 3 rounds and three devices.
    endpoint, run_dir = f"tcp://127.0.0.1:{free_port()}", tmp_path / "run"
    args = ("-c", "rounds=3", "-c", "expected_clients=3", "-c", "min_clients=3", "-c", "heartbeat_timeout_s=30")
    server = start_server(endpoint, run_dir, tmp_path / "server.log", *args)
    logs = {kind: tmp_path / f"{kind}.log" for kind in KINDS}
    clients = {kind: start_client(endpoint, kind, tmp_path / kind, logs[kind]) for kind in KINDS}
    resumed = None
    try:
        # Execute: SIGKILL the server once round 0 is recorded (it is then in round 1), resume it.
        # (its checkpoint lands after the metrics line, so wait for it too: a loaded machine takes a while to fsync)
        wait_for(lambda: rounds_done(run_dir) == [0] and (run_dir / "checkpoint" / "server.json").exists(), 300,
                 "round 0 and its checkpoint")
        time.sleep(1.0)
        server.send_signal(signal.SIGKILL)
        server.wait()
        killed_after = rounds_done(run_dir)
        resumed = start_server(endpoint, run_dir, tmp_path / "resumed.log", "--resume", *args)
        resumed.wait(timeout=300)
        for p in clients.values():
            p.wait(timeout=60)
    finally:
        stop_all([server, *clients.values(), *([resumed] if resumed else [])])

    # Assert: every round exactly once, all devices back after the restart, a consistent checkpoint.
    assert resumed.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    for kind, p in clients.items():
        assert p.returncode == 0, logs[kind].read_text()[-3000:]
    assert killed_after in ([0], [0, 1])
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    assert set(records[-1]["clients"]) == {"image-0", "text-0", "multimodal-0"}
    meta = json.loads((run_dir / "checkpoint" / "server.json").read_text())
    assert meta["round"] == 2
    assert any("joining again" in logs[kind].read_text() for kind in KINDS)
