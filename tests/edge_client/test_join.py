"""Joining: an Error that answers an older message (a stale upload after a server restart) must not be
taken as the server refusing this Join; an Error that answers the Join itself must."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fedafd.edge_client.app import EdgeApp, EdgeError
from fedafd.runtime.accounting import ByteCounter, ServerMessenger
from fedafd.runtime.config import ClientConfig, build_config
from fedafd.runtime.transport import InprocHub
from fedafd.runtime.wire import Error, ErrorCode, Join, Welcome


def device(hub: InprocHub, tmp_path: Path) -> EdgeApp:
    config = build_config(ClientConfig, dict(kind="image", max_private=16, max_test=8, connect_timeout_s=10))
    return EdgeApp(config, hub.client(config.client_id), tmp_path)


def answer_join(server: ServerMessenger, stale_error_first: bool, refuse: bool) -> None:
    """Plays the server: waits for the Join, then sends what the test asks for."""
    while True:
        received = server.recv(5.0)
        assert received is not None, "no Join arrived"
        if isinstance(received.msg, Join):
            break
    if stale_error_first:
        server.send(received.peer, Error(code=ErrorCode.UNEXPECTED, reason="upload for round 1 outside a round",
                                         round=-1, reply_to="an-older-upload"), round=0)
    if refuse:
        server.send(received.peer, Error(code=ErrorCode.BAD_FIELD, reason="kind is wrong", round=-1,
                                         reply_to=received.msg_id), round=0)
    else:
        server.send(received.peer, Welcome(client_id=received.peer, run_id="r", feature_dim=16, rounds=1), round=0)


def test_a_stale_error_before_the_welcome_is_skipped(tmp_path: Path) -> None:
    # Prepare
    hub = InprocHub()
    server = ServerMessenger(hub.server(), ByteCounter())
    edge = device(hub, tmp_path)
    thread = threading.Thread(target=answer_join, args=(server, True, False))
    thread.start()
    # Execute
    welcome = edge._join()
    thread.join()
    # Assert
    assert isinstance(welcome, Welcome) and welcome.feature_dim == 16


def test_an_error_answering_the_join_refuses_it(tmp_path: Path) -> None:
    hub = InprocHub()
    server = ServerMessenger(hub.server(), ByteCounter())
    edge = device(hub, tmp_path)
    thread = threading.Thread(target=answer_join, args=(server, True, True))
    thread.start()
    with pytest.raises(EdgeError, match="kind is wrong"):
        edge._join()
    thread.join()
