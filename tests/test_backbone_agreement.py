"""Both sides must hold the very same frozen backbone: a Join with other weights is refused with an Error
that says so, and a device refuses towers that adapt a backbone it holds with other weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedafd.cloud_server.app import ServerApp
from fedafd.edge_client.app import EdgeApp, EdgeError
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.messaging import ClientMessenger
from fedafd.runtime.backbones import backbone_digest
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.wire import Error, ErrorCode, Join, Welcome
from fedafd.runtime.data.modal import public_source


def _join(digests: dict[str, str]) -> Join:
    return Join(client_id="image-0", kind="image", image_arch="effnet_linear", text_arch="",
                num_private=10, backbones=digests, public_digest=public_source().digest)


def _answer(server: ServerApp, device: ClientMessenger) -> object:
    received = server.messenger.recv(5.0)
    server._handle_outside_round(received)
    reply = device.recv(5.0)
    assert reply is not None
    return reply.msg


def test_a_device_with_other_backbone_weights_is_refused_and_one_with_the_same_is_welcome(tmp_path: Path) -> None:
    # Prepare: the server's default towers adapt both backbones.
    hub = InprocHub()
    server = ServerApp(build_config(ServerConfig, {"public_size": 32}), hub.server(), tmp_path / "run")
    device = ClientMessenger(hub.client("image-0"), ByteCounter(), "image-0")
    real = {name: backbone_digest(name) for name in ("efficientnet_lite0", "minilm")}
    try:
        # Execute: a device whose MiniLM file differs, then one with the same files.
        device.send(_join({**real, "minilm": "0" * 64}), round=-1)
        refused = _answer(server, device)
        device.send(_join(real), round=-1)
        welcomed = _answer(server, device)
    finally:
        server.close()
        device.close()
    # Assert
    assert isinstance(refused, Error) and refused.code == ErrorCode.BACKBONE_MISMATCH
    assert "minilm" in refused.reason and real["minilm"][:12] in refused.reason and "000000000000" in refused.reason
    assert isinstance(welcomed, Welcome)
    assert server.admission.rejected[0]["code"] == "backbone_mismatch"


def test_a_device_refuses_towers_over_a_backbone_it_holds_with_other_weights(tmp_path: Path) -> None:
    hub = InprocHub()
    config = build_config(ClientConfig, dict(kind="image", max_private=16, max_test=8))
    edge = EdgeApp(config, hub.client(config.client_id), tmp_path)
    try:
        assert set(edge.backbones) == {"efficientnet_lite0", "minilm"}
        edge._check_backbones(dict(edge.backbones))  # the same weights: nothing to say
        with pytest.raises(EdgeError, match="efficientnet_lite0.*same backbone package version"):
            edge._check_backbones({**edge.backbones, "efficientnet_lite0": "f" * 64})
    finally:
        edge.close()
