"""The cloud server process: its lifecycle (set up, wait for devices, rounds, goodbye) and the round loop,
one call per stage of docs/method.md's round: stage 1, downlink, collect (the devices' stage 2 and uplink),
stage 3, evaluate; then the round's record and checkpoint. Who may join and which uploads count is
admission.py, the record round_record.py, the run folder's files persistence.py; the learning maths lives
in stages.py and each method's server side in strategies/<name>.py."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from fedafd.cloud_server.admission import Admission, ClientRecord
from fedafd.cloud_server.distill import TeacherFold
from fedafd.cloud_server.distributed import ONE_PROCESS, Ranks
from fedafd.cloud_server.public_data import candidate_rows, server_data
from fedafd.cloud_server.persistence import restore_run, save_round, server_tensors
from fedafd.cloud_server.round_record import (Drop, DropReason, RoundFacts, RoundOutcome, quorum_met, round_record,
                                             timed)
from fedafd.cloud_server.stages import (
    GlobalModel, build_optimizers, evaluate_retrieval, extract_features,
)
from fedafd.cloud_server.strategies import build_strategy
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.backbones import backbone_digest
from fedafd.runtime.codecs import wire_codec
from fedafd.runtime.config import ServerConfig, config_to_dict, encoder_archs
from fedafd.runtime.data.partition import cap_indices
from fedafd.runtime.diagnostics import mean_cosine
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.messaging import Received, ServerMessenger
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.torch_utils import (
    OwnRandom, configure_threads, derived_seed, resample_seed, resolve_device, round_seed, seeded_generator,
)
from fedafd.runtime.turns import FREE_TURNS, SERVER, Turns
from fedafd.runtime.transport import PeerGone, ServerTransport
from fedafd.runtime.vocabulary import MODALITIES
from fedafd.runtime.wire import Ack, Bye, FeatureUpload, Join, Message, RoundStart, new_msg_id, new_run_id

if TYPE_CHECKING:
    from fedafd.cloud_server.tracking import RoundSink

log = logging.getLogger("fedafd.cloud")


class ServerError(FedafdError):
    """The federation cannot go on; the message names the setting to change."""


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


_POLL_S = 0.05
"""Longest the set-up thread that answers Joins waits in one poll (how late it stops after set-up)."""


class ServerApp:
    def __init__(self, config: ServerConfig, transport: ServerTransport, run_dir: Path,
                 dead_clients: Callable[[], dict[str, int]] = dict, resume: bool = False,
                 sinks: Sequence[RoundSink] = (), ranks: Ranks = ONE_PROCESS, turns: Turns = FREE_TURNS):
        self.config = config
        self.turns = turns
        """When the server may compute: always in its own process; in the simulation, in its turn."""
        self.ranks = ranks  # rank 0 of the server's data-parallel ranks (distributed.py), or the only process
        self.run_dir = run_dir
        self.sinks = list(sinks)
        """Also given each round's record after its metrics.jsonl line (TensorBoard, MLflow: tracking.py)."""
        self.on_stage: Callable[[str], None] = lambda text: None
        """Told what the server is doing now, in a few words (the CLI shows it as a live status line)."""
        self.counter = ByteCounter()
        self.messenger = ServerMessenger(transport, self.counter)
        self.dead_clients = dead_clients  # --local: child processes that exited (client id -> exit code)
        self.next_round = 0
        self._live: _LiveRound | None = None  # the round being collected, to resend RoundStart on a rejoin
        self.device = resolve_device(config.device)
        configure_threads(config.threads)
        self.random = OwnRandom(derived_seed(config.seed, SERVER))
        """The server's own stream of torch's random numbers (weight init, dropout)."""
        with self.random:
            archs = encoder_archs(config)
            self.model = GlobalModel(archs["image"], archs["text"], config.feature_dim,
                                     config.contrastive_loss, config.adapter_dropout).to(self.device)
        backbones = tuple(sorted(set(self.model.backbones().values())))
        self.backbone_digests = {name: backbone_digest(name) for name in backbones}
        self.run_id = new_run_id()
        """The federation's id, sent in every Welcome; a resumed run keeps its checkpoint's."""
        saved = self._restore() if resume else None  # run_id, next_round, the model; the optimisers' state below
        self.data = server_data(config)  # read before devices join: a Join must name its digest
        self.admission = Admission(self._reply, self.backbone_digests, self.run_id, config.feature_dim, config.rounds,
                                   self.data.digest, self.data.location)
        with self._answering_joins():  # what takes seconds: the data, and the first optimiser imports torch._dynamo
            self.public_all, self.public_test = self.data.load(backbones)
            self.public_candidates = candidate_rows(config, len(self.public_all))
            """The rows P is drawn from (public_subset's, or all); public_rows index public_all."""
            self.public_rows = np.sort(cap_indices(self.public_candidates, config.public_size, config.seed))
            self.public = self.public_all.select(self.public_rows)
            self.optimizer, self.distill_optimizer = build_optimizers(self.model, config.lr, config.distill_lr)
            if saved is not None:
                self.optimizer.load_state_dict(saved["optimizer"])
                self.distill_optimizer.load_state_dict(saved["distill_optimizer"])
            ranks.setup(config_to_dict(config), self.model, (self.optimizer, self.distill_optimizer))
            self.strategy = build_strategy(config)
            if saved is not None:  # a checkpoint converted from format 2 holds no method state
                self.strategy.load_state_tensors(dict(saved.get("consensus", {})))

    @property
    def clients(self) -> dict[str, ClientRecord]:
        """The joined devices (admission.py keeps them)."""
        return self.admission.clients

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
        """docs/method.md's round, one call per stage; then the record, metrics first, then the checkpoint."""
        c = self.config
        generator = self._begin_round(round_)
        settings = self.strategy.settings()
        timings: dict[str, float] = {}
        with timed(timings, "stage1"), self._computing(round_):
            stage1_loss, global_features = self._stage1(round_, generator)
        with timed(timings, "downlink"):
            live = self._downlink(round_, global_features, settings)
        with timed(timings, "collect"):
            self._collect(round_, live.selected, live.outcome)
        outcome = live.outcome
        quorum = quorum_met(len(outcome.uploads), len(live.selected), c.quorum)
        with self._computing(round_):
            with timed(timings, "stage3"):
                teachers, sed_mean_weights = self._teachers(round_, live, quorum)
            with timed(timings, "diagnostics"):  # its own line in timings: what the server's diagnostics cost
                diagnostics = self._diagnose_stage3(live, teachers)
            with timed(timings, "stage3"):
                distill_loss = self._distil(teachers, generator)
            with timed(timings, "eval"):
                server_metrics = evaluate_retrieval(self.model, self.public_test, self.device, self.ranks)
        if c.on_bad_sample == "skip":
            server_metrics["skipped_rows"] = float(self.data.skipped_rows())
        if "r1_sum_before_stage3" in diagnostics:  # stage 3 ran: the eval above is its "after"
            diagnostics["r1_sum_after_stage3"] = server_metrics["r1_sum"]
            diagnostics["stage3_r1_sum_delta"] = server_metrics["r1_sum"] - diagnostics["r1_sum_before_stage3"]
        record = round_record(RoundFacts(
            round=round_, strategy=c.strategy, outcome=outcome, clients=self.clients, selected=live.selected,
            server=dict(server_metrics, stage1_loss=stage1_loss, distill_loss=distill_loss),
            sed_mean_weights=sed_mean_weights, rejected=self.admission.take_rejected(), quorum=quorum,
            public_size=len(self.public), counter=self.counter,
            codecs={"features": c.feature_codec, "tower": c.tower_codec}, timings=timings,
            server_diagnostics=diagnostics))
        save_round(self.run_dir, record, self._checkpoint_tensors(), c, self.run_id, self.sinks)
        self.admission.round_in_progress = -1
        return record

    @contextlib.contextmanager
    def _computing(self, round_: int) -> Iterator[None]:
        """The server trains or evaluates: in its turn, drawing its own random numbers."""
        with self.turns.take(SERVER, round_), self.random:
            yield

    def _begin_round(self, round_: int) -> torch.Generator:
        """This round's messages count under it; the round's seeded generator, the public rows it trains on
        (resampled with public_resample), shared with the other server ranks."""
        c = self.config
        self.admission.round_in_progress = round_
        self.messenger.current_round = round_
        generator = seeded_generator(round_seed(c.seed, round_))
        if c.public_resample and c.public_size:
            self._resample_public(round_)
        self.ranks.start_round(round_, self.public_rows, generator)
        return generator

    def _stage1(self, round_: int, generator: torch.Generator) -> tuple[float, dict[str, torch.Tensor]]:
        """Stage 1: the global encoders trained on the public pairs; (the last epoch's loss, their public
        features G per modality, (P, d) on the CPU)."""
        c = self.config
        self.on_stage(f"round {round_ + 1}/{c.rounds}: stage 1, training the global encoders on {len(self.public)} public pairs")
        stage1_loss = self.strategy.train_public(self.model, self.optimizer, self.public, generator, self.device,
                                                  self.ranks)
        global_features = {m: extract_features(self.model.encoders[m], self.public, m, self.device, ranks=self.ranks).cpu()
                           for m in MODALITIES}
        return stage1_loss, global_features

    def _downlink(self, round_: int, global_features: dict[str, torch.Tensor], settings: MethodSettings) -> _LiveRound:
        """Downlink: a RoundStart to every joined device (the round's selection); one whose connection is
        gone is dropped from the round."""
        selected = list(self.clients)
        tower_version = round_ + 1  # the encoders change every round (stage 1 and stage 3)
        self._live = live = _LiveRound(round_, tower_version, global_features, settings, selected, RoundOutcome(),
                                       folds={m: TeacherFold() for m in MODALITIES})
        for client_id in selected:
            if client_id in live.outcome.uploads or client_id not in self.clients:  # its rejoin got it, or it left
                continue
            if not self._send_round_start(self.clients[client_id], round_, tower_version, global_features, settings):
                live.outcome.dropped[client_id] = Drop(DropReason.NOT_CONNECTED, "not connected when the round started")
            self._take_arrived(round_, selected, live.outcome)
        return live

    def _teachers(self, round_: int, live: _LiveRound, quorum: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
        """Stage 3 (SED), its first half: with the quorum met, each modality's teacher folded from the round's
        uploads, on the server's device and shared with the other ranks; (the teachers, the mean SED weight
        per modality and client). The strategy keeps what it carries to the next round (FedMD's consensus)."""
        c, settings = self.config, live.settings
        self.on_stage(f"round {round_ + 1}/{c.rounds}: stage 3, distilling from {len(live.outcome.uploads)} uploads")
        sed_mean_weights, teachers = {}, {}
        if settings.uplink and quorum:
            teachers = {m: fold.teacher() for m, fold in live.folds.items() if len(fold)}
            sed_mean_weights = {m: fold.mean_weights() for m, fold in live.folds.items() if len(fold)}
            self.strategy.keep(teachers)
        teachers = {m: t.to(self.device) for m, t in self.ranks.share_teachers(teachers).items()}
        return teachers, sed_mean_weights

    def _diagnose_stage3(self, live: _LiveRound, teachers: dict[str, torch.Tensor]) -> dict:
        """The server's learning diagnostics (docs/implementation.md "Learning diagnostics"), per modality with a teacher: the
        normalised entropy of the SED weights (`sed_entropy`; left out with one client, where it is undefined)
        and the mean cosine between the teacher and the server's stage-1 G of the same rows (`teacher_cos`);
        and, when stage 3 is about to distil, the server's R@1 sum before it (`r1_sum_before_stage3`: one more
        retrieval evaluation, which every server rank joins). {} when no teacher was made (LOCAL, no quorum)."""
        diagnostics: dict = {}
        for modality, teacher in teachers.items():
            by_modality = diagnostics[modality] = {"teacher_cos": mean_cosine(teacher, live.global_features[modality])}
            entropy = live.folds[modality].weight_entropy()
            if entropy is not None:
                by_modality["sed_entropy"] = entropy
        if teachers and self.config.distill_epochs > 0:  # worker.py evaluates here too, on the same condition
            before = evaluate_retrieval(self.model, self.public_test, self.device, self.ranks)
            diagnostics["r1_sum_before_stage3"] = before["r1_sum"]
        return diagnostics

    def _distil(self, teachers: dict[str, torch.Tensor], generator: torch.Generator) -> float:
        """Stage 3, its second half: the teachers distilled into the global encoders, distill_epochs epochs;
        the last epoch's loss (0.0 without teachers: no stage 3)."""
        return self.strategy.distil(self.model, self.distill_optimizer, self.public, teachers, generator, self.device,
                                    self.ranks)

    def _send_round_start(self, client: ClientRecord, round_: int, tower_version: int,
                          global_features: dict[str, torch.Tensor], settings: MethodSettings) -> bool:
        c = self.config
        plan = self.strategy.downlink(client.modalities, settings, self.model, len(self.public))
        tower: dict[str, np.ndarray] = {}
        if client.tower_version_sent != tower_version:  # only when they changed
            tower = {k: v.numpy() for k, v in self.model.tower_state(plan.towers).items()}
        backbones = self.model.backbones()
        message = RoundStart(
            round=round_,
            local_epochs=c.local_epochs,
            tower_version=tower_version,
            public_indices=self.public_rows.astype(np.int64),
            global_features={m: global_features[m].numpy() for m in plan.global_features},
            tower=tower,
            tower_arch={m: self.model.archs[m] for m in plan.towers},
            settings=settings,
            consensus=plan.consensus,
            backbones={backbones[m]: self.backbone_digests[backbones[m]] for m in plan.towers if m in backbones},
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

    def _collect(self, round_: int, selected: list[str], outcome: RoundOutcome) -> RoundOutcome:
        """Uploads until every selected client answered, or the deadline; silent or dead clients drop
        (and are forgotten until they join again, so the next round does not wait for them)."""
        c = self.config
        self.on_stage(f"round {round_ + 1}/{c.rounds}: devices training, 0/{len(selected)} uploads")
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
            if received is not None:
                self._handle_in_round(received, round_, selected, outcome)
        for cid, drop in outcome.dropped.items():
            log.warning("round %d: %s dropped: %s", round_, cid, drop.text)
            if drop.reason is not DropReason.DEADLINE:  # a straggler stays for the next round
                self.clients.pop(cid, None)
        self._live = None  # collected: a device that rejoins now waits for the next RoundStart
        return outcome

    def _handle_in_round(self, received: Received, round_: int, selected: list[str], outcome: RoundOutcome) -> None:
        if isinstance(received.msg, FeatureUpload) and received.error is None:
            self._accept_upload(received, round_, selected, outcome)
        else:
            self._handle_outside_round(received, outcome)

    def _take_arrived(self, round_: int, selected: list[str], outcome: RoundOutcome) -> None:
        """Between the downlink's RoundStarts: what already arrived, without waiting. The first devices
        answer while the last RoundStarts go out; their uploads are folded now instead of piling up in
        the socket's queues (memory O(devices x upload) with a thousand devices)."""
        while (received := self.messenger.recv(0.0)) is not None:
            self._handle_in_round(received, round_, selected, outcome)

    def _accept_upload(self, received: Received, round_: int, selected: list[str], outcome: RoundOutcome) -> None:
        upload: FeatureUpload = received.msg
        peer = received.peer
        problem = self.admission.check_upload(received, round_, selected, self._live.settings.uplink,
                                              (len(self.public), self.config.feature_dim))
        if problem is not None:
            self.admission.reject(peer, *problem, reply_to=received.msg_id)
            return
        self.clients[peer].last_seen = time.monotonic()
        if peer in outcome.uploads:  # idempotent: a resend (same message id) or a second upload is acked, ignored
            outcome.duplicates += 1
            log.info("round %d: duplicate upload from %s (message %s) ignored", round_, peer, received.msg_id)
            self._send(peer, Ack(round=round_), round_)
            return
        self.admission.accepted(received.msg_id, round_)
        for modality, features in upload.features.items():  # folded into the teacher, then not kept
            features = torch.from_numpy(np.array(features, dtype=np.float32))
            self._live.folds[modality].add(peer, features, self.strategy.score(modality, features, self._live.global_features))
        outcome.uploads[peer] = dataclasses.replace(upload, features={})
        self.on_stage(f"round {round_ + 1}/{self.config.rounds}: devices training, "
                      f"{len(outcome.uploads)}/{len(selected)} uploads")
        outcome.arrived_at[peer] = time.monotonic()
        outcome.dropped.pop(peer, None)
        # Before the Ack: what a device was told was kept is in this log (benchmarks/chaos.py checks it).
        log.info("round %d: accepted upload %s from %s", round_, received.msg_id, peer)
        self._send(peer, Ack(round=round_), round_)

    def _handle_outside_round(self, received: Received, outcome: RoundOutcome | None = None) -> None:
        """Joins, heartbeats, byes and errors, at any time (admission.py answers them); a device that joins
        while its round is collected gets the RoundStart again, one that says Bye leaves the round."""
        left = self.admission.handle(received, self.next_round)
        if isinstance(received.msg, Join):
            self._resend_round_start(received.peer)
        if left is not None and outcome is not None:
            outcome.dropped[received.peer] = Drop(DropReason.LEFT, f"left: {left}")

    def _resend_round_start(self, peer: str) -> None:
        """A client that (re)joins while its round is collected and has not answered gets the round's
        RoundStart again (same message id): a restarted device resumes from its saved state and can
        still make the round, also when it was already counted as dropped (not connected when the round
        started, or silent): it is taken off the round's dropped, so it is also not forgotten at its end."""
        live = self._live
        if live is None or peer not in self.clients or peer not in live.selected or peer in live.outcome.uploads:
            return
        live.outcome.dropped.pop(peer, None)
        log.info("round %d: resending RoundStart to %s after its rejoin", live.round, peer)
        self._send_round_start(self.clients[peer], live.round, live.tower_version, live.global_features, live.settings)

    def _reply(self, peer: str, message: Message) -> bool:
        """Admission's answers (Welcome, Error), counted under the next round."""
        return self._send(peer, message, self.next_round)

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
        rows = cap_indices(self.public_candidates, self.config.public_size, resample_seed(self.config.seed, round_))
        self.public_rows = np.sort(rows)
        self.public = self.public_all.select(self.public_rows)

    # -- persistence ----------------------------------------------------------------------------
    def _checkpoint_tensors(self) -> dict:
        return server_tensors(self.model, self.optimizer, self.distill_optimizer, self.strategy.state_tensors())

    def _restore(self) -> dict:
        """The run id, the model and next_round from the checkpoint (persistence.restore_run); returns its
        tensors, whose optimiser states the caller loads once the optimisers exist."""
        tensors, meta = restore_run(self.run_dir, self.config)
        self.model.load_state_dict(tensors["model"])
        self.run_id = meta["run_id"]
        self.next_round = meta["round"] + 1
        return tensors

    def close(self) -> None:
        self.messenger.close()
