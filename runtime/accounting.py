"""Every byte counted: a thread-safe byte counter and the messengers that feed it.

A messenger wraps a transport: it encodes on send and decodes on receive, counting the bytes of every
message (magic + header + tensor frames) by round, client, direction and message type. Direction is
from the network's point of view on both sides: "up" = client -> server, "down" = server -> client.
A malformed message is returned as a value (`Received.error`), never raised, and counted under
msg_type "malformed".

Beside the per-message-type counts, the same bytes are also counted by what they carry (`PARTS`):
the tensor frames of FeatureUpload.features ("public_features"), of RoundStart.global_features
("global_features"), of RoundStart.consensus ("consensus", FedMD) and of RoundStart.tower ("global_tower"); everything else (magic, headers, public
indices, all other messages) is "control". Both views sum to the same total.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import NamedTuple

import msgpack

from .transport import ClientTransport, ServerTransport
from .wire import Message, WireError, decode, encode

DIRECTIONS = ("up", "down")
MALFORMED = "malformed"
PARTS = ("public_features", "global_features", "consensus", "global_tower", "control")
_PART_OF_FIELD = {("feature_upload", "features"): "public_features",
                  ("round_start", "global_features"): "global_features",
                  ("round_start", "consensus"): "consensus",
                  ("round_start", "tower"): "global_tower"}
SERVER_PEER = "server"
"""`Received.peer` on the client side."""


class ByteCounter:
    """Bytes per (round, client, direction, msg_type); reads return plain JSON-ready dicts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[tuple[int, str, str, str], int] = defaultdict(int)
        self._parts: dict[tuple[int, str, str, str], int] = defaultdict(int)

    def add_parts(self, round: int, client: str, direction: str, parts: dict[str, int]) -> None:
        """Counts the same bytes as `add`, split by what they carry (keys from PARTS)."""
        with self._lock:
            for part, n in parts.items():
                self._parts[(int(round), str(client), direction, part)] += int(n)

    def parts_for_round(self, round: int) -> dict[str, dict[str, dict[str, int]]]:
        """{client: {"up": {part: bytes}, "down": {...}}} for one round."""
        return self._nest(lambda r: r == round, self._parts)

    def add(self, round: int, client: str, direction: str, msg_type: str, nbytes: int) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        with self._lock:
            self._bytes[(int(round), str(client), direction, str(msg_type))] += int(nbytes)

    def rounds(self) -> list[int]:
        with self._lock:
            return sorted({r for r, *_ in self._bytes})

    def for_round(self, round: int) -> dict[str, dict[str, dict[str, int]]]:
        """{client: {"up": {msg_type: bytes}, "down": {...}}} for one round."""
        return self._nest(lambda r: r == round)

    def totals(self) -> dict[str, dict[str, dict[str, int]]]:
        """Same shape as `for_round`, summed over all rounds."""
        return self._nest(lambda r: True)

    def _nest(self, keep, table=None) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        with self._lock:
            items = list((self._bytes if table is None else table).items())
        for (r, client, direction, msg_type), n in items:
            if keep(r):
                per_dir = out.setdefault(client, {d: {} for d in DIRECTIONS})[direction]
                per_dir[msg_type] = per_dir.get(msg_type, 0) + n
        return out


class Received(NamedTuple):
    peer: str
    msg: Message | None
    """None when the message was malformed (see `error`)."""
    msg_id: str
    """"" when the message was malformed."""
    nbytes: int
    error: WireError | None


def _nbytes(frames) -> int:
    return sum(memoryview(getattr(f, "buffer", f)).nbytes for f in frames)


def frame_parts(frames) -> dict[str, int]:
    """Bytes of one message's frames by what they carry (PARTS); unreadable messages are all control."""
    sizes = [memoryview(getattr(f, "buffer", f)).nbytes for f in frames]
    parts = dict.fromkeys(PARTS, 0)
    try:
        header = msgpack.unpackb(getattr(frames[1], "buffer", frames[1]), raw=False)
        mtype, descs = header["type"], header["tensors"]
        names = [d["name"] for d in descs]
    except Exception:  # malformed: whatever it is, it is not a payload we asked for
        names, mtype = [], ""
    if not isinstance(names, list) or len(names) != len(sizes) - 2:
        names = []
    parts["control"] = sum(sizes[:2]) if names else sum(sizes)
    for name, n in zip(names, sizes[2:]):
        field = str(name).partition("/")[0]
        parts[_PART_OF_FIELD.get((mtype, field), "control")] += n
    return {k: v for k, v in parts.items() if v}


def _round_of(msg: Message | None, current_round: int) -> int:
    """A message's own round when it has one (Error/Heartbeat use -1 for none), else the caller's."""
    r = getattr(msg, "round", -1)
    return r if r >= 0 else current_round


def _decode(peer: str, frames) -> Received:
    nbytes = _nbytes(frames)
    try:
        d = decode(frames)
    except WireError as e:
        return Received(peer, None, "", nbytes, e)
    return Received(peer, d.msg, d.msg_id, d.nbytes, None)


class ServerMessenger:
    """Server side: encodes, sends, receives and decodes messages, counting every byte."""

    def __init__(self, transport: ServerTransport, counter: ByteCounter):
        self.transport = transport
        self.counter = counter
        self.current_round = -1
        """Round that received messages without a round of their own (Join, Bye) count under."""

    def send(self, peer: str, msg: Message, round: int, msg_id: str | None = None,
             codecs: dict[str, str] | None = None) -> int:
        """Sends `msg` to `peer` (tensor fields stored with `codecs`, see wire.encode); returns the bytes
        sent. Raises PeerGone / TransportError / WireError."""
        frames = encode(msg, msg_id, codecs)
        self.transport.send(peer, frames)
        nbytes = _nbytes(frames)
        self.counter.add(round, peer, "down", msg.TYPE.value, nbytes)
        self.counter.add_parts(round, peer, "down", frame_parts(frames))
        return nbytes

    def recv(self, timeout_s: float) -> Received | None:
        got = self.transport.recv(timeout_s)
        if got is None:
            return None
        r = _decode(*got)
        msg_type = MALFORMED if r.error else r.msg.TYPE.value
        self.counter.add(_round_of(r.msg, self.current_round), r.peer, "up", msg_type, r.nbytes)
        self.counter.add_parts(_round_of(r.msg, self.current_round), r.peer, "up", frame_parts(got[1]))
        return r

    def close(self) -> None:
        self.transport.close()


class ClientMessenger:
    """Client side: the same as ServerMessenger, with one peer (the server) and bytes kept under `client_id`."""

    def __init__(self, transport: ClientTransport, counter: ByteCounter, client_id: str):
        self.transport = transport
        self.counter = counter
        self.client_id = client_id
        self.current_round = -1
        """Round that received messages without a round of their own (Welcome, Bye) count under."""

    def send(self, msg: Message, round: int, msg_id: str | None = None,
             codecs: dict[str, str] | None = None) -> int:
        """Sends `msg` to the server (tensor fields stored with `codecs`); returns the bytes sent.
        Raises TransportError / WireError."""
        frames = encode(msg, msg_id, codecs)
        self.transport.send(frames)
        nbytes = _nbytes(frames)
        self.counter.add(round, self.client_id, "up", msg.TYPE.value, nbytes)
        self.counter.add_parts(round, self.client_id, "up", frame_parts(frames))
        return nbytes

    def recv(self, timeout_s: float) -> Received | None:
        frames = self.transport.recv(timeout_s)
        if frames is None:
            return None
        r = _decode(SERVER_PEER, frames)
        msg_type = MALFORMED if r.error else r.msg.TYPE.value
        self.counter.add(_round_of(r.msg, self.current_round), self.client_id, "down", msg_type, r.nbytes)
        self.counter.add_parts(_round_of(r.msg, self.current_round), self.client_id, "down", frame_parts(frames))
        return r

    def close(self) -> None:
        self.transport.close()
