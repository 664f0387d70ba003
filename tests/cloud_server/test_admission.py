"""Admission on its own, over the real wire (a device's frames in, the server's replies decoded): who joins,
which uploads a round may use, and that every refusal is an Error reply naming the problem and the message."""

from __future__ import annotations

import numpy as np
import pytest

from fedafd.cloud_server.admission import SEEN_IDS, Admission
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.messaging import Received, ServerMessenger
from fedafd.runtime.transport import InprocHub, PeerGone
from fedafd.runtime.wire import (
    Bye, Error, ErrorCode, FeatureUpload, Heartbeat, Join, Welcome, decode, encode, new_msg_id,
)

DIGESTS = {"minilm": "ab" * 32}
P, D = 4, 8


class Server:
    """An Admission whose replies go out through a ServerMessenger, as ServerApp sends them."""

    def __init__(self) -> None:
        self.hub = InprocHub()
        self.messenger = ServerMessenger(self.hub.server(), ByteCounter())
        self.admission = Admission(self.send, DIGESTS, "run-1", feature_dim=D, rounds=3)
        self.devices = {}

    def send(self, peer, message) -> bool:
        try:
            self.messenger.send(peer, message, 0)
            return True
        except PeerGone:
            return False

    def device(self, client_id: str):
        if client_id not in self.devices:
            self.devices[client_id] = self.hub.client(client_id)
        return self.devices[client_id]

    def receive(self, client_id: str, message, msg_id: str | None = None):
        """`message` from the device, as the server receives it."""
        self.device(client_id).send(encode(message, msg_id))
        return self.messenger.recv(5.0)

    def reply(self, client_id: str):
        frames = self.device(client_id).recv(5.0)
        return None if frames is None else decode(frames).msg


def _join(client_id: str = "text-0", backbones=DIGESTS, **fields) -> Join:
    return Join(**{"client_id": client_id, "kind": "text", "image_arch": "", "text_arch": "minilm_linear",
                   "num_private": 10, "backbones": backbones, **fields})


def _upload(client_id: str = "text-0", round: int = 1, features=None) -> FeatureUpload:
    features = {"text": np.zeros((P, D), np.float32)} if features is None else features
    return FeatureUpload(round=round, client_id=client_id, features=features, metrics={}, losses={}, train_seconds=1.0)


@pytest.fixture
def server():
    server = Server()
    yield server
    for device in server.devices.values():
        device.close()
    server.messenger.close()


def test_a_join_is_welcomed_into_the_run_and_recorded(server: Server) -> None:
    # Execute
    left = server.admission.handle(server.receive("text-0", _join()), joined_round=2)
    # Assert: joined in round 2 with its kind and archs; the Welcome names the run and its settings.
    assert left is None
    record = server.admission.clients["text-0"]
    assert (record.kind, record.archs, record.num_private, record.joined_round) == (
        "text", {"image": "", "text": "minilm_linear"}, 10, 2)
    assert server.reply("text-0") == Welcome(client_id="text-0", run_id="run-1", feature_dim=D, rounds=3)
    assert server.admission.rejected == []


@pytest.mark.parametrize("join, code, says", [
    (_join(client_id="text-1"), ErrorCode.BAD_FIELD, "client_id 'text-1' does not match the sender 'text-0'"),
    (_join(backbones={"minilm": "cd" * 32}), ErrorCode.BACKBONE_MISMATCH, "sha256 ababababab"),
    (_join(backbones={}), ErrorCode.BACKBONE_MISMATCH, "the device has none"),
])
def test_a_join_with_another_id_or_other_backbone_weights_is_refused(server: Server, join, code, says) -> None:
    # Prepare: the server is in round 1.
    server.admission.round_in_progress = 1
    msg_id = new_msg_id()
    # Execute
    server.admission.handle(server.receive("text-0", join, msg_id), joined_round=2)
    # Assert: not joined; the Error names the problem, the round and the refused Join.
    reply = server.reply("text-0")
    assert isinstance(reply, Error) and reply.code == code and says in reply.reason
    assert (reply.round, reply.reply_to) == (1, msg_id)
    assert server.admission.clients == {}
    assert server.admission.take_rejected() == [{"peer": "text-0", "code": str(code), "reason": reply.reason}]
    assert server.admission.rejected == []  # taken


def test_a_rejoin_whose_welcome_cannot_go_out_keeps_the_earlier_record() -> None:
    # Prepare: text-0 joined in round 0; its next Join's Welcome fails (the connection closed).
    sends = iter([True, False, False])
    admission = Admission(lambda peer, message: next(sends), DIGESTS, "run-1", D, 3)
    admission.handle(Received("text-0", _join(), "m1", 0, None), joined_round=0)
    first = admission.clients["text-0"]
    # Execute
    admission.handle(Received("text-0", _join(num_private=99), "m2", 0, None), joined_round=4)
    admission.handle(Received("image-0", _join(client_id="image-0"), "m3", 0, None), joined_round=4)
    # Assert: the earlier record stays; a device never welcomed does not count as joined.
    assert admission.clients == {"text-0": first} and first.num_private == 10


@pytest.mark.parametrize("sender, upload, selected, code, says", [
    ("image-9", _upload(client_id="image-9"), ["text-0"], ErrorCode.UNKNOWN_CLIENT, "'image-9' has not joined"),
    ("text-0", _upload(client_id="text-1"), ["text-0"], ErrorCode.BAD_FIELD, "does not match the sender"),
    ("text-0", _upload(round=0), ["text-0"], ErrorCode.UNEXPECTED, "upload for round 0, but round 1 is running"),
    ("text-0", _upload(), [], ErrorCode.UNEXPECTED, "round 1 is running without 'text-0'"),
    ("text-0", _upload(features={"image": np.zeros((P, D), np.float32)}), ["text-0"], ErrorCode.BAD_FIELD,
     "features ['image'] but a text client sends ['text']"),
    ("text-0", _upload(features={"text": np.zeros((P + 1, D), np.float32)}), ["text-0"], ErrorCode.BAD_SHAPE,
     "features/text has shape (5, 8), expected (4, 8) (|P| x d)"),
])
def test_an_upload_the_round_may_not_use_is_named(server: Server, sender, upload, selected, code, says) -> None:
    server.admission.handle(server.receive("text-0", _join()), joined_round=0)
    # Execute
    problem = server.admission.check_upload(server.receive(sender, upload), 1, selected, uplink=True, shape=(P, D))
    # Assert
    assert problem is not None and problem[0] == code and says in problem[1]


def test_a_good_upload_passes_once_and_its_replay_in_a_later_round_does_not(server: Server) -> None:
    server.admission.handle(server.receive("text-0", _join()), joined_round=0)
    first = server.receive("text-0", _upload(round=1), "a" * 16)
    # Execute + Assert: accepted in round 1; the same message again in round 1 is the app's duplicate to ack.
    assert server.admission.check_upload(first, 1, ["text-0"], uplink=True, shape=(P, D)) is None
    server.admission.accepted(first.msg_id, 1)
    assert server.admission.check_upload(first, 1, ["text-0"], uplink=True, shape=(P, D)) is None
    replay = server.receive("text-0", _upload(round=2), "a" * 16)
    assert server.admission.check_upload(replay, 2, ["text-0"], uplink=True, shape=(P, D)) == (
        ErrorCode.UNEXPECTED, f"replayed upload: message {'a' * 16} was accepted in round 1")
    # A method without uplink (LOCAL): an upload of metrics only, the features not checked.
    bare = server.receive("text-0", _upload(round=2, features={}), "b" * 16)
    assert server.admission.check_upload(bare, 2, ["text-0"], uplink=False, shape=(P, D)) is None


def test_replay_memory_keeps_the_newest_ids() -> None:
    admission = Admission(lambda peer, message: True, {}, "run-1", D, 3)
    for i in range(SEEN_IDS + 5):
        admission.accepted(f"{i:016x}", 0)
    assert len(admission._accepted_ids) == SEEN_IDS
    assert f"{4:016x}" not in admission._accepted_ids and f"{5:016x}" in admission._accepted_ids


def test_heartbeats_byes_and_stray_messages(server: Server) -> None:
    admission = server.admission
    admission.handle(server.receive("text-0", _join()), joined_round=0)
    server.reply("text-0")  # the Welcome
    admission.clients["text-0"].last_seen = 0.0
    # A joined device's heartbeat: seen now, no reply.
    admission.handle(server.receive("text-0", Heartbeat(client_id="text-0", round=0, stage="training")), 0)
    assert admission.clients["text-0"].last_seen > 0
    assert server.device("text-0").recv(0.05) is None and admission.rejected == []
    # Refused: a heartbeat or Bye of a device not joined, an upload outside a round, a message only the server sends.
    cases = [("image-0", Heartbeat(client_id="image-0", round=-1, stage="idle"), ErrorCode.UNKNOWN_CLIENT,
              "'image-0' has not joined (or was dropped); send Join"),
             ("image-1", Bye(reason="x"), ErrorCode.UNKNOWN_CLIENT, "Bye from 'image-1', which has not joined"),
             ("text-0", _upload(round=3), ErrorCode.UNEXPECTED, "upload for round 3 outside a round"),
             ("text-0", Welcome(client_id="text-0", run_id="r", feature_dim=1, rounds=1), ErrorCode.UNEXPECTED,
              "a client does not send Welcome")]
    for peer, message, code, reason in cases:
        msg_id = new_msg_id()
        assert admission.handle(server.receive(peer, message, msg_id), 0) is None
        assert server.reply(peer) == Error(code=str(code), reason=reason, round=-1, reply_to=msg_id)
    # Malformed frames: the wire's code, no message id to refer to.
    server.device("text-0").send([b"FAFD\x09", b"junk"])
    admission.handle(server.messenger.recv(5.0), 0)
    reply = server.reply("text-0")
    assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_VERSION and reply.reply_to == ""
    # A joined device's Bye: its reason comes back and it is no longer joined.
    assert admission.handle(server.receive("text-0", Bye(reason="battery low")), 0) == "battery low"
    assert admission.clients == {}
    assert [r["code"] for r in admission.take_rejected()] == ["unknown_client", "unknown_client", "unexpected",
                                                              "unexpected", "bad_version"]


def test_a_device_holding_another_public_set_is_refused_before_any_round() -> None:
    # Prepare: a server whose public set has digest "a" * 64; one device names it, one names another, one none.
    sent = []
    admission = Admission(lambda peer, message: sent.append((peer, message)) or True, DIGESTS, "run-1", D, 3,
                          public_digest="a" * 64, public_location="coco/captions_train2017.json")
    hub = InprocHub()
    messenger = ServerMessenger(hub.server(), ByteCounter())
    for client_id, digest in (("text-0", "a" * 64), ("text-1", "b" * 64), ("text-2", "")):
        hub.client(client_id).send(encode(_join(client_id, public_digest=digest)))
        # Execute
        admission.handle(messenger.recv(5.0), joined_round=0)
    # Assert: only the device with the server's public set joined; the others got a named error.
    assert list(admission.clients) == ["text-0"]
    refusals = [m for _, m in sent if isinstance(m, Error)]
    assert [r.code for r in refusals] == [ErrorCode.PUBLIC_DATA_MISMATCH] * 2
    assert "coco/captions_train2017.json" in refusals[0].reason and "bbbbbbbbbbbb" in refusals[0].reason
    assert "none" in refusals[1].reason
