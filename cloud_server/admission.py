"""Who is in the federation, and which of their messages the server lets in.

A Join is checked (its client id against the sender's, its kind, the sha256 of its frozen backbones and of
its public set) and
answered with a Welcome; a device counts as joined only once that Welcome went out. An upload is checked
before the round uses it: from a joined device, under its own id, for the running round and a device
selected for it, not a replay of one accepted in an earlier round, with the modalities of its kind in
|P| x d. Heartbeats of devices that are not joined, uploads outside a round and messages a device never
sends are refused. Errors are values: every refusal is an Error reply naming the problem (and the id of
the message it refuses), kept for the round record, and serving goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from fedafd.runtime.backbones import backbone_fix
from fedafd.runtime.messaging import Received
from fedafd.runtime.vocabulary import MODALITIES_OF_KIND
from fedafd.runtime.wire import Bye, Error, ErrorCode, FeatureUpload, Heartbeat, Join, Message, Welcome

log = logging.getLogger("fedafd.cloud")

SEEN_IDS = 100_000
"""Accepted upload message ids remembered to refuse replays (about 3 MB)."""


@dataclass
class ClientRecord:
    client_id: str
    kind: str
    archs: dict[str, str]
    num_private: int
    joined_round: int
    last_seen: float = field(default_factory=time.monotonic)
    tower_version_sent: int = -1
    round_start_sent_at: float = 0.0
    """time.monotonic() when this round's RoundStart was handed to the transport."""

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES_OF_KIND[self.kind]


class Admission:
    """The joined devices (`clients`) and the refused messages since the last round record (`rejected`)."""

    def __init__(self, send: Callable[[str, Message], bool], backbone_digests: dict[str, str], run_id: str,
                 feature_dim: int, rounds: int, public_digest: str = "", public_location: str = ""):
        self.send = send
        """Sends a Welcome or an Error to a peer; False when its connection is gone."""
        self.backbone_digests = backbone_digests
        """Backbone name -> sha256 of the weights the server's towers adapt (a Join must name the same)."""
        self.public_digest = public_digest
        """sha256 of the public set's rows the server trains on (a Join must name the same; "": not checked)."""
        self.public_location = public_location
        self.welcome = {"run_id": run_id, "feature_dim": feature_dim, "rounds": rounds}
        self.clients: dict[str, ClientRecord] = {}
        self.rejected: list[dict] = []
        self.round_in_progress = -1
        """The round being run (-1 between rounds): what an Error names."""
        self._accepted_ids: dict[str, int] = {}  # msg_id of accepted uploads -> round (the newest SEEN_IDS)

    def handle(self, received: Received, joined_round: int) -> str | None:
        """A message outside the round's uploads, at any time: Joins (a device admitted now joins in
        `joined_round`), heartbeats, byes, malformed input (an Error reply). Returns the reason a joined
        device gave in its Bye (it is no longer joined), else None."""
        peer, message = received.peer, received.msg
        if received.error is not None:
            self.reject(peer, received.error.code, received.error.reason)
            return None
        if peer in self.clients:
            self.clients[peer].last_seen = time.monotonic()
        if isinstance(message, Join):
            self._admit(peer, message, received.msg_id, joined_round)
        elif isinstance(message, Heartbeat):
            if peer not in self.clients:  # e.g. this server restarted, or dropped it as dead: it must join again
                self.reject(peer, ErrorCode.UNKNOWN_CLIENT, f"{peer!r} has not joined (or was dropped); send Join",
                            received.msg_id)
        elif isinstance(message, Bye):
            if peer in self.clients:
                del self.clients[peer]
                return message.reason
            self.reject(peer, ErrorCode.UNKNOWN_CLIENT, f"Bye from {peer!r}, which has not joined", received.msg_id)
        elif isinstance(message, FeatureUpload):
            self.reject(peer, ErrorCode.UNEXPECTED, f"upload for round {message.round} outside a round", received.msg_id)
        else:
            self.reject(peer, ErrorCode.UNEXPECTED, f"a client does not send {type(message).__name__}", received.msg_id)
        return None

    def _admit(self, peer: str, join: Join, msg_id: str, joined_round: int) -> None:
        if join.client_id != peer:
            self.reject(peer, ErrorCode.BAD_FIELD, f"client_id {join.client_id!r} does not match the sender {peer!r}", msg_id)
            return
        if join.kind not in MODALITIES_OF_KIND:
            self.reject(peer, ErrorCode.BAD_FIELD, f"kind must be one of {sorted(MODALITIES_OF_KIND)}, got {join.kind!r}",
                        msg_id)
            return
        for name, digest in self.backbone_digests.items():
            if join.backbones.get(name) != digest:
                theirs = join.backbones.get(name)
                self.reject(peer, ErrorCode.BACKBONE_MISMATCH,
                            f"this server's towers adapt backbone {name} with weights sha256 {digest[:12]}..., the device "
                            f"has {theirs[:12] + '...' if theirs else 'none'}: {backbone_fix(name)}", msg_id)
                return
        if self.public_digest and join.public_digest != self.public_digest:
            theirs = f"{join.public_digest[:12]}..." if join.public_digest else "none"
            self.reject(peer, ErrorCode.PUBLIC_DATA_MISMATCH,
                        f"this server's public set is {self.public_location} (rows sha256 {self.public_digest[:12]}...), "
                        f"the device holds another (sha256 {theirs}): give the device the same public_data and "
                        f"public_data_config (`fedafd-edge data check` prints its digest)", msg_id)
            return
        before = self.clients.get(peer)
        self.clients[peer] = ClientRecord(peer, join.kind, {"image": join.image_arch, "text": join.text_arch},
                                          join.num_private, joined_round=joined_round)
        if not self.send(peer, Welcome(client_id=peer, **self.welcome)):
            # Its connection closed before the Welcome (it joins again on a new one): a device that never
            # got its Welcome does not count as joined, so no round starts waiting for it.
            if before is None:
                del self.clients[peer]
            else:
                self.clients[peer] = before
            return
        log.info("%s %s (%s, %d private samples)", "rejoined:" if before else "joined:", peer, join.kind, join.num_private)

    def check_upload(self, received: Received, round_: int, selected: list[str], uplink: bool,
                     shape: tuple[int, int]) -> tuple[ErrorCode, str] | None:
        """Why the round may not use this upload (an error code and reason), or None. `uplink`: the method
        sends features up (else an upload carries metrics only); `shape`: each feature tensor's, (|P|, d)."""
        upload: FeatureUpload = received.msg
        peer = received.peer
        seen_in = self._accepted_ids.get(received.msg_id)
        if seen_in is not None and seen_in != round_:
            return ErrorCode.UNEXPECTED, f"replayed upload: message {received.msg_id} was accepted in round {seen_in}"
        if peer not in self.clients:
            return ErrorCode.UNKNOWN_CLIENT, f"{peer!r} has not joined; send Join first"
        if upload.client_id != peer:
            return ErrorCode.BAD_FIELD, f"client_id {upload.client_id!r} does not match the sender {peer!r}"
        if upload.round != round_ or peer not in selected:
            return ErrorCode.UNEXPECTED, f"upload for round {upload.round}, but round {round_} is running" + (
                "" if peer in selected else f" without {peer!r}")
        if not uplink:
            return None
        expected = set(self.clients[peer].modalities)
        if set(upload.features) != expected:
            return ErrorCode.BAD_FIELD, f"features {sorted(upload.features)} but a {self.clients[peer].kind} client sends {sorted(expected)}"
        for modality, tensor in upload.features.items():
            if tuple(tensor.shape) != shape:
                return ErrorCode.BAD_SHAPE, f"features/{modality} has shape {tuple(tensor.shape)}, expected {shape} (|P| x d)"
        return None

    def accepted(self, msg_id: str, round_: int) -> None:
        """An upload the round uses: the same message id in a later round is a replay."""
        self._accepted_ids[msg_id] = round_
        while len(self._accepted_ids) > SEEN_IDS:
            del self._accepted_ids[next(iter(self._accepted_ids))]

    def reject(self, peer: str, code: ErrorCode | str, reason: str, reply_to: str = "") -> None:
        """The peer gets an Error naming the problem (and the id of the message it refuses); the round
        record keeps it."""
        log.warning("rejected a message from %s: %s: %s", peer, code, reason)
        self.rejected.append({"peer": peer, "code": str(code), "reason": reason})
        self.send(peer, Error(code=str(code), reason=reason, round=self.round_in_progress, reply_to=reply_to))

    def take_rejected(self) -> list[dict]:
        """The refusals since the last call (for the round record)."""
        taken, self.rejected = self.rejected, []
        return taken
