"""The server's side of joining: a device counts as joined once its Welcome went out, not before; when the
first round starts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedafd.cloud_server.app import ServerApp, ServerError
from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.wire import FeatureUpload, Join, RoundStart, Welcome, decode, encode
from fedafd.runtime.data.modal import public_source


def test_a_device_gone_before_its_welcome_does_not_count_as_joined(tmp_path: Path) -> None:
    # Prepare: a device sends Join and closes before the server read it (it joins again on a new connection).
    hub = InprocHub()
    server = ServerApp(build_config(ServerConfig, dict(image_arch="cnn_small", text_arch="gru", public_size=32,
                                                       feature_dim=16)), hub.server(), tmp_path)
    device = hub.client("image-0")
    device.send(encode(Join(client_id="image-0", kind="image", image_arch="cnn_small", text_arch="",
                            num_private=10, public_digest=public_source().digest)))
    device.close()
    try:
        # Execute
        server._handle_outside_round(server.messenger.recv(1.0))
        # Assert: no round would wait for it.
        assert server.clients == {}
    finally:
        server.close()


def _server(hub: InprocHub, tmp_path: Path, **settings) -> ServerApp:
    return ServerApp(build_config(ServerConfig, dict(image_arch="cnn_small", text_arch="gru", public_size=32,
                                                     feature_dim=16, **settings)), hub.server(), tmp_path)


def _join(hub: InprocHub, client_id: str):
    device = hub.client(client_id)
    device.send(encode(Join(client_id=client_id, kind="image", image_arch="cnn_small", text_arch="",
                            num_private=10, public_digest=public_source().digest)))
    return device


def test_without_expected_clients_the_start_waits_for_joins_to_settle_not_for_the_join_timeout(tmp_path: Path) -> None:
    # Prepare: no expected count, min_clients 1, a 60 s join timeout; a second device joins 0.3 s after the first.
    hub = InprocHub()
    server = _server(hub, tmp_path, expected_clients=0, min_clients=1, join_timeout_s=60, join_settle_s=1.0)
    devices = [_join(hub, "image-0")]
    late = threading.Timer(0.3, lambda: devices.append(_join(hub, "image-1")))
    started = time.monotonic()
    late.start()
    try:
        # Execute
        server._wait_for_clients()
        waited = time.monotonic() - started
    finally:
        late.join()
        server.close()
        for device in devices:
            device.close()
    # Assert: the settle time let the second device in; the start came join_settle_s after it, not at 60 s.
    assert sorted(server.clients) == ["image-0", "image-1"]
    assert 1.3 <= waited < 5


def test_below_min_clients_the_settle_time_does_not_start_it(tmp_path: Path) -> None:
    hub = InprocHub()
    server = _server(hub, tmp_path, expected_clients=0, min_clients=2, join_timeout_s=1.0, join_settle_s=0.1)
    device = _join(hub, "image-0")
    started = time.monotonic()
    try:
        with pytest.raises(ServerError, match="only 1 client.*min_clients=2"):
            server._wait_for_clients()
    finally:
        server.close()
    assert time.monotonic() - started >= 1.0 and list(server.clients) == ["image-0"]
    device.close()


def test_a_device_dropped_at_the_round_start_that_rejoins_makes_the_round(tmp_path: Path) -> None:
    # Prepare: two joined devices; image-0's connection closes before the round starts (it restarts).
    hub = InprocHub()
    server = _server(hub, tmp_path, round_deadline_s=60, heartbeat_timeout_s=60)
    first, other = _join(hub, "image-0"), _join(hub, "image-1")
    for device in (first, other):
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
        again = _join(hub, "image-0")
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
