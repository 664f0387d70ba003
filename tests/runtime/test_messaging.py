"""Messengers: exact byte counts from the frames, both directions, malformed messages a value and counted."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from fedafd.runtime import wire
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.messaging import ClientMessenger, Received, ServerMessenger
from fedafd.runtime.transport import InprocHub, ZmqClientTransport, ZmqServerTransport

P, D = 6, 8


def _upload(round: int = 1, modalities=("image",)) -> wire.FeatureUpload:
    feats = {m: np.full((P, D), 0.5, np.float32) for m in modalities}
    return wire.FeatureUpload(round=round, client_id="mm-0", features=feats, metrics={"acc": 0.1},
                              losses={"task": 2.0}, train_seconds=1.0)


@pytest.fixture(params=["inproc", "zmq"])
def pair(request):
    if request.param == "inproc":
        hub = InprocHub()
        server_t, client_t = hub.server(), hub.client("mm-0")
    else:
        server_t = ZmqServerTransport("tcp://127.0.0.1:*")
        client_t = ZmqClientTransport(server_t.endpoint, "mm-0")
    server_counter, client_counter = ByteCounter(), ByteCounter()
    server = ServerMessenger(server_t, server_counter)
    client = ClientMessenger(client_t, client_counter, "mm-0")
    yield server, client
    client.close()
    server.close()


def test_feature_upload_bytes_are_exact(pair):
    server, client = pair
    msg = _upload(modalities=("image", "text"))
    header_len = len(wire.encode(msg, msg_id="0" * 16)[1])  # same length for any msg_id
    expected = len(b"FAFD\x03") + header_len + 2 * P * D * 4

    sent = client.send(msg, round=1)
    got = server.recv(5.0)

    assert sent == expected
    assert got.error is None and got.peer == "mm-0" and got.nbytes == expected
    assert client.counter.for_round(1) == {"mm-0": {"up": {"feature_upload": expected}, "down": {}}}
    assert server.counter.for_round(1) == client.counter.for_round(1)


def test_down_direction_and_totals(pair):
    server, client = pair
    client.send(wire.Join("mm-0", "multimodal", "resnet_tiny", "transformer_tiny", 20), round=-1)
    server.recv(5.0)  # Join has no round: counted under current_round (-1, setup)
    welcome = server.send("mm-0", wire.Welcome("mm-0", "run", 8, 2), round=-1)
    ack = server.send("mm-0", wire.Ack(round=0), round=0)
    r1, r2 = client.recv(5.0), client.recv(5.0)

    assert (r1.nbytes, r2.nbytes) == (welcome, ack)
    assert isinstance(r1.msg, wire.Welcome) and isinstance(r2.msg, wire.Ack)
    for counter in (server.counter, client.counter):
        assert counter.for_round(0) == {"mm-0": {"up": {}, "down": {"ack": ack}}}
        totals = counter.totals()
        assert totals["mm-0"]["down"] == {"welcome": welcome, "ack": ack}
        assert set(totals["mm-0"]["up"]) == {"join"}
        assert json.loads(json.dumps(totals)) == totals


def test_recv_round_falls_back_to_current_round(pair):
    server, client = pair
    server.current_round = 4
    client.send(wire.Bye(reason="leaving"), round=4)
    client.send(wire.Heartbeat(client_id="mm-0", round=-1, stage="idle"), round=4)
    server.recv(5.0), server.recv(5.0)
    assert set(server.counter.for_round(4)["mm-0"]["up"]) == {"bye", "heartbeat"}


def test_malformed_message_is_a_value_and_counted():
    hub = InprocHub()
    server = ServerMessenger(hub.server(), ByteCounter())
    server.current_round = 2
    raw_client = hub.client("rogue")
    frames = [b"FAFD\x09", msgpack.packb({"type": "ack"})]
    raw_client.send(frames)

    got = server.recv(1.0)

    assert isinstance(got, Received) and got.msg is None and got.msg_id == ""
    assert got.error.code == wire.ErrorCode.BAD_VERSION
    assert got.nbytes == sum(len(f) for f in frames)
    assert server.counter.for_round(2) == {"rogue": {"up": {"malformed": got.nbytes}, "down": {}}}
    reply = wire.Error(code=got.error.code, reason=got.error.reason, round=2)
    assert server.send("rogue", reply, round=2) > 0


def test_recv_timeout_returns_none():
    hub = InprocHub()
    server = ServerMessenger(hub.server(), ByteCounter())
    assert server.recv(0.01) is None
    assert server.counter.totals() == {}
