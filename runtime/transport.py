"""Moving frames between the server and its clients: one interface, a ZeroMQ and an in-process implementation.

A transport moves lists of frames and knows nothing of messages (`runtime.wire` turns messages into
frames). The server side is addressed by peer = the client's id; the ZMQ implementation uses a ROUTER
socket whose routing ids are the client ids set by each DEALER. `InprocHub` gives the same behaviour
inside one process for fast tests, so no test skips the encode/decode boundary.

Every wait has a timeout; nothing blocks forever. Sending to a peer the server does not know (never
connected, or gone) raises `PeerGone` on both implementations.

Security (ZMQ): with `CurveServerKeys` the ROUTER speaks CURVE (encrypted, authenticated) and a ZAP
handler admits only public keys in an allow-list that is read again for every new connection, so a
revoked key is refused from its next connection on. The allow-list names each key's client id; it
becomes the ZAP User-Id of every message from that connection, and that authenticated name is the
peer: a CURVE client sets no routing id of its own (libzmq gives each connection a random one) and the
server routes replies to the connection it last heard from under that name, falling back to the ones
before when it is gone (a message read late from a connection the device already closed must not cut
the route to its live one). A peer therefore cannot claim another device's id (the server also checks
the client_id inside Join and uploads against the peer), and a second connection with another key cannot
take over a device's round. Without keys the transport is plain text, peers are whatever id they claim
(ROUTER_HANDOVER: a restarted client takes its id over), and `insecure` says so.

A client transport tells, through `connection()`, whether what it sent went out on a connection that is
still up: a server that is busy (loading, training) and has not answered yet is then told apart from one
that was never reached, and a device keeps waiting on the first instead of reconnecting.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message
from zmq.utils import z85

from .wire import MAX_MESSAGE_BYTES

log = logging.getLogger("fedafd.transport")

Frames = list  # list[bytes | memoryview]

_POLL_SLICE_S = 0.05
"""Longest a recv holds the socket lock in one poll, so a send from another thread waits at most this."""


_ROUTES_KEPT = 4
"""CURVE: connections remembered per device (the newest first) to fall back on when one is gone."""


class TransportError(RuntimeError):
    """A send or receive failed at the transport level (closed, timed out, cannot bind or connect)."""


class PeerGone(TransportError):
    """The server tried to send to a peer that is not connected (never joined, or went away)."""


@dataclass(frozen=True)
class CurveServerKeys:
    """What a CURVE server needs: its own key pair (z85) and who may connect."""

    public: bytes
    secret: bytes
    client_of_key: Callable[[str], str | None]
    """z85 public key of a connecting peer -> its client id, or None to refuse it; called for every
    new connection, so it should read the allow-list as it is now (revocation without restart)."""


@dataclass(frozen=True)
class CurveClientKeys:
    """What a CURVE client needs: its own key pair and the server's public key (all z85)."""

    public: bytes
    secret: bytes
    server_public: bytes


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


def _harden(sock: zmq.Socket, hwm: int, send_timeout_s: float, heartbeat_s: float,
            max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
    # Close drops unsent messages at once instead of hanging the process on exit.
    sock.setsockopt(zmq.LINGER, 0)
    # Bound queued messages per peer (messages are up to MAX_MESSAGE_BYTES, so keep this small);
    # past it a send waits SNDTIMEO then fails instead of growing memory without limit.
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # A peer sending a frame over the limit is disconnected before it is buffered. libzmq checks
    # each frame, so the whole-message limit is enforced again by wire.decode.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
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
        self.monitor: zmq.Socket | None = None
        """Connection events of `sock` (see ZmqClientTransport.connection), when watched."""

    @property
    def context(self) -> zmq.Context:
        return self._ctx

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

    def close(self, before_term: Callable[[], None] = lambda: None) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.sock.close(linger=0)  # sockets before the context, or term() waits on them
            if self.monitor is not None:
                self.monitor.close(linger=0)
            before_term()  # e.g. the ZAP handler's socket, which lives in the same context
            self._ctx.term()


class _AllowListAuthenticator(ThreadAuthenticator):
    """ZAP handler: admits a CURVE key only if the allow-list names it, and makes that name the User-Id."""

    def __init__(self, context: zmq.Context, client_of_key: Callable[[str], str | None]):
        super().__init__(context, log=logging.getLogger("fedafd.zap"))
        self._client_of_key = client_of_key
        self._names: dict[bytes, str] = {}

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """pyzmq's credentials-provider hook, run for every new connection (so revocation is immediate)."""
        try:
            name = self._client_of_key(z85_key.decode("ascii"))
        except Exception as e:  # an unreadable allow-list refuses everyone rather than crashing the handler
            log.error("allow-list unreadable, refusing %s: %s", z85_key.decode("ascii"), e)
            name = None
        if name is None:
            log.warning("refused a connection: key %s is not in the allow-list (or was revoked)", z85_key.decode("ascii"))
            return False
        self._names[z85_key] = name
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names.get(z85.encode(client_public_key), "")


class ZmqServerTransport:
    """ROUTER socket bound at `bind` ("tcp://127.0.0.1:0" or ":*" picks a free port; see `.endpoint`).

    With `curve`, only allow-listed keys connect and a peer is the client id its key is listed under.
    `max_message_bytes` caps every incoming frame before libzmq buffers it (the peer is disconnected).
    """

    def __init__(self, bind: str, *, hwm: int = 64, send_timeout_s: float = 10.0, heartbeat_s: float = 1.0,
                 curve: CurveServerKeys | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self._s = _ZmqSocket(zmq.ROUTER)
        sock = self._s.sock
        _harden(sock, hwm, send_timeout_s, heartbeat_s, max_message_bytes)
        # Sending to an unknown or vanished routing id raises EHOSTUNREACH (-> PeerGone) instead of
        # ZMQ's default of dropping the message silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Plain text: peers are the ids they claim, and a client that reconnects with its id (restart after
        # a crash) takes it over at once. CURVE: peers are their authenticated names (see _routes); a
        # connection that sets a routing id already in use is ignored rather than handed the route.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0 if curve is not None else 1)
        self.insecure = curve is None
        self._routes: dict[str, list[bytes]] = {}  # CURVE: client id -> routing ids, the one heard from last first
        self._auth: _AllowListAuthenticator | None = None
        if curve is not None:
            self._auth = _AllowListAuthenticator(self._s.context, curve.client_of_key)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self._auth)
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            sock.curve_server = True
        try:
            sock.bind(bind)
        except zmq.ZMQError as e:
            self.close()
            raise TransportError(f"cannot bind {bind}: {e} (change the server's bind address)") from None
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, peer: str, frames: Frames) -> None:
        if self._auth is None:
            self._s.send([peer.encode("utf-8", "surrogateescape"), *frames], repr(peer))
            return
        routes = self._routes.get(peer, [])
        while routes:
            try:
                self._s.send([routes[0], *frames], repr(peer))
                return
            except PeerGone:  # that connection is closed: the one before may still be up
                routes.pop(0)
        self._routes.pop(peer, None)
        raise PeerGone(f"peer {peer!r} is not connected")

    def recv(self, timeout_s: float) -> tuple[str, Frames] | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            parts = self._s.poll_recv(max(deadline - time.monotonic(), 0.0))
            if parts is None:
                return None
            if self._auth is None:
                return parts[0].bytes.decode("utf-8", "surrogateescape"), [p.buffer for p in parts[1:]]
            try:
                peer = parts[-1].get("User-Id")  # set by our ZAP handler: the allow-listed client id
            except zmq.ZMQError:
                peer = ""
            if not peer:
                log.warning("dropped a message without an authenticated User-Id")
                continue
            self._remember_route(peer, parts[0].bytes)
            return peer, [p.buffer for p in parts[1:]]

    def _remember_route(self, peer: str, routing: bytes) -> None:
        """Replies go to the connection this device was heard from last, then to the ones before it."""
        routes = self._routes.setdefault(peer, [])
        if routing in routes:
            routes.remove(routing)
        routes.insert(0, routing)
        del routes[_ROUTES_KEPT:]

    def close(self) -> None:
        self._s.close(before_term=self._stop_auth)

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


class ZmqClientTransport:
    """DEALER socket connected to `connect`, identified to the server by `client_id` (CURVE with `curve`)."""

    def __init__(self, connect: str, client_id: str, *, hwm: int = 64, send_timeout_s: float = 10.0,
                 heartbeat_s: float = 1.0, reconnect_ivl_s: float = 0.1, reconnect_ivl_max_s: float = 5.0,
                 curve: CurveClientKeys | None = None):
        if not client_id or len(client_id.encode()) > 255:
            raise TransportError(f"client id {client_id!r} must be 1 to 255 bytes (ZMQ routing id)")
        self.endpoint = connect
        self.client_id = client_id
        self.insecure = curve is None
        self._options = (hwm, send_timeout_s, heartbeat_s, reconnect_ivl_s, reconnect_ivl_max_s, curve)
        self._handshakes = 0  # completed handshakes with the server, over every socket this transport opened
        self._up = False
        self._s = self._open()

    def _open(self) -> _ZmqSocket:
        hwm, send_timeout_s, heartbeat_s, reconnect_ivl_s, reconnect_ivl_max_s, curve = self._options
        s = _ZmqSocket(zmq.DEALER)
        sock = s.sock
        _harden(sock, hwm, send_timeout_s, heartbeat_s)
        if curve is None:
            # Plain text: the server routes replies by this id, so it is the client id itself. With CURVE
            # the server knows us by our key's allow-listed name and libzmq picks a random routing id.
            sock.setsockopt(zmq.ROUTING_ID, self.client_id.encode())
        # Retry quickly after a drop, backing off to RECONNECT_IVL_MAX while the server is down.
        sock.setsockopt(zmq.RECONNECT_IVL, int(reconnect_ivl_s * 1000))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(reconnect_ivl_max_s * 1000))
        if curve is not None:
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            sock.curve_serverkey = curve.server_public
        # Watched from before connect: `connection` tells a server that is up but busy from one not reached.
        s.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._up = False
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            s.close()
            raise TransportError(f"cannot connect to {self.endpoint}: {e} (check the server address)") from None
        return s

    def reconnect(self) -> None:
        """A fresh connection under the same id (queued messages are dropped): what a client does when
        the server stops answering, e.g. after it restarted or while an old connection still holds the id."""
        old, self._s = self._s, self._open()
        old.close()

    def connection(self) -> tuple[int, bool]:
        """(handshakes completed with the server so far, whether a connection is up now).

        A message sent while this reads (n, True) was handed to a live connection; if a later call still
        reads (n, True), that connection never dropped, so the message is in the server's socket even when
        the server has not answered it yet (busy, not polling). Sent while (n, False), it goes out on
        handshake n + 1 (CURVE: once the server's allow-list admitted this key)."""
        s = self._s
        with s.lock:
            if s.closed:
                raise TransportError("transport is closed")
            while s.monitor.poll(0):
                event = recv_monitor_message(s.monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._handshakes, self._up = self._handshakes + 1, True
                elif event == zmq.EVENT_DISCONNECTED:
                    self._up = False
        return self._handshakes, self._up

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
            # As on the ZMQ side (no ROUTER_HANDOVER): while a client with this id is open, a second one
            # is ignored (its sends are dropped); it takes the id once the first one closed.
            client = _InprocClient(self, client_id)
            self._clients.setdefault(client_id, client)
            return client

    def _owns(self, client: _InprocClient) -> bool:
        with self._lock:
            return self._clients.setdefault(client.client_id, client) is client

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
        if self._hub._owns(self):
            self._hub._server_inbox.put((self.client_id, _freeze(frames)))

    def connection(self) -> tuple[int, bool]:
        """As ZmqClientTransport.connection: connected while this client holds its id at the hub."""
        if self._closed.is_set():
            raise TransportError("transport is closed")
        return 1, self._hub._owns(self)

    def reconnect(self) -> None:
        """Nothing to renew in process (the ZMQ client opens a fresh connection)."""

    def recv(self, timeout_s: float) -> Frames | None:
        return _get(self._inbox, timeout_s, self._closed)

    def close(self) -> None:
        self._closed.set()
        self._hub._drop(self)
