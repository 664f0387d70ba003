"""The server's side of joining: a device counts as joined once its Welcome went out, not before."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from fedafd.cloud_server.app import ServerApp
from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.wire import FeatureUpload, Join, RoundStart, Welcome, decode, encode


def test_a_device_gone_before_its_welcome_does_not_count_as_joined(tmp_path: Path) -> None:
    # Prepare: a device sends Join and closes before the server read it (it joins again on a new connection).
    hub = InprocHub()
    server = ServerApp(build_config(ServerConfig, dict(image_arch="cnn_small", text_arch="gru", public_size=32,
                                                       feature_dim=16)), hub.server(), tmp_path)
    device = hub.client("image-0")
    device.send(encode(Join(client_id="image-0", kind="image", image_arch="cnn_small", text_arch="", num_params=0,
                            num_private=10)))
    device.close()
    try:
        # Execute
        server._handle_outside_round(server.messenger.recv(1.0))
        # Assert: no round would wait for it.
        assert server.clients == {}
    finally:
        server.close()


def _join(device, client_id: str) -> None:
    device.send(encode(Join(client_id=client_id, kind="image", image_arch="cnn_small", text_arch="", num_params=0,
                            num_private=10)))


def test_a_device_dropped_at_the_round_start_that_rejoins_makes_the_round(tmp_path: Path) -> None:
    # Prepare: two joined devices; image-0's connection closes before the round starts (it restarts).
    hub = InprocHub()
    config = build_config(ServerConfig, dict(image_arch="cnn_small", text_arch="gru", public_size=32, feature_dim=16,
                                             round_deadline_s=60, heartbeat_timeout_s=60))
    server = ServerApp(config, hub.server(), tmp_path)
    first, other = hub.client("image-0"), hub.client("image-1")
    for device, cid in ((first, "image-0"), (other, "image-1")):
        _join(device, cid)
        server._handle_outside_round(server.messenger.recv(5.0))
        assert isinstance(decode(device.recv(5.0)).msg, Welcome)
    first.close()
    records = []
    round_thread = threading.Thread(target=lambda: records.append(server._run_round(0)), daemon=True)
    try:
        # Execute: the round starts without image-0 (dropped: not connected); image-0 joins again mid-round,
        # then both upload.
        round_thread.start()
        start = decode(other.recv(60.0)).msg
        assert isinstance(start, RoundStart)
        again = hub.client("image-0")
        _join(again, "image-0")
        got = [decode(again.recv(30.0)).msg for _ in range(2)]
        assert isinstance(got[0], Welcome) and isinstance(got[1], RoundStart) and got[1].round == 0
        rng = np.random.default_rng(0)
        for device, cid in ((again, "image-0"), (other, "image-1")):
            features = rng.standard_normal((len(start.public_indices), 16)).astype(np.float32)
            device.send(encode(FeatureUpload(round=0, client_id=cid, features={"image": features}, metrics={},
                                             losses={}, train_seconds=0.0)))
        round_thread.join(timeout=60)

        # Assert: it made the round, nothing is recorded as dropped, and the server still knows it.
        assert not round_thread.is_alive()
        assert sorted(records[0]["clients"]) == ["image-0", "image-1"] and records[0]["dropped"] == {}
        assert "image-0" in server.clients
    finally:
        server.close()
