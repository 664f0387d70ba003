"""Joining: an Error that answers an older message (a stale upload after a server restart) must not be
taken as the server refusing this Join; an Error that answers the Join itself must. A device that joins
a listening server gets its Welcome for its first Join: while the server loads, and while it is busy."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import zmq

from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.public_data import ServerData
from fedafd.edge_client import app as edge_app
from fedafd.edge_client.app import EdgeApp, EdgeError
from fedafd.edge_client.state import StateError
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.messaging import ServerMessenger
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config
from fedafd.runtime.transport import (
    CurveClientKeys, CurveServerKeys, InprocHub, ZmqClientTransport, ZmqServerTransport,
)
from fedafd.runtime.wire import Bye, Error, ErrorCode, Join, Welcome


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


def _welcome_next_join(server: ServerMessenger, run_id: str) -> None:
    while not isinstance((received := server.recv(10.0)).msg, Join):
        pass
    server.send(received.peer, Welcome(client_id=received.peer, run_id=run_id, feature_dim=16, rounds=1), round=0)


def test_a_server_back_as_another_federation_stops_the_device(tmp_path: Path) -> None:
    # Prepare: the server welcomes run r1, forgets the device (a restart), then welcomes its rejoin into r2.
    hub = InprocHub()
    server = ServerMessenger(hub.server(), ByteCounter())
    edge = device(hub, tmp_path)

    def play() -> None:
        _welcome_next_join(server, "r1")
        server.send(edge.config.client_id, Error(code=ErrorCode.UNKNOWN_CLIENT, reason="send Join", round=-1), round=0)
        _welcome_next_join(server, "r2")

    thread = threading.Thread(target=play)
    thread.start()
    # Execute / Assert: it neither trains r2 on r1's state nor starts r2 afresh in r1's folder
    with pytest.raises(EdgeError, match="running federation 'r2', not 'r1'"):
        edge.run()
    thread.join()


def test_a_device_that_cannot_continue_its_state_says_bye(tmp_path: Path) -> None:
    # Prepare: an old build's state in its folder
    hub = InprocHub()
    server = ServerMessenger(hub.server(), ByteCounter())
    edge = device(hub, tmp_path)
    (tmp_path / "client_state.pt").write_bytes(b"old")
    thread = threading.Thread(target=_welcome_next_join, args=(server, "r1"))
    thread.start()
    # Execute
    with pytest.raises(StateError, match="convert-state"):
        edge.run()
    thread.join()
    # Assert: the server hears why, so no round waits for this device
    while not isinstance((received := server.recv(5.0)).msg, Bye):
        pass
    assert "convert-state" in received.msg.reason


# -- joining a server that is up but busy, over real ZeroMQ sockets on loopback ---------------------

BACKOFF_S = 0.2
"""JOIN_BACKOFF_S in these tests: the device would have joined again several times over by the time
the busy server answers."""


class _Curve:
    """A server key pair and an allow-list naming one device, as `serve --local` makes them."""

    def __init__(self, client_id: str):
        self.server = zmq.curve_keypair()
        self.client = zmq.curve_keypair()
        self.client_id = client_id

    def server_transport(self) -> ZmqServerTransport:
        public, secret = self.server
        known = {self.client[0].decode(): self.client_id}
        return ZmqServerTransport("tcp://127.0.0.1:*", curve=CurveServerKeys(public, secret, known.get))

    def client_transport(self, endpoint: str) -> ZmqClientTransport:
        public, secret = self.client
        return ZmqClientTransport(endpoint, self.client_id, curve=CurveClientKeys(public, secret, self.server[0]))


def _zmq_pair(client_id: str, curve: bool) -> tuple[ZmqServerTransport, Callable[[], ZmqClientTransport]]:
    """A listening server transport and a factory of the device's transport to it."""
    if curve:
        keys = _Curve(client_id)
        server = keys.server_transport()
        return server, lambda: keys.client_transport(server.endpoint)
    server = ZmqServerTransport("tcp://127.0.0.1:*")
    return server, lambda: ZmqClientTransport(server.endpoint, client_id)


def _sent_types(edge: EdgeApp) -> list[str]:
    """Records the type of every message the device sends from now on."""
    sent: list[str] = []
    send = edge.messenger.send

    def spy(msg, *args, **kwargs):
        sent.append(msg.TYPE.value)
        return send(msg, *args, **kwargs)

    edge.messenger.send = spy
    return sent


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_a_busy_server_is_waited_for_on_the_same_connection(tmp_path: Path, monkeypatch, curve: bool) -> None:
    # Prepare: a listening server that reads nothing for five backoffs (busy), then answers every Join.
    monkeypatch.setattr(edge_app, "JOIN_BACKOFF_S", BACKOFF_S)
    config = build_config(ClientConfig, dict(kind="image", max_private=16, max_test=8, connect_timeout_s=10))
    server, client = _zmq_pair(config.client_id, curve)
    messenger = ServerMessenger(server, ByteCounter())
    edge = EdgeApp(config, client(), tmp_path)
    sent, joins = _sent_types(edge), []

    def busy_then_answer() -> None:
        time.sleep(5 * BACKOFF_S)
        deadline = time.monotonic() + 0.5  # Joins sent again while it was busy are all queued by now
        while time.monotonic() < deadline:
            received = messenger.recv(0.1)
            if received is not None and isinstance(received.msg, Join):
                joins.append(received.msg_id)
                messenger.send(received.peer, Welcome(client_id=received.peer, run_id="r", feature_dim=16, rounds=1),
                               round=0)

    thread = threading.Thread(target=busy_then_answer)
    thread.start()
    try:
        # Execute
        welcome = edge._join()
        thread.join()
    finally:
        edge.close()
        messenger.close()
    # Assert: one Join, answered, on the connection it went out on.
    assert isinstance(welcome, Welcome)
    assert sent == ["join"] and len(joins) == 1


def test_a_server_still_loading_answers_the_first_join(tmp_path: Path, monkeypatch) -> None:
    # Prepare: a listening server whose loading holds until the test lets it go; a device that would join
    # again after BACKOFF_S. (Loading is what `serve` does after binding and starting --local devices.)
    monkeypatch.setattr(edge_app, "JOIN_BACKOFF_S", BACKOFF_S)
    loading, release = threading.Event(), threading.Event()
    load = ServerData.load

    def held_load(self, backbones):
        loading.set()
        release.wait(timeout=10)
        return load(self, backbones)

    monkeypatch.setattr(ServerData, "load", held_load)
    client_config = build_config(ClientConfig, dict(kind="image", max_private=16, max_test=8, connect_timeout_s=3))
    server_config = build_config(ServerConfig, dict(image_arch="cnn_small", text_arch="gru", public_size=32,
                                                    feature_dim=16, expected_clients=1))
    transport, built = ZmqServerTransport("tcp://127.0.0.1:*"), {}
    thread = threading.Thread(target=lambda: built.update(server=ServerApp(server_config, transport, tmp_path / "run")))
    thread.start()
    edge = EdgeApp(client_config, ZmqClientTransport(transport.endpoint, client_config.client_id), tmp_path / "edge")
    sent = _sent_types(edge)
    try:
        assert loading.wait(timeout=10), "the server never started loading"
        # Execute
        welcome = edge._join()
    finally:
        release.set()
        thread.join(timeout=30)
        edge.close()
        (built["server"] if "server" in built else transport).close()
    # Assert: the Welcome came while the server was still loading, for the first and only Join.
    assert isinstance(welcome, Welcome) and welcome.feature_dim == 16
    assert sent == ["join"]
    assert list(built["server"].clients) == [client_config.client_id]


def test_a_device_holding_another_public_set_is_refused_by_name_before_any_round(tmp_path: Path) -> None:
    # Prepare: a server on the bundled public set; a device whose public set is 24 of its pairs, written as a
    # metadata.jsonl folder (Hugging Face's imagefolder convention) and read from there.
    import json

    from PIL import Image

    from fedafd.runtime.data.emoji import load_emoji_pairs

    pairs = load_emoji_pairs("train")
    folder = tmp_path / "my_public"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for row in range(24):
            Image.fromarray(pairs.images[row].transpose(1, 2, 0)).save(folder / f"{row}.png")
            metadata.write(json.dumps({"file_name": f"{row}.png", "text": pairs.captions[row]}) + "\n")
    server_config = build_config(ServerConfig, dict(image_arch="cnn_small", text_arch="gru", public_size=32,
                                                    feature_dim=16))
    hub = InprocHub()
    server = ServerApp(server_config, hub.server(), tmp_path / "run")
    client_config = build_config(ClientConfig, dict(kind="image", max_private=16, max_test=8, connect_timeout_s=10,
                                                    public_data=str(folder)))
    edge = EdgeApp(client_config, hub.client(client_config.client_id), tmp_path / "edge")
    stop = threading.Event()

    def serve_joins() -> None:
        while not stop.is_set():
            received = server.messenger.recv(0.1)
            if received is not None:
                server._handle_outside_round(received)

    thread = threading.Thread(target=serve_joins)
    thread.start()
    try:
        # Execute
        with pytest.raises(EdgeError) as refused:
            edge._join()
    finally:
        stop.set()
        thread.join(timeout=10)
        edge.close()
        server.close()
    # Assert: refused with the code and both sets named; the server counts no such device.
    assert "public_data_mismatch" in str(refused.value) and "demo:emoji" in str(refused.value)
    assert edge.public_digest[:12] in str(refused.value) and not server.clients
