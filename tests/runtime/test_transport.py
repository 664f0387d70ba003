"""Both transports behave the same from the caller's side: routing by id, timeouts, PeerGone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from fedafd.runtime.transport import (
    CurveClientKeys,
    CurveServerKeys,
    InprocHub,
    PeerGone,
    TransportError,
    ZmqClientTransport,
    ZmqServerTransport,
)

WAIT_S = 5.0


class _Net:
    """A server and a client factory over one implementation; closes everything it made."""

    def __init__(self, kind: str, bind: str = "tcp://127.0.0.1:*"):
        self.kind = kind
        self.closeables = []
        if kind == "inproc":
            self._hub = InprocHub()
            self.server = self._hub.server()
        else:
            self.server = ZmqServerTransport(bind)
        self.closeables.append(self.server)

    def client(self, client_id: str):
        c = self._hub.client(client_id) if self.kind == "inproc" else ZmqClientTransport(self.server.endpoint, client_id)
        self.closeables.append(c)
        return c

    def close(self):
        for c in reversed(self.closeables):
            c.close()


@pytest.fixture(params=["inproc", "zmq"])
def net(request):
    n = _Net(request.param)
    yield n
    n.close()


def _b(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def test_round_trip_multi_frame(net):
    client = net.client("img-0")
    payload = np.arange(300_000, dtype=np.float32)  # 1.2 MB frame, sent from the array's buffer
    frames = [b"FAFD\x01", b"header", b"", memoryview(payload).cast("B")]

    client.send(frames)
    peer, got = net.server.recv(WAIT_S)

    assert peer == "img-0"
    assert _b(got) == [b"FAFD\x01", b"header", b"", payload.tobytes()]
    net.server.send(peer, [b"reply", memoryview(b"x" * 10)])
    assert _b(client.recv(WAIT_S)) == [b"reply", b"x" * 10]


def test_recv_timeout_returns_none(net):
    client = net.client("txt-0")
    t0 = time.monotonic()
    assert net.server.recv(0.1) is None
    assert client.recv(0.1) is None
    assert client.recv(0) is None
    assert 0.15 <= time.monotonic() - t0 < 2.0


def test_multiple_clients_routed_by_id(net):
    ids = ["img-0", "txt-1", "mm-2"]
    clients = {i: net.client(i) for i in ids}
    for i, c in clients.items():
        c.send([f"hello from {i}".encode()])
    seen = {}
    for _ in ids:
        peer, frames = net.server.recv(WAIT_S)
        seen[peer] = _b(frames)
    assert seen == {i: [f"hello from {i}".encode()] for i in ids}

    for i in reversed(ids):
        net.server.send(i, [f"to {i}".encode()])
    for i, c in clients.items():
        assert _b(c.recv(WAIT_S)) == [f"to {i}".encode()]
        assert c.recv(0.05) is None  # nobody got anybody else's message


def test_send_to_unknown_peer_raises_peer_gone(net):
    with pytest.raises(PeerGone, match="nobody"):
        net.server.send("nobody", [b"x"])


def test_send_to_closed_client_raises_peer_gone(net):
    client = net.client("leaver")
    client.send([b"hi"])
    assert net.server.recv(WAIT_S)[0] == "leaver"
    client.close()
    deadline = time.monotonic() + WAIT_S  # ZMQ notices the closed connection asynchronously
    with pytest.raises(PeerGone):
        while time.monotonic() < deadline:
            net.server.send("leaver", [b"still there?"])
            time.sleep(0.02)


def test_closed_transport_raises_transport_error(net):
    client = net.client("c")
    client.close()
    client.close()  # idempotent
    with pytest.raises(TransportError):
        client.send([b"x"])
    with pytest.raises(TransportError):
        client.recv(0.01)


def test_send_while_another_thread_receives(net):
    client = net.client("c")
    client.send([b"hi"])
    assert net.server.recv(WAIT_S)[0] == "c"
    got = []
    t = threading.Thread(target=lambda: got.append(net.server.recv(WAIT_S)))
    t.start()
    net.server.send("c", [b"ping"])  # must not wait for the other thread's recv to time out
    assert _b(client.recv(WAIT_S)) == [b"ping"]
    client.send([b"pong"])
    t.join(WAIT_S)
    assert got and _b(got[0][1]) == [b"pong"]


def test_inproc_copies_frames_on_send():
    hub = InprocHub()
    server, client = hub.server(), hub.client("c")
    arr = np.zeros(4, np.float32)
    client.send([memoryview(arr).cast("B")])
    arr[:] = 1  # a mutation after send must not reach the receiver
    _, frames = server.recv(1.0)
    assert isinstance(frames[0], bytes) and frames[0] == bytes(16)


def test_zmq_endpoint_resolves_random_port():
    for bind in ("tcp://127.0.0.1:0", "tcp://127.0.0.1:*"):
        server = ZmqServerTransport(bind)
        try:
            host, port = server.endpoint.rsplit(":", 1)
            assert host == "tcp://127.0.0.1" and int(port) > 0
        finally:
            server.close()


def test_zmq_bind_in_use_names_the_address():
    server = ZmqServerTransport("tcp://127.0.0.1:*")
    try:
        with pytest.raises(TransportError, match=server.endpoint):
            ZmqServerTransport(server.endpoint)
    finally:
        server.close()


def test_zmq_client_reconnects_under_same_id():
    net = _Net("zmq")
    try:
        first = net.client("img-0")
        first.send([b"1"])
        assert net.server.recv(WAIT_S) is not None
        first.close()
        second = net.client("img-0")  # a restarted client takes its id over
        second.send([b"2"])
        peer, frames = net.server.recv(WAIT_S)
        assert peer == "img-0" and _b(frames) == [b"2"]
        net.server.send("img-0", [b"welcome back"])
        assert _b(second.recv(WAIT_S)) == [b"welcome back"]
    finally:
        net.close()


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S  # ZMQ reports connection events asynchronously
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_zmq_client_tells_whether_what_it_sent_went_out_on_a_live_connection():
    # Prepare: a client of a listening server.
    net = _Net("zmq")
    try:
        client = net.client("img-0")
        # Execute / Assert: up after the handshake, and the connection it is up on keeps its number.
        _until(lambda: client.connection() == (1, True), "the handshake")
        client.send([b"join"])
        assert net.server.recv(WAIT_S) is not None and client.connection() == (1, True)
        # The server goes away: down; a fresh connection is not up before its own handshake.
        net.server.close()
        _until(lambda: client.connection() == (1, False), "the disconnect")
        client.reconnect()
        assert client.connection() == (1, False)
    finally:
        net.close()


def test_curve_replies_fall_back_to_the_connection_before_when_the_last_one_closed():
    # Prepare: one device, allow-listed, heard from on two connections; the one heard from last closes
    # (as when a message from a connection the device already closed is read late).
    server_public, server_secret = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    server = ZmqServerTransport("tcp://127.0.0.1:*", curve=CurveServerKeys(server_public, server_secret,
                                                                          {public.decode(): "img-0"}.get))
    keys = CurveClientKeys(public, secret, server_public)
    live, closing = (ZmqClientTransport(server.endpoint, "img-0", curve=keys) for _ in range(2))
    try:
        for client, payload in ((live, b"first"), (closing, b"second")):
            client.send([payload])
            peer, frames = server.recv(WAIT_S)
            assert (peer, _b(frames)) == ("img-0", [payload])
        closing.close()
        # Execute: reply (the first replies may still go into the closing connection, until the server
        # notices it closed).
        deadline, got = time.monotonic() + WAIT_S, None
        while got is None:
            assert time.monotonic() < deadline, "no reply reached the live connection"
            server.send("img-0", [b"welcome"])  # PeerGone here if the route died with the closed connection
            got = live.recv(0.02)
        # Assert: the reply reached the device on its live connection, and the next ones do too.
        assert _b(got) == [b"welcome"]
        server.send("img-0", [b"again"])
        assert _b(live.recv(WAIT_S)) == [b"again"]
    finally:
        live.close()
        closing.close()
        server.close()
