"""Messengers: encode/count/decode over a transport, one per side.

A messenger wraps a transport: it encodes on send and decodes on receive, and counts the bytes of every
message in a ByteCounter (accounting.py), by message type and by what they carry. A malformed message is
returned as a value (`Received.error`), never raised, and counted under msg_type "malformed".
"""

from __future__ import annotations

from typing import NamedTuple

from .accounting import MALFORMED, ByteCounter, frame_parts, frames_nbytes
from .transport import ClientTransport, ServerTransport
from .wire import Message, WireError, decode, encode

SERVER_PEER = "server"
"""`Received.peer` on the client side."""


class Received(NamedTuple):
    peer: str
    msg: Message | None
    """None when the message was malformed (see `error`)."""
    msg_id: str
    """"" when the message was malformed."""
    nbytes: int
    error: WireError | None


def _round_of(msg: Message | None, current_round: int) -> int:
    """A message's own round when it has one (Error/Heartbeat use -1 for none), else the caller's."""
    r = getattr(msg, "round", -1)
    return r if r >= 0 else current_round


def _decode(peer: str, frames) -> Received:
    nbytes = frames_nbytes(frames)
    try:
        d = decode(frames)
    except WireError as e:
        return Received(peer, None, "", nbytes, e)
    return Received(peer, d.msg, d.msg_id, d.nbytes, None)


class _Messenger:
    """Encoding, decoding and counting, the same on both sides; a side says whose bytes they are and which
    direction is which."""

    def __init__(self, counter: ByteCounter, sending: str, receiving: str):
        self.counter = counter
        self._sending, self._receiving = sending, receiving  # "down"/"up" as this side sends/receives
        self.current_round = -1
        """Round that received messages without a round of their own (Join, Welcome, Bye) count under."""

    def _count_sent(self, frames, msg: Message, round: int, who: str) -> int:
        """Counts `msg`'s frames as sent by this side (to or for `who`); returns their bytes."""
        nbytes = frames_nbytes(frames)
        self.counter.add(round, who, self._sending, msg.TYPE.value, nbytes)
        self.counter.add_parts(round, who, self._sending, frame_parts(frames))
        return nbytes

    def _decoded(self, peer: str, frames, who: str) -> Received:
        """Received frames, decoded (a malformed message as a value) and counted under `who`."""
        r = _decode(peer, frames)
        msg_type = MALFORMED if r.error else r.msg.TYPE.value
        round_ = _round_of(r.msg, self.current_round)
        self.counter.add(round_, who, self._receiving, msg_type, r.nbytes)
        self.counter.add_parts(round_, who, self._receiving, frame_parts(frames))
        return r


class ServerMessenger(_Messenger):
    """Server side: encodes, sends, receives and decodes messages, counting every byte under its device."""

    def __init__(self, transport: ServerTransport, counter: ByteCounter):
        super().__init__(counter, sending="down", receiving="up")
        self.transport = transport

    def send(self, peer: str, msg: Message, round: int, msg_id: str | None = None,
             codecs: dict[str, str] | None = None) -> int:
        """Sends `msg` to `peer` (tensor fields stored with `codecs`, see wire.encode); returns the bytes
        sent. Raises PeerGone / TransportError / WireError."""
        frames = encode(msg, msg_id, codecs)
        self.transport.send(peer, frames)  # counted once it went: a refused send counts nothing
        return self._count_sent(frames, msg, round, peer)

    def recv(self, timeout_s: float) -> Received | None:
        got = self.transport.recv(timeout_s)
        return None if got is None else self._decoded(got[0], got[1], who=got[0])

    def close(self) -> None:
        self.transport.close()


class ClientMessenger(_Messenger):
    """Client side: the same as ServerMessenger, with one peer (the server) and bytes kept under `client_id`."""

    def __init__(self, transport: ClientTransport, counter: ByteCounter, client_id: str):
        super().__init__(counter, sending="up", receiving="down")
        self.transport = transport
        self.client_id = client_id

    def send(self, msg: Message, round: int, msg_id: str | None = None,
             codecs: dict[str, str] | None = None) -> int:
        """Sends `msg` to the server (tensor fields stored with `codecs`); returns the bytes sent.
        Raises TransportError / WireError."""
        frames = encode(msg, msg_id, codecs)
        self.transport.send(frames)
        return self._count_sent(frames, msg, round, self.client_id)

    def recv(self, timeout_s: float) -> Received | None:
        frames = self.transport.recv(timeout_s)
        return None if frames is None else self._decoded(SERVER_PEER, frames, who=self.client_id)

    def close(self) -> None:
        self.transport.close()
