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
        nbytes = frames_nbytes(frames)
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
        nbytes = frames_nbytes(frames)
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
