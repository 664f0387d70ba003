"""The real thing: `fedafd-cloud serve` and three `fedafd-edge join` processes on loopback ZeroMQ,
two rounds on tiny slices, plus a hostile peer sending garbage mid-run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from fedafd.cloud_server.reporting.report import read_metrics
from fedafd.runtime.wire import MAGIC, PROTOCOL_VERSION, decode

PUBLIC_SIZE = 96
FEATURE_DIM = 32
ROUNDS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def send_garbage_and_get_errors(endpoint: str) -> list:
    """A peer that never joined sends malformed frames; the server must answer each with an Error."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"intruder")
    sock.connect(endpoint)
    bad_messages = [
        [b"NOPE\x01", b"x"],  # wrong magic
        [MAGIC + bytes([PROTOCOL_VERSION]), b"\xc1\xc1 not msgpack"],  # header is not msgpack
        [MAGIC + bytes([PROTOCOL_VERSION]), msgpack.packb({"type": "teleport", "msg_id": "0" * 16, "fields": {}, "tensors": []})],
    ]
    replies = []
    for frames in bad_messages:
        sock.send_multipart(frames)
        if sock.poll(20_000):
            replies.append(decode(sock.recv_multipart()).msg)
    sock.close()
    context.term()
    return replies


@pytest.mark.slow
def test_federation_over_zeromq(tmp_path: Path) -> None:
    # Prepare: a server and one client of each kind, as separate processes.
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--bind", endpoint, "--out", str(run_dir), "--insecure",
         "-c", f"rounds={ROUNDS}", "-c", "expected_clients=3", "-c", "min_clients=3", "-c", f"public_size={PUBLIC_SIZE}",
         "-c", f"feature_dim={FEATURE_DIM}", "-c", "image_arch=cnn_small", "-c", "text_arch=gru",
         "-c", "join_timeout_s=120", "-c", "round_deadline_s=300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = {
        kind: subprocess.Popen(
            [sys.executable, "-m", "fedafd.edge_client.cli", "join", "--server", endpoint, "--kind", kind, "--insecure",
             "--partition", "0", "--num-partitions", "1", "--state-dir", str(tmp_path / kind),
             "-c", "max_private=160", "-c", "max_test=64", "-c", "heartbeat_s=0.5"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for kind in ("image", "text", "multimodal")
    }

    # Execute: garbage from an intruder while the federation runs.
    time.sleep(3)
    errors = send_garbage_and_get_errors(endpoint)
    server_out, _ = server.communicate(timeout=600)
    client_out = {kind: p.communicate(timeout=60)[0] for kind, p in clients.items()}

    # Assert: everyone finished, every round recorded once, with metrics from each kind.
    assert server.returncode == 0, server_out
    for kind, process in clients.items():
        assert process.returncode == 0, f"{kind}: {client_out[kind]}"
    assert [type(e).__name__ for e in errors] == ["Error", "Error", "Error"]
    assert [e.code for e in errors] == ["bad_magic", "bad_header", "unknown_type"]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for record in records:
        assert set(record["clients"]) == {"image-0", "text-0", "multimodal-0"}
        assert 0 <= record["clients"]["image-0"]["metrics"]["top1"] <= 100
        assert 0 <= record["clients"]["text-0"]["metrics"]["top1"] <= 100
        assert "i2t_r1" in record["clients"]["multimodal-0"]["metrics"]
        assert {"r1_sum", "rsum"} <= set(record["server"])
        # Uplink: exactly the public features (|P| x d float32 per modality) plus a small header.
        feature_bytes = PUBLIC_SIZE * FEATURE_DIM * 4
        for client_id, modalities in (("image-0", 1), ("text-0", 1), ("multimodal-0", 2)):
            upload = record["bytes"][client_id]["up"]["feature_upload"]
            assert modalities * feature_bytes < upload < modalities * feature_bytes + 2048, (client_id, upload)
    assert json.loads((run_dir / "config.json").read_text())["rounds"] == ROUNDS
    assert (run_dir / "checkpoint" / "server.safetensors").exists()
    rejected = [r for record in records for r in record["rejected"]]
    assert [(r["peer"], r["code"]) for r in rejected] == [
        ("intruder", "bad_magic"), ("intruder", "bad_header"), ("intruder", "unknown_type")]
