"""Moving frames between the server and its clients: one interface, a ZeroMQ and an in-process implementation.

A transport moves lists of frames and knows nothing of messages (`runtime.wire` turns messages into
frames). The server side is addressed by peer = the client's id; the ZMQ implementation uses a ROUTER
socket whose routing ids are the client ids set by each DEALER. `InprocHub` gives the same behaviour
inside one process for fast tests, so no test skips the encode/decode boundary.

Every wait has a timeout; nothing blocks forever. Sending to a peer the server does not know (never
connected, or gone) raises `PeerGone` on both implementations.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Protocol

import zmq

from .wire import MAX_MESSAGE_BYTES

Frames = list  # list[bytes | memoryview]

_POLL_SLICE_S = 0.05
"""Longest a recv holds the socket lock in one poll, so a send from another thread waits at most this."""


class TransportError(RuntimeError):
    """A send or receive failed at the transport level (closed, timed out, cannot bind or connect)."""


class PeerGone(TransportError):
    """The server tried to send to a peer that is not connected (never joined, or went away)."""


class ServerTransport(Protocol):
    endpoint: str

    def send(self, peer: str, frames: Frames) -> None: ...

    def recv(self, timeout_s: float) -> tuple[str, Frames] | None: ...

    def close(self) -> None: ...


class ClientTransport(Protocol):
    def send(self, frames: Frames) -> None: ...

    def recv(self, timeout_s: float) -> Frames | None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------
# ZeroMQ


def _harden(sock: zmq.Socket, hwm: int, send_timeout_s: float, heartbeat_s: float) -> None:
    # Close drops unsent messages at once instead of hanging the process on exit.
    sock.setsockopt(zmq.LINGER, 0)
    # Bound queued messages per peer (messages are up to MAX_MESSAGE_BYTES, so keep this small);
    # past it a send waits SNDTIMEO then fails instead of growing memory without limit.
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # A peer sending a frame over the limit is disconnected before it is buffered. libzmq checks
    # each frame, so the whole-message limit is enforced again by wire.decode.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    # A send that cannot be queued (peer's HWM full) fails after this instead of blocking forever.
    sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
    # ZMTP heartbeats: a peer that silently vanished (crash, cable) is noticed and its pipe dropped
    # within HEARTBEAT_TIMEOUT; TTL tells the other side to drop us if our pings stop.
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * 5000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(heartbeat_s * 5000))


class _ZmqSocket:
    """A socket with its own context, guarded by a lock so one thread may recv while another sends."""

    def __init__(self, kind: int):
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(kind)
        self.lock = threading.Lock()
        self.closed = False

    def poll_recv(self, timeout_s: float) -> list[zmq.Frame] | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            with self.lock:
                if self.closed:
                    raise TransportError("transport is closed")
                wait_s = min(max(deadline - time.monotonic(), 0.0), _POLL_SLICE_S)
                if self.sock.poll(int(wait_s * 1000), zmq.POLLIN):
                    return self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            if time.monotonic() >= deadline:
                return None

    def send(self, frames: list, what: str) -> None:
        with self.lock:
            if self.closed:
                raise TransportError("transport is closed")
            try:
                # copy=False: tensor frames are sent from the arrays' own buffers.
                self.sock.send_multipart(frames, copy=False)
            except zmq.Again:
                raise TransportError(f"send to {what} timed out: its queue is full "
                                     f"(raise send_timeout_s or hwm)") from None
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    raise PeerGone(f"peer {what} is not connected") from None
                raise TransportError(f"send to {what} failed: {e}") from None

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.sock.close(linger=0)  # sockets before the context, or term() waits on them
            self._ctx.term()


class ZmqServerTransport:
    """ROUTER socket bound at `bind` ("tcp://127.0.0.1:0" or ":*" picks a free port; see `.endpoint`)."""

    def __init__(self, bind: str, *, hwm: int = 64, send_timeout_s: float = 10.0, heartbeat_s: float = 1.0):
        self._s = _ZmqSocket(zmq.ROUTER)
        sock = self._s.sock
        _harden(sock, hwm, send_timeout_s, heartbeat_s)
        # Sending to an unknown or vanished routing id raises EHOSTUNREACH (-> PeerGone) instead of
        # ZMQ's default of dropping the message silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A client that reconnects with the same id (restart after a crash) takes over its id at once
        # instead of being ignored until the old connection times out.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            sock.bind(bind)
        except zmq.ZMQError as e:
            self._s.close()
            raise TransportError(f"cannot bind {bind}: {e} (change the server's bind address)") from None
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, peer: str, frames: Frames) -> None:
        self._s.send([peer.encode("utf-8", "surrogateescape"), *frames], repr(peer))

    def recv(self, timeout_s: float) -> tuple[str, Frames] | None:
        parts = self._s.poll_recv(timeout_s)
        if parts is None:
            return None
        peer = parts[0].bytes.decode("utf-8", "surrogateescape")
        return peer, [p.buffer for p in parts[1:]]

    def close(self) -> None:
        self._s.close()


class ZmqClientTransport:
    """DEALER socket connected to `connect`, identified to the server by `client_id`."""

    def __init__(self, connect: str, client_id: str, *, hwm: int = 64, send_timeout_s: float = 10.0,
                 heartbeat_s: float = 1.0, reconnect_ivl_s: float = 0.1, reconnect_ivl_max_s: float = 5.0):
        if not client_id or len(client_id.encode()) > 255:
            raise TransportError(f"client id {client_id!r} must be 1 to 255 bytes (ZMQ routing id)")
        self._s = _ZmqSocket(zmq.DEALER)
        sock = self._s.sock
        _harden(sock, hwm, send_timeout_s, heartbeat_s)
        # The server routes replies by this id, so it is the client id itself (not ZMQ's random one).
        sock.setsockopt(zmq.ROUTING_ID, client_id.encode())
        # Retry quickly after a drop, backing off to RECONNECT_IVL_MAX while the server is down.
        sock.setsockopt(zmq.RECONNECT_IVL, int(reconnect_ivl_s * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(reconnect_ivl_max_s * 1000))
        try:
            sock.connect(connect)
        except zmq.ZMQError as e:
            self._s.close()
            raise TransportError(f"cannot connect to {connect}: {e} (check the server address)") from None
        self.endpoint = connect
        self.client_id = client_id

    def send(self, frames: Frames) -> None:
        self._s.send(list(frames), "server")

    def recv(self, timeout_s: float) -> Frames | None:
        parts = self._s.poll_recv(timeout_s)
        return None if parts is None else [p.buffer for p in parts]

    def close(self) -> None:
        self._s.close()


# ---------------------------------------------------------------------------------------------------
# In-process


def _freeze(frames: Frames) -> list[bytes]:
    """Copies frames to bytes, so a sender mutating its arrays after send cannot change what arrives."""
    return [memoryview(getattr(f, "buffer", f)).tobytes() for f in frames]


class InprocHub:
    """In-process stand-in for the network: one server, any number of clients, thread-safe queues."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server_inbox: queue.Queue[tuple[str, list[bytes]]] = queue.Queue()
        self._clients: dict[str, _InprocClient] = {}
        self._server: _InprocServer | None = None

    def server(self) -> ServerTransport:
        with self._lock:
            if self._server is not None:
                raise TransportError("this hub already has a server")
            self._server = _InprocServer(self)
            return self._server

    def client(self, client_id: str) -> ClientTransport:
        with self._lock:
            # Like ROUTER_HANDOVER on the ZMQ side: a new client with a known id takes over the id.
            client = self._clients[client_id] = _InprocClient(self, client_id)
            return client

    def _drop(self, client: _InprocClient) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]

    def _route(self, peer: str) -> _InprocClient:
        with self._lock:
            client = self._clients.get(peer)
        if client is None:
            raise PeerGone(f"peer {peer!r} is not connected")
        return client


def _get(q: queue.Queue, timeout_s: float, closed: threading.Event):
    deadline = time.monotonic() + max(timeout_s, 0.0)
    while not closed.is_set():
        try:
            return q.get(timeout=min(max(deadline - time.monotonic(), 0.0), _POLL_SLICE_S))
        except queue.Empty:
            if time.monotonic() >= deadline:
                return None
    raise TransportError("transport is closed")


class _InprocServer:
    def __init__(self, hub: InprocHub):
        self._hub = hub
        self._closed = threading.Event()
        self.endpoint = f"inproc://hub-{id(hub):x}"

    def send(self, peer: str, frames: Frames) -> None:
        if self._closed.is_set():
            raise TransportError("transport is closed")
        self._hub._route(peer)._inbox.put(_freeze(frames))

    def recv(self, timeout_s: float) -> tuple[str, Frames] | None:
        return _get(self._hub._server_inbox, timeout_s, self._closed)

    def close(self) -> None:
        self._closed.set()


class _InprocClient:
    def __init__(self, hub: InprocHub, client_id: str):
        self._hub = hub
        self.client_id = client_id
        self._inbox: queue.Queue[list[bytes]] = queue.Queue()
        self._closed = threading.Event()

    def send(self, frames: Frames) -> None:
        if self._closed.is_set():
            raise TransportError("transport is closed")
        # Queued even before the server exists, as a DEALER queues until it connects.
        self._hub._server_inbox.put((self.client_id, _freeze(frames)))

    def recv(self, timeout_s: float) -> Frames | None:
        return _get(self._inbox, timeout_s, self._closed)

    def close(self) -> None:
        self._closed.set()
        self._hub._drop(self)
