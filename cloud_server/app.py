"""The cloud server process: admit clients, run rounds (stage 1, downlink, collect, stage 3, evaluate),
checkpoint, and write one JSONL metrics record per round. Learning maths lives in stages.py."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from fedafd.cloud_server.distributed import ONE_PROCESS, Ranks
from fedafd.cloud_server.checkpoint import check_resume, load_server_checkpoint, save_server_checkpoint
from fedafd.cloud_server.stages import (
    GlobalModel, build_optimizers, distill_epoch, evaluate_retrieval, extract_features, train_contrastive_epoch,
)
from fedafd.cloud_server.distill import TeacherFold
from fedafd.cloud_server.strategies import build_strategy
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.messaging import Received, ServerMessenger
from fedafd.runtime.backbones import backbone_digest
from fedafd.runtime.codecs import wire_codec
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.config import ServerConfig, config_to_dict
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.data.modal import load_public_data
from fedafd.runtime.data.partition import cap_indices
from fedafd.runtime.report import METRICS_FILE
from fedafd.runtime.torch_utils import atomic_write_bytes, configure_threads, resolve_device, seeded_generator
from fedafd.runtime.transport import PeerGone, ServerTransport
from fedafd.runtime.wire import (
    MODALITIES, MODALITIES_OF_KIND, Ack, Bye, Error, ErrorCode, FeatureUpload, Heartbeat, Join, RoundStart, Welcome,
    new_msg_id, new_run_id,
)

if TYPE_CHECKING:
    from fedafd.cloud_server.tracking import RoundSink

log = logging.getLogger("fedafd.cloud")


class ServerError(FedafdError):
    """The federation cannot go on; the message names the setting to change."""


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


class DropReason(enum.StrEnum):
    """Why a selected device has no upload in a round."""

    NOT_CONNECTED = "not_connected"
    """Its connection was gone when the round started."""
    DEADLINE = "deadline"
    """No upload by round_deadline_s: a straggler, the only drop that stays joined for the next round."""
    PROCESS_EXITED = "process_exited"
    """A --local device's process ended."""
    SILENT = "silent"
    """No heartbeat or upload for heartbeat_timeout_s."""
    LEFT = "left"
    """It said Bye."""


@dataclass(frozen=True)
class Drop:
    reason: DropReason
    text: str
    """The reason with its numbers, as the log and metrics.jsonl say it."""


@dataclass
class RoundOutcome:
    uploads: dict[str, FeatureUpload] = field(default_factory=dict)
    dropped: dict[str, Drop] = field(default_factory=dict)  # client id -> why
    arrived_at: dict[str, float] = field(default_factory=dict)  # client id -> time.monotonic() of its upload
    duplicates: int = 0
    """Uploads acknowledged but ignored: a resend of an accepted message id, or a second upload."""


@dataclass
class _LiveRound:
    round: int
    tower_version: int
    global_features: dict[str, torch.Tensor]
    settings: MethodSettings
    selected: list[str]
    outcome: RoundOutcome
    folds: dict[str, TeacherFold]
    """Per modality, the teacher the accepted uploads are folded into as they arrive."""
    round_start_ids: dict[str, str] = field(default_factory=dict)


_SEEN_IDS = 100_000
"""Accepted upload message ids remembered to refuse replays (about 3 MB)."""

_POLL_S = 0.05
"""Longest the set-up thread that answers Joins waits in one poll (how late it stops after set-up)."""


class ServerApp:
    def __init__(self, config: ServerConfig, transport: ServerTransport, run_dir: Path,
                 dead_clients: Callable[[], dict[str, int]] = dict, resume: bool = False,
                 sinks: Sequence[RoundSink] = (), ranks: Ranks = ONE_PROCESS):
        self.config = config
        self.ranks = ranks  # rank 0 of the server's data-parallel ranks (distributed.py), or the only process
        self.run_dir = run_dir
        self.sinks = list(sinks)
        """Also given each round's record after its metrics.jsonl line (TensorBoard, MLflow: tracking.py)."""
        self.on_stage: Callable[[str], None] = lambda text: None
        """Told what the server is doing now, in a few words (the CLI shows it as a live status line)."""
        self.counter = ByteCounter()
        self.messenger = ServerMessenger(transport, self.counter)
        self.dead_clients = dead_clients  # --local: child processes that exited (client id -> exit code)
        self.clients: dict[str, ClientRecord] = {}
        self.rejected: list[dict] = []  # malformed or refused messages since the last round record
        self.next_round = 0
        self.round_in_progress = -1
        self._live: _LiveRound | None = None  # the round being collected, to resend RoundStart on a rejoin
        self._accepted_ids: dict[str, int] = {}  # msg_id of accepted uploads -> round (newest _SEEN_IDS)
        self.device = resolve_device(config.device)
        configure_threads(config.threads)
        torch.manual_seed(config.seed)
        self.model = GlobalModel(config.image_arch, config.text_arch, config.feature_dim,
                                 config.contrastive_loss, config.adapter_dropout).to(self.device)
        backbones = tuple(sorted(set(self.model.backbones().values())))
        self.backbone_digests = {name: backbone_digest(name) for name in backbones}
        self.consensus: dict[str, torch.Tensor] = {}
        """FedMD: the last round's teachers, sent down for the devices' digest (and checkpointed)."""
        self.run_id = new_run_id()
        """The federation's id, sent in every Welcome; a resumed run keeps its checkpoint's."""
        saved = self._restore() if resume else None  # run_id, next_round, the model; the optimisers' state below
        with self._answering_joins():  # what takes seconds: the data, and the first optimiser imports torch._dynamo
            self.public_all = load_public_data("train", backbones)
            self.public_rows = np.sort(cap_indices(np.arange(len(self.public_all)), config.public_size, config.seed))
            self.public = self.public_all.select(self.public_rows)
            self.public_test = load_public_data("test", backbones)
            self.optimizer, self.distill_optimizer = build_optimizers(self.model, config.lr, config.distill_lr)
            if saved is not None:
                self.optimizer.load_state_dict(saved["optimizer"])
                self.distill_optimizer.load_state_dict(saved["distill_optimizer"])
            ranks.setup(config_to_dict(config), self.model, (self.optimizer, self.distill_optimizer))
            self.strategy = build_strategy(config)

    @contextlib.contextmanager
    def _answering_joins(self) -> Iterator[None]:
        """While the caller sets up (without touching the clients or the messenger), a thread answers what
        devices send, Joins first: a device that joins a server still loading gets its Welcome at once,
        instead of waiting in the socket's queue until the server first polls."""
        stop = threading.Event()
        failed: list[BaseException] = []

        def answer() -> None:
            try:
                while not stop.is_set():
                    received = self.messenger.recv(_POLL_S)
                    if received is not None:
                        self._handle_outside_round(received)
            except BaseException as e:  # raised again in the caller's thread
                failed.append(e)

        thread = threading.Thread(target=answer, name="answer-joins", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if failed:
            raise failed[0]

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self, on_round: Callable[[dict], None] = lambda record: None) -> list[dict]:
        records = []
        try:
            self._wait_for_clients()
            while self.next_round < self.config.rounds:
                self._refill()
                record = self._run_round(self.next_round)
                records.append(record)
                on_round(record)
                self.next_round += 1
        finally:
            self._say_bye()
        return records

    def _wait_for_clients(self) -> None:
        """Start when expected_clients joined; with expected_clients 0, once min_clients joined and no
        other joined for join_settle_s (late devices join between rounds); after join_timeout_s with
        min_clients, else fail."""
        c = self.config
        deadline = time.monotonic() + c.join_timeout_s
        joined, last_change = len(self.clients), time.monotonic()
        while True:
            if len(self.clients) != joined:
                joined, last_change = len(self.clients), time.monotonic()
            enough = len(self.clients) >= max(c.expected_clients, c.min_clients)
            if enough and c.expected_clients:
                return
            if enough and time.monotonic() - last_change >= c.join_settle_s:
                log.info("starting with %d client(s): none joined for join_settle_s=%gs", joined, c.join_settle_s)
                return
            if time.monotonic() >= deadline:
                if len(self.clients) >= c.min_clients:
                    return
                raise ServerError(f"only {len(self.clients)} client(s) joined within join_timeout_s={c.join_timeout_s:g}s, "
                                  f"min_clients={c.min_clients}; start more clients or lower min_clients")
            failed = self.dead_clients()
            if failed and c.expected_clients and len(self.clients) + len(failed) >= c.expected_clients:
                if len(self.clients) >= c.min_clients:
                    return
                raise ServerError(f"client process(es) exited before joining: {failed}; see their logs in {self.run_dir}")
            self.on_stage(f"waiting for devices: {len(self.clients)}/{max(c.expected_clients, c.min_clients)} joined")
            received = self.messenger.recv(0.2)
            if received is not None:
                self._handle_outside_round(received)

    def _refill(self, max_messages: int = 10_000) -> None:
        """Between rounds: handle what queued up (joins of restarted devices, heartbeats), and if dead
        devices were forgotten below min_clients, wait for joins as at the start."""
        for _ in range(max_messages):
            received = self.messenger.recv(0.0)
            if received is None:
                break
            self._handle_outside_round(received)
        c = self.config
        deadline = time.monotonic() + c.join_timeout_s
        while len(self.clients) < c.min_clients:
            if time.monotonic() >= deadline:
                raise ServerError(f"only {len(self.clients)} client(s) left and none rejoined within join_timeout_s="
                                  f"{c.join_timeout_s:g}s, min_clients={c.min_clients}")
            received = self.messenger.recv(0.2)
            if received is not None:
                self._handle_outside_round(received)

    def _say_bye(self) -> None:
        for client_id in list(self.clients):
            self._send(client_id, Bye(reason="federation finished"), self.next_round)

    # -- one round -------------------------------------------------------------------------------
    def _run_round(self, round_: int) -> dict:
        c = self.config
        self.round_in_progress = round_
        self.messenger.current_round = round_
        timings: dict[str, float] = {}
        generator = seeded_generator(c.seed * 1_000_003 + round_)
        if c.public_resample and c.public_size:
            self._resample_public(round_)
        self.ranks.start_round(round_, self.public_rows, generator)
        settings = self.strategy.settings()

        self.on_stage(f"round {round_ + 1}/{c.rounds}: stage 1, training the global encoders on {len(self.public)} public pairs")
        started = time.perf_counter()
        stage1_loss = 0.0
        for _ in range(c.server_epochs):
            stage1_loss = train_contrastive_epoch(self.model, self.optimizer, self.public, c.batch_size, generator, self.device,
                                                  self.ranks)
        global_features = {m: extract_features(self.model.encoders[m], self.public, m, self.device, ranks=self.ranks).cpu()
                           for m in MODALITIES}
        timings["stage1"] = time.perf_counter() - started

        started = time.perf_counter()
        selected = list(self.clients)
        tower_version = round_ + 1  # the encoders change every round (stage 1 and stage 3)
        outcome = RoundOutcome()
        self._live = _LiveRound(round_, tower_version, global_features, settings, selected, outcome,
                                folds={m: TeacherFold() for m in MODALITIES})
        for client_id in selected:
            if not self._send_round_start(self.clients[client_id], round_, tower_version, global_features, settings):
                outcome.dropped[client_id] = Drop(DropReason.NOT_CONNECTED, "not connected when the round started")
        timings["downlink"] = time.perf_counter() - started

        self.on_stage(f"round {round_ + 1}/{c.rounds}: devices training, 0/{len(selected)} uploads")
        started = time.perf_counter()
        self._collect(round_, selected, outcome)
        folds, self._live = self._live.folds, None
        timings["collect"] = time.perf_counter() - started

        needed = math.ceil(c.quorum * len(selected))
        quorum_met = len(outcome.uploads) >= needed and len(outcome.uploads) > 0
        self.on_stage(f"round {round_ + 1}/{c.rounds}: stage 3, distilling from {len(outcome.uploads)} uploads")
        started = time.perf_counter()
        distill_loss, sed_summary, teachers = 0.0, {}, {}
        if settings.uplink and quorum_met:
            teachers = {m: fold.teacher() for m, fold in folds.items() if len(fold)}
            sed_summary = {m: fold.mean_weights() for m, fold in folds.items() if len(fold)}
            if settings.digest == "consensus":  # FedMD: this round's teachers are next round's consensus
                self.consensus = {m: t.cpu() for m, t in teachers.items()}
        teachers = {m: t.to(self.device) for m, t in self.ranks.share_teachers(teachers).items()}
        for _ in range(c.distill_epochs):  # no teachers: no stage 3
            distill_loss = distill_epoch(self.model, self.distill_optimizer, self.public, teachers, c.gamma,
                                         c.batch_size, generator, self.device, self.ranks)
        timings["stage3"] = time.perf_counter() - started

        started = time.perf_counter()
        server_metrics = evaluate_retrieval(self.model, self.public_test, self.device, self.ranks)
        timings["eval"] = time.perf_counter() - started

        record = {
            "round": round_,
            "strategy": c.strategy,
            "clients": {cid: {"kind": self.clients[cid].kind if cid in self.clients else "?",
                              "metrics": dict(u.metrics), "losses": dict(u.losses), "train_seconds": u.train_seconds}
                        for cid, u in outcome.uploads.items()},
            "server": dict(server_metrics, stage1_loss=stage1_loss, distill_loss=distill_loss),
            "sed_mean_weights": sed_summary,
            "selected": selected,
            "dropped": {cid: drop.text for cid, drop in outcome.dropped.items()},
            "rejected": self._take_rejected(),
            "quorum_met": quorum_met,
            "duplicates": outcome.duplicates,
            "public_size": len(self.public),
            "bytes": self.counter.for_round(round_),
            "bytes_by_part": self.counter.parts_for_round(round_),
            "codecs": {"features": c.feature_codec, "tower": c.tower_codec},
            "link": link_times(outcome, self.clients),
            "timings": timings,
        }
        # Metrics first, then the checkpoint: a crash between the two re-runs the round on resume, and
        # _restore drops the orphan record, so every round appears exactly once.
        self._append_metrics(record)
        self._checkpoint(round_)
        self.round_in_progress = -1
        return record

    def _send_round_start(self, client: ClientRecord, round_: int, tower_version: int,
                          global_features: dict[str, torch.Tensor], settings: MethodSettings) -> bool:
        c = self.config
        tower_modalities, feature_modalities = self._downlink_plan(client, settings)
        tower: dict[str, np.ndarray] = {}
        if client.tower_version_sent != tower_version:  # only when they changed
            tower = {k: v.numpy() for k, v in self.model.tower_state(tower_modalities).items()}
        backbones = self.model.backbones()
        message = RoundStart(
            round=round_,
            local_epochs=c.local_epochs,
            tower_version=tower_version,
            public_indices=self.public_rows.astype(np.int64),
            global_features={m: global_features[m].numpy() for m in feature_modalities},
            tower=tower,
            tower_arch={m: self.model.archs[m] for m in tower_modalities},
            settings=settings,
            consensus={m: f.numpy() for m, f in self.consensus.items()} if settings.digest == "consensus" else {},
            backbones={backbones[m]: self.backbone_digests[backbones[m]] for m in tower_modalities if m in backbones},
        )
        client.round_start_sent_at = time.monotonic()
        codecs = {"global_features": wire_codec(c.feature_codec), "consensus": wire_codec(c.feature_codec),
                  "tower": wire_codec(c.tower_codec)}
        # One message id per client and round: a RoundStart resent after a rejoin is the same message,
        # so a client that already served it resends its upload instead of training twice.
        msg_id = self._live.round_start_ids.setdefault(client.client_id, new_msg_id()) if self._live else None
        if self._send(client.client_id, message, round_, codecs, msg_id):
            client.tower_version_sent = tower_version if tower else client.tower_version_sent
            return True
        return False

    def _downlink_plan(self, client: ClientRecord, settings: MethodSettings) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(towers, features) a client gets: the towers of its modalities when it fuses (GFF), and when the
        method needs the global features G of the public set (BAA, CreamFL, a digest toward the server) G of
        both modalities, each either as the (P, d) tensor or, where that is fewer numbers, as the tower the
        device computes G with from the public set it holds (an adapter over a frozen backbone is a quarter
        of G_img's size at d = 256)."""
        towers = list(client.modalities) if settings.gff else []
        if not settings.needs_global_features:
            return tuple(towers), ()
        for modality in MODALITIES:
            tower_size = sum(t.numel() for t in self.model.encoders[modality].state_dict().values())
            if modality not in towers and tower_size < len(self.public) * self.config.feature_dim:
                towers.append(modality)
        towers.sort(key=MODALITIES.index)
        return tuple(towers), tuple(m for m in MODALITIES if m not in towers)

    def _collect(self, round_: int, selected: list[str], outcome: RoundOutcome) -> RoundOutcome:
        """Uploads until every selected client answered, or the deadline; silent or dead clients drop
        (and are forgotten until they join again, so the next round does not wait for them)."""
        c = self.config
        deadline = time.monotonic() + c.round_deadline_s
        for client_id in selected:
            self.clients[client_id].last_seen = time.monotonic()
        while True:
            waiting = [cid for cid in selected if cid not in outcome.uploads and cid not in outcome.dropped]
            if not waiting:
                break
            now = time.monotonic()
            if now >= deadline:
                for cid in waiting:
                    outcome.dropped[cid] = Drop(DropReason.DEADLINE, f"no upload by the round deadline "
                                                                     f"(round_deadline_s={c.round_deadline_s:g})")
                break
            for cid, code in self.dead_clients().items():
                if cid in waiting:
                    outcome.dropped[cid] = Drop(DropReason.PROCESS_EXITED, f"process exited with code {code}")
            for cid in waiting:
                if cid in self.clients and now - self.clients[cid].last_seen > c.heartbeat_timeout_s:
                    outcome.dropped[cid] = Drop(DropReason.SILENT,
                                                f"silent for {c.heartbeat_timeout_s:g}s (heartbeat_timeout_s)")
            received = self.messenger.recv(min(0.5, max(deadline - now, 0.01)))
            if received is None:
                continue
            if isinstance(received.msg, FeatureUpload) and received.error is None:
                self._accept_upload(received, round_, selected, outcome)
            else:
                self._handle_outside_round(received, outcome)
        for cid, drop in outcome.dropped.items():
            log.warning("round %d: %s dropped: %s", round_, cid, drop.text)
            if drop.reason is not DropReason.DEADLINE:  # a straggler stays for the next round
                self.clients.pop(cid, None)
        return outcome

    def _accept_upload(self, received: Received, round_: int, selected: list[str], outcome: RoundOutcome) -> None:
        upload: FeatureUpload = received.msg
        peer = received.peer
        seen_in = self._accepted_ids.get(received.msg_id)
        if seen_in is not None and seen_in != round_:
            self._reject(peer, ErrorCode.UNEXPECTED, f"replayed upload: message {received.msg_id} was accepted in round {seen_in}",
                         received.msg_id)
            return
        problem = self._check_upload(upload, peer, round_, selected)
        if problem is not None:
            self._reject(peer, *problem, reply_to=received.msg_id)
            return
        self.clients[peer].last_seen = time.monotonic()
        if peer in outcome.uploads:  # idempotent: a resend (same message id) or a second upload is acked, ignored
            outcome.duplicates += 1
            log.info("round %d: duplicate upload from %s (message %s) ignored", round_, peer, received.msg_id)
            self._send(peer, Ack(round=round_), round_)
            return
        self._accepted_ids[received.msg_id] = round_
        while len(self._accepted_ids) > _SEEN_IDS:
            del self._accepted_ids[next(iter(self._accepted_ids))]
        for modality, features in upload.features.items():  # folded into the teacher, then not kept
            features = torch.from_numpy(np.array(features, dtype=np.float32))
            self._live.folds[modality].add(peer, features, self.strategy.score(modality, features, self._live.global_features))
        outcome.uploads[peer] = dataclasses.replace(upload, features={})
        self.on_stage(f"round {round_ + 1}/{self.config.rounds}: devices training, "
                      f"{len(outcome.uploads)}/{len(selected)} uploads")
        outcome.arrived_at[peer] = time.monotonic()
        outcome.dropped.pop(peer, None)
        self._send(peer, Ack(round=round_), round_)

    def _check_upload(self, upload: FeatureUpload, peer: str, round_: int,
                      selected: list[str]) -> tuple[ErrorCode, str] | None:
        if peer not in self.clients:
            return ErrorCode.UNKNOWN_CLIENT, f"{peer!r} has not joined; send Join first"
        if upload.client_id != peer:
            return ErrorCode.BAD_FIELD, f"client_id {upload.client_id!r} does not match the sender {peer!r}"
        if upload.round != round_ or peer not in selected:
            return ErrorCode.UNEXPECTED, f"upload for round {upload.round}, but round {round_} is running" + (
                "" if peer in selected else f" without {peer!r}")
        if not self._live.settings.uplink:
            return None
        expected = set(self.clients[peer].modalities)
        if set(upload.features) != expected:
            return ErrorCode.BAD_FIELD, f"features {sorted(upload.features)} but a {self.clients[peer].kind} client sends {sorted(expected)}"
        want = (len(self.public), self.config.feature_dim)
        for modality, tensor in upload.features.items():
            if tuple(tensor.shape) != want:
                return ErrorCode.BAD_SHAPE, f"features/{modality} has shape {tuple(tensor.shape)}, expected {want} (|P| x d)"
        return None

    def _handle_outside_round(self, received: Received, outcome: RoundOutcome | None = None) -> None:
        """Joins, heartbeats, byes and errors, at any time; malformed input gets an Error reply."""
        peer, message = received.peer, received.msg
        if received.error is not None:
            self._reject(peer, received.error.code, received.error.reason)
            return
        if peer in self.clients:
            self.clients[peer].last_seen = time.monotonic()
        if isinstance(message, Join):
            self._admit(peer, message, received.msg_id)
            self._resend_round_start(peer)
        elif isinstance(message, Heartbeat):
            if peer not in self.clients:  # e.g. this server restarted, or dropped it as dead: it must join again
                self._reject(peer, ErrorCode.UNKNOWN_CLIENT, f"{peer!r} has not joined (or was dropped); send Join",
                             received.msg_id)
        elif isinstance(message, Bye):
            if peer in self.clients:
                del self.clients[peer]
                if outcome is not None:
                    outcome.dropped[peer] = Drop(DropReason.LEFT, f"left: {message.reason}")
            else:
                self._reject(peer, ErrorCode.UNKNOWN_CLIENT, f"Bye from {peer!r}, which has not joined", received.msg_id)
        elif isinstance(message, FeatureUpload):
            self._reject(peer, ErrorCode.UNEXPECTED, f"upload for round {message.round} outside a round", received.msg_id)
        else:
            self._reject(peer, ErrorCode.UNEXPECTED, f"a client does not send {type(message).__name__}", received.msg_id)

    def _admit(self, peer: str, join: Join, msg_id: str) -> None:
        if join.client_id != peer:
            self._reject(peer, ErrorCode.BAD_FIELD, f"client_id {join.client_id!r} does not match the sender {peer!r}", msg_id)
            return
        if join.kind not in MODALITIES_OF_KIND:
            self._reject(peer, ErrorCode.BAD_FIELD, f"kind must be one of {sorted(MODALITIES_OF_KIND)}, got {join.kind!r}",
                         msg_id)
            return
        for name, digest in self.backbone_digests.items():
            if join.backbones.get(name) != digest:
                theirs = join.backbones.get(name)
                self._reject(peer, ErrorCode.BACKBONE_MISMATCH,
                             f"this server's towers adapt backbone {name} with weights sha256 {digest[:12]}..., the device "
                             f"has {theirs[:12] + '...' if theirs else 'none'}: install the same backbone package version "
                             f"on both sides", msg_id)
                return
        before = self.clients.get(peer)
        self.clients[peer] = ClientRecord(peer, join.kind, {"image": join.image_arch, "text": join.text_arch},
                                          join.num_private, joined_round=self.next_round)
        if not self._send(peer, Welcome(client_id=peer, run_id=self.run_id, feature_dim=self.config.feature_dim,
                                        rounds=self.config.rounds), self.next_round):
            # Its connection closed before the Welcome (it joins again on a new one): a device that never
            # got its Welcome does not count as joined, so no round starts waiting for it.
            if before is None:
                del self.clients[peer]
            else:
                self.clients[peer] = before
            return
        log.info("%s %s (%s, %d private samples)", "rejoined:" if before else "joined:", peer, join.kind, join.num_private)

    def _resend_round_start(self, peer: str) -> None:
        """A client that (re)joins while its round is collected and has not answered gets the round's
        RoundStart again (same message id): a restarted device resumes from its saved state and can
        still make the round."""
        live = self._live
        if live is None or peer not in self.clients or peer not in live.selected:
            return
        if peer in live.outcome.uploads or peer in live.outcome.dropped:
            return
        log.info("round %d: resending RoundStart to %s after its rejoin", live.round, peer)
        self._send_round_start(self.clients[peer], live.round, live.tower_version, live.global_features, live.settings)

    def _reject(self, peer: str, code: ErrorCode | str, reason: str, reply_to: str = "") -> None:
        """Errors are values: the peer gets an Error naming the problem (and the id of the message it
        refuses), the run records it, serving goes on."""
        log.warning("rejected a message from %s: %s: %s", peer, code, reason)
        self.rejected.append({"peer": peer, "code": str(code), "reason": reason})
        self._send(peer, Error(code=str(code), reason=reason, round=self.round_in_progress, reply_to=reply_to),
                   self.next_round)

    def _take_rejected(self) -> list[dict]:
        taken, self.rejected = self.rejected, []
        return taken

    def _send(self, peer: str, message, round_: int, codecs: dict[str, str] | None = None,
              msg_id: str | None = None) -> bool:
        try:
            self.messenger.send(peer, message, round_, msg_id=msg_id, codecs=codecs)
            return True
        except PeerGone:
            log.warning("cannot reach %s (disconnected)", peer)
            return False

    def _resample_public(self, round_: int) -> None:
        """public_resample: a fresh subset of public_size rows this round, the same for every client."""
        rows = cap_indices(np.arange(len(self.public_all)), self.config.public_size, self.config.seed * 7907 + round_ + 1)
        self.public_rows = np.sort(rows)
        self.public = self.public_all.select(self.public_rows)

    # -- persistence ----------------------------------------------------------------------------
    def _checkpoint(self, round_: int) -> None:
        tensors = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "distill_optimizer": self.distill_optimizer.state_dict(), "consensus": self.consensus}
        save_server_checkpoint(self.run_dir, tensors, round_, self.config, self.run_id)

    def _restore(self) -> dict:
        """The run id, the model and next_round from the checkpoint (refused when the config changed where
        it may not); returns its tensors, whose optimiser states the caller loads once the optimisers exist."""
        check_resume(self.run_dir, self.config)
        tensors, meta = load_server_checkpoint(self.run_dir)
        self.model.load_state_dict(tensors["model"])
        self.consensus = dict(tensors.get("consensus", {}))  # a checkpoint converted from format 2 has none
        self.run_id = meta["run_id"]
        self.next_round = meta["round"] + 1
        # Keep exactly the records of finished rounds (a crash may have happened after the metrics line
        # of a round whose checkpoint did not land, or the reverse).
        metrics = self.run_dir / METRICS_FILE
        if metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if _finished_record(line, meta["round"])]
            atomic_write_bytes(metrics, "".join(line + "\n" for line in kept).encode())
        log.info("resumed run %s from %s after round %d", self.run_id, self.run_dir, meta["round"])
        return tensors

    def _append_metrics(self, record: dict) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        for sink in self.sinks:
            sink.log_round(record)

    def close(self) -> None:
        self.messenger.close()


def link_times(outcome: RoundOutcome, clients: dict[str, ClientRecord]) -> dict[str, dict[str, float]]:
    """Per client: seconds from handing it RoundStart to receiving its upload (`round_trip`), of which the
    device reports `compute` (training, evaluation, feature extraction); the rest is `comm` (the
    downlink and uplink transfers on its link, shaped or real, plus waiting)."""
    out = {}
    for cid, upload in outcome.uploads.items():
        if cid not in clients or cid not in outcome.arrived_at:
            continue
        round_trip = outcome.arrived_at[cid] - clients[cid].round_start_sent_at
        compute = float(upload.metrics.get("compute_seconds", upload.train_seconds))
        out[cid] = {"round_trip": round_trip, "compute": compute, "comm": max(round_trip - compute, 0.0),
                    "num_params": float(upload.metrics.get("num_params", 0.0))}
    return out


def _finished_record(line: str, last_round: int) -> bool:
    """A complete JSON record of a round up to the checkpointed one (a crash can leave half a line)."""
    try:
        return json.loads(line)["round"] <= last_round
    except (ValueError, KeyError, TypeError):
        return False
