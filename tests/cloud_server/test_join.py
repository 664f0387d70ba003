"""The server's side of joining: a device counts as joined once its Welcome went out, not before."""

from __future__ import annotations

from pathlib import Path

from fedafd.cloud_server.app import ServerApp
from fedafd.runtime.config import ServerConfig, build_config
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.wire import Join, encode


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
