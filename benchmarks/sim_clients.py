"""Lightweight simulated devices for load and fuzz runs: they speak the real protocol (Join, Welcome,
RoundStart, FeatureUpload, Ack, Bye) over real ZeroMQ sockets, but never train. Each answers a RoundStart
with features of the right shape: the round's global features plus noise, row-normalised, so what the
server receives looks like a device's upload (|P| x d float32 per modality).

Many devices share one process and one thread: one DEALER socket each, polled together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from fedafd.runtime.backbones import BACKBONES, backbone_digest
from fedafd.runtime.data.modal import public_source
from fedafd.runtime.vocabulary import MODALITIES_OF_KIND
from fedafd.runtime.wire import Bye, Error, FeatureUpload, Join, RoundStart, Welcome, WireError, decode, encode


@dataclass
class SimStats:
    joined: int = 0
    uploads: int = 0
    acks: int = 0
    errors: list[str] = field(default_factory=list)
    byes: int = 0
    rounds: dict[str, list[int]] = field(default_factory=dict)


_BACKBONES = {name: backbone_digest(name) for name in BACKBONES}
"""What a real device holds: the same backbone files as the server (hashing them is all it costs)."""


class SimDevice:
    """One simulated device on its own DEALER socket (routing id = client id)."""

    def __init__(self, context: zmq.Context, endpoint: str, client_id: str, kind: str, seed: int = 0,
                 curve: tuple[bytes, bytes, bytes] | None = None):
        self.client_id = client_id
        self.kind = kind
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, client_id.encode())
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve
        self.sock.connect(endpoint)
        self.rng = np.random.default_rng(seed)
        self.done = False
        self.feature_dim = 0

    def join(self) -> None:
        self.sock.send_multipart(encode(Join(client_id=self.client_id, kind=self.kind,
                                             image_arch="cnn_small" if self.kind != "text" else "",
                                             text_arch="gru" if self.kind != "image" else "",
                                             num_private=100, backbones=_BACKBONES,
                                             public_digest=public_source().digest)))

    def handle(self, frames: list, stats: SimStats) -> None:
        try:
            msg = decode(frames).msg
        except WireError as e:
            stats.errors.append(f"{self.client_id}: malformed from server: {e}")
            return
        if isinstance(msg, Welcome):
            stats.joined += 1
            self.feature_dim = msg.feature_dim
        elif isinstance(msg, RoundStart):
            self.sock.send_multipart(encode(self.upload(msg)), copy=False)
            stats.uploads += 1
            stats.rounds.setdefault(self.client_id, []).append(msg.round)
        elif isinstance(msg, Error):
            stats.errors.append(f"{self.client_id}: {msg.code}: {msg.reason}")
        elif isinstance(msg, Bye):
            stats.byes += 1
            self.done = True
        else:  # Ack
            stats.acks += 1

    def upload(self, start: RoundStart) -> FeatureUpload:
        features = {}
        for modality in MODALITIES_OF_KIND[self.kind]:
            # G of a modality whose tower came instead is computed on a real device; a random stand-in here.
            g = (np.asarray(start.global_features[modality], dtype=np.float32) if modality in start.global_features else
                 self.rng.standard_normal((len(start.public_indices), self.feature_dim), dtype=np.float32))  # (P, d)
            f = g + 0.1 * self.rng.standard_normal(g.shape, dtype=np.float32)
            features[modality] = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-6)
        return FeatureUpload(round=start.round, client_id=self.client_id, features=features,
                             metrics={"top1": float(self.rng.uniform(10, 90))},
                             losses={"task": float(self.rng.uniform(0.1, 2.0))}, train_seconds=0.0)

    def close(self) -> None:
        self.sock.close(linger=0)


def run_devices(endpoint: str, devices: list[tuple[str, str]], timeout_s: float, seed: int = 0,
                curve_keys: dict[str, tuple[bytes, bytes, bytes]] | None = None) -> SimStats:
    """Runs (client id, kind) devices until each got Bye or `timeout_s` passed; returns what they saw."""
    context = zmq.Context()
    # libzmq's default cap is 1023 sockets per context; one process may simulate more devices than that.
    context.set(zmq.MAX_SOCKETS, len(devices) + 16)
    stats = SimStats()
    sims = [SimDevice(context, endpoint, cid, kind, seed + i, (curve_keys or {}).get(cid))
            for i, (cid, kind) in enumerate(devices)]
    try:
        poller = zmq.Poller()
        by_socket = {}
        for sim in sims:
            poller.register(sim.sock, zmq.POLLIN)
            by_socket[sim.sock] = sim
            sim.join()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(s.done for s in sims):
            for sock, _ in poller.poll(200):
                by_socket[sock].handle(sock.recv_multipart(copy=False), stats)
    finally:
        for sim in sims:
            sim.close()
        context.term()
    return stats


def _process_main(endpoint: str, devices: list[tuple[str, str]], timeout_s: float, seed: int, out) -> None:
    stats = run_devices(endpoint, devices, timeout_s, seed)
    out.put({"joined": stats.joined, "uploads": stats.uploads, "acks": stats.acks, "byes": stats.byes,
             "errors": stats.errors[:20], "num_errors": len(stats.errors)})
