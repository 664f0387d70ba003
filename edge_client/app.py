"""The edge device process: join, then for every RoundStart train, evaluate, upload public features."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedafd.edge_client.diagnostics import DeviceDiagnostics
from fedafd.edge_client.model import LocalModel, GlobalTowers
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.state import (
    STATE_CONFIG_FILE, STATE_ROOT, ClientState, StateError, load_state, save_state, state_folder,
)
from fedafd.edge_client.objectives import objective_for
from fedafd.edge_client.privacy import (
    PrivacyBudget, noisy_upload, sample_rate, steps_per_epoch, upload_noise_generator,
)
from fedafd.edge_client.training import (
    G_from_towers, Optimizers, evaluate, prepare_round, train_private_round, train_round,
)
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.messaging import ClientMessenger
from fedafd.runtime.codecs import wire_codec
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.config import ClientConfig, encoder_archs, server_archs, write_config
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.data.modal import ModalData, load_public_data, public_source, public_spec
from fedafd.runtime.diagnostics import DIAG_PREFIX, diagnostics_to_metrics, mean_cosine
from fedafd.runtime.backbones import backbone_digest, backbone_fix, modality_backbones, tower_tables
from fedafd.runtime.models import backbone_of, count_parameters, use_dropout_generator
from fedafd.runtime.torch_utils import (
    OwnRandom, configure_threads, derived_seed, device_seed, resolve_device, round_seed, seeded_generator,
)
from fedafd.runtime.turns import FREE_TURNS, JOINING, Turns
from fedafd.runtime.transport import ClientTransport, TransportError
from fedafd.runtime.vocabulary import MODALITIES, MODALITIES_OF_KIND
from fedafd.runtime.wire import (
    Ack, Bye, Error, ErrorCode, FeatureUpload, Heartbeat, Join, RoundStart, Welcome, new_msg_id,
)

log = logging.getLogger("fedafd.edge")


JOIN_BACKOFF_S = 5.0
"""How long to wait for a Welcome before looking at the connection again. While the connection the Join
went out on stays up, the Join is in the server's queue (a busy server answers between its training
stages) and the device goes on waiting; otherwise it opens a fresh connection and joins again."""
JOIN_BACKOFF_MAX_S = 30.0
"""Longest wait between join attempts (the wait doubles each attempt)."""


class EdgeError(FedafdError):
    """The device cannot go on (no server, server refused it); the message says what to change."""


@dataclass
class SentUpload:
    """The last upload, kept so that the same RoundStart resent after a rejoin gets the same upload (same
    message id) instead of a second training; its features are let go once the server acknowledged it."""

    start_id: str  # the RoundStart's message id
    upload: FeatureUpload | None  # None once acknowledged
    upload_id: str
    codecs: dict[str, str]


@dataclass
class RoundReport:
    round: int
    metrics: dict[str, float]
    losses: dict[str, float]
    train_seconds: float
    upload_bytes: int


class EdgeApp:
    def __init__(self, config: ClientConfig, transport: ClientTransport, state_dir: Path | None = None,
                 state_root: Path = STATE_ROOT, turns: Turns = FREE_TURNS, state_in_memory: bool = True):
        self.config = config
        self.turns = turns
        """When this device may compute: always in its own process; in the simulation, in its turn."""
        self.state_in_memory = state_in_memory
        """False (the simulation): between rounds the model, optimisers and towers live only in the saved
        state on disk, so a device that is not training holds little more than its data."""
        self.state_dir = state_dir
        """Where the state lives: as given (--state-dir), or state_root/<run id>/<client id> once the
        server's Welcome names its federation."""
        self.state_root = state_root
        self.counter = ByteCounter()
        self.messenger = ClientMessenger(transport, self.counter, config.client_id)
        self.device = resolve_device(config.device)
        configure_threads(config.threads)
        self.random = OwnRandom(derived_seed(config.seed, config.client_id))
        """This device's own stream of torch's global random numbers, for its model's initialisation."""
        self.dropout_generator = seeded_generator(derived_seed(config.seed, f"{config.client_id}/dropout"))
        """Its own stream of dropout masks: a round never draws from torch's global random numbers, so devices
        may train at the same time in one process (the simulation's workers) and still draw as when alone."""
        self.archs = encoder_archs(config)
        """Modality -> the architecture of this device's encoder (an adapter over a tower of its own: tower_*@NAME)."""
        # Cached backbone features: of the private data for the device's modalities; of the public set for
        # both, since G of the other modality is computed here from its tower.
        own = MODALITIES_OF_KIND[config.kind]
        self.private = load_private_data(config, backbones=self._backbones(own))
        public = public_spec(config.public_data, config.public_data_config, config.on_bad_sample)
        self.public: ModalData = load_public_data("train", self._backbones(MODALITIES), public)
        self.public_digest = public_source(public).digest
        """sha256 of the public set's rows, named in the Join (the server refuses another public set)."""
        self.backbones = {name: backbone_digest(name) for name in self._backbones(MODALITIES)}
        self.state: ClientState | None = None
        self.run_id = ""
        """The federation this device serves (from the Welcome)."""
        self.reports: list[RoundReport] = []
        self.feature_dim = 0  # from the Welcome
        self._last_upload: SentUpload | None = None

    def _backbones(self, modalities: tuple[str, ...]) -> tuple[str, ...]:
        """The frozen backbones whose features this device reads for `modalities`: its own encoders' (of its
        kind's modalities) and the server's towers' (server_*_tower, else the shipped backbones)."""
        server = server_archs(self.config)
        names = {server.get(m) or b for m in modalities for b in modality_backbones((m,))}
        names |= {backbone_of(self.archs[m]) for m in modalities if m in MODALITIES_OF_KIND[self.config.kind]}
        return tuple(sorted(names - {None}))

    # -- protocol -------------------------------------------------------------------------------
    def run(self) -> list[RoundReport]:
        """Join, serve rounds until the server says Bye. Ctrl-C sends Bye so the server stops waiting."""
        try:
            with self.turns.take(self.config.client_id, JOINING), self.random:  # the model's init draws
                welcome = self._join()
                try:
                    self._build_state(welcome)
                except StateError as err:  # tell the server, so no round waits for this device
                    self.messenger.send(Bye(reason=f"cannot continue its saved state: {err}"), round=-1)
                    raise
            while True:
                received = self._recv(self.config.round_wait_s, "the server's next round", idle_beats=True)
                message = received.msg
                if isinstance(message, RoundStart):
                    self._serve_round(message, received.msg_id)
                elif isinstance(message, Bye):
                    log.info("%s: server says bye (%s)", self.config.client_id, message.reason)
                    return self.reports
                elif isinstance(message, Error) and message.code == ErrorCode.UNKNOWN_CLIENT:
                    # The server restarted (or dropped us as dead): join again, keep the local state.
                    log.warning("%s: server does not know us (%s); joining again", self.config.client_id, message.reason)
                    again = self._join()
                    if again.run_id != welcome.run_id:
                        raise EdgeError(f"the server came back running federation {again.run_id!r}, not "
                                        f"{welcome.run_id!r} (restarted without --resume); start this device again")
                    if again.feature_dim != welcome.feature_dim:
                        raise EdgeError("the server came back with another feature_dim; start this device afresh")
                elif isinstance(message, Error):
                    log.warning("%s: server error %s: %s", self.config.client_id, message.code, message.reason)
                elif isinstance(message, Ack):
                    acked = "?"
                    if self._last_upload is not None and self._last_upload.upload is not None \
                            and self._last_upload.upload.round == message.round:
                        acked, self._last_upload.upload = self._last_upload.upload_id, None  # kept: no resend needed
                    log.info("%s round %d: upload %s acknowledged", self.config.client_id, message.round, acked)
                elif not isinstance(message, Welcome):
                    log.warning("%s: ignoring unexpected %s", self.config.client_id, type(message).__name__)
        except KeyboardInterrupt:
            self.messenger.send(Bye(reason="interrupted"), round=-1)
            raise

    def _join(self) -> Welcome:
        """Join, and wait for the Welcome until connect_timeout_s. A Join that went out on a connection that
        is still up is waited for (re-sending or reconnecting would only queue more Joins behind it, and
        answer them on a dead connection); one that did not (server not reached, or the connection
        dropped) is sent again on a fresh connection, with exponential backoff (JOIN_BACKOFF_S doubling
        up to JOIN_BACKOFF_MAX_S)."""
        c = self.config
        archs = {"image": self.archs["image"] if c.kind != "text" else "",
                 "text": self.archs["text"] if c.kind != "image" else ""}
        join = Join(client_id=c.client_id, kind=c.kind, image_arch=archs["image"], text_arch=archs["text"],
                    num_private=len(self.private.train), backbones=self.backbones, public_digest=self.public_digest)
        what = ("the server's Welcome (is `fedafd-cloud serve` running at that address? with CURVE: is the server "
                "key right and this device's key allow-listed? raise connect_timeout_s to wait longer)")
        deadline = time.monotonic() + c.connect_timeout_s
        wait_s, attempt = JOIN_BACKOFF_S, 0
        while True:
            if attempt:
                log.info("%s: no Welcome yet; reconnecting (attempt %d, next wait %.0fs)", c.client_id, attempt + 1, wait_s)
                reconnect = getattr(self.messenger.transport, "reconnect", None)
                if reconnect is not None:
                    reconnect()  # a fresh connection: the old one may be dead or refused
            try:
                join_id = new_msg_id()
                sent_on = self._connection()
                self.messenger.send(join, round=-1, msg_id=join_id)
                # Only an Error that answers this Join refuses it; others answer messages sent before
                # (e.g. an upload the restarted server no longer expects).
                wanted = (lambda r: isinstance(r.msg, Welcome) or (
                    isinstance(r.msg, Error) and r.msg.reply_to == join_id))
                for waited in itertools.count(1):
                    try:
                        received = self._recv_until(min(deadline, time.monotonic() + wait_s), c.connect_timeout_s,
                                                    what, wanted)
                        break
                    except EdgeError:
                        if time.monotonic() >= deadline or not self._still_connected(sent_on):
                            raise
                        log.log(logging.INFO if waited == 1 else logging.DEBUG,
                                "%s: connected, no Welcome yet (the server is busy); waiting", c.client_id)
            except (EdgeError, TransportError):
                if time.monotonic() >= deadline:
                    raise EdgeError(f"{c.client_id}: timed out after {c.connect_timeout_s:.0f}s waiting for {what}") from None
                attempt, wait_s = attempt + 1, min(wait_s * 2, JOIN_BACKOFF_MAX_S)
                continue
            if isinstance(received.msg, Error):
                raise EdgeError(f"server refused {c.client_id}: {received.msg.code}: {received.msg.reason}")
            return received.msg

    def _connection(self) -> tuple[int, bool] | None:
        """The transport's (handshakes, up), or None when it cannot tell (see ZmqClientTransport.connection)."""
        connection = getattr(self.messenger.transport, "connection", None)
        return None if connection is None else connection()

    def _still_connected(self, sent_on: tuple[int, bool] | None) -> bool:
        """Whether a message sent while the connection read `sent_on` went out on a connection that is
        still up, so that it waits in the server's socket."""
        now = self._connection()
        if sent_on is None or now is None:
            return False
        handshakes, up = sent_on
        return now[1] and now[0] == (handshakes if up else handshakes + 1)

    def _recv_until(self, deadline: float, timeout_s: float, what: str, wanted) -> object:
        """The first message `wanted(received)` accepts before `deadline`; others (stale errors, a
        RoundStart for a round we missed) are skipped."""
        while True:
            received = self._recv(max(deadline - time.monotonic(), 0.001), what, timeout_label=timeout_s)
            if wanted(received):
                return received

    def _recv(self, timeout_s: float, what: str, idle_beats: bool = False, timeout_label: float | None = None):
        """The next well-formed message. With `idle_beats`, a Heartbeat goes out every heartbeat_s while
        waiting, so a server that restarted answers unknown_client and this device joins again."""
        deadline = time.monotonic() + timeout_s
        next_beat = time.monotonic() + self.config.heartbeat_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EdgeError(f"{self.config.client_id}: timed out after "
                                f"{timeout_label if timeout_label is not None else timeout_s:.0f}s waiting for {what}")
            if idle_beats and time.monotonic() >= next_beat:
                self._beat(self.messenger.current_round, "idle")
                next_beat = time.monotonic() + self.config.heartbeat_s
            received = self.messenger.recv(min(left, 1.0, self.config.heartbeat_s) if idle_beats else min(left, 1.0))
            if received is None:
                continue
            if received.error is not None:
                log.warning("%s: dropped a malformed message: %s", self.config.client_id, received.error)
                continue
            return received

    def _beat(self, round_: int, stage: str) -> None:
        """A heartbeat that never stops the device: a full queue (server busy or gone) skips this one."""
        try:
            self.messenger.send(Heartbeat(client_id=self.config.client_id, round=max(round_, -1), stage=stage), round=round_)
        except TransportError as e:
            log.debug("%s: heartbeat not sent: %s", self.config.client_id, e)

    # -- one round ------------------------------------------------------------------------------
    def _build_state(self, welcome: Welcome) -> None:
        c = self.config
        self.run_id, self.feature_dim = welcome.run_id, welcome.feature_dim
        if self.state_dir is None:
            self.state_dir = state_folder(self.state_root, welcome.run_id, c.client_id)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("%s: joined run %s; state in %s", c.client_id, welcome.run_id, self.state_dir)
        write_config(c, self.state_dir / STATE_CONFIG_FILE)
        self.state = self._load_state()
        if self.state.last_round >= 0:
            log.info("%s: resumed local state of run %s after round %d", c.client_id, self.run_id,
                     self.state.last_round)
        elif not self.state_in_memory:  # the freshly initialised model waits on disk for the first round
            save_state(self.state_dir, self.state, self._identity(self.feature_dim))
        if not self.state_in_memory:
            self.state = None

    def _load_state(self) -> ClientState:
        """The model, its optimisers and the server's towers: fresh, then overwritten by the saved state
        when there is one (a restarted device, or one whose state waited on disk between rounds)."""
        c = self.config
        model = LocalModel(c.kind, self.archs["image"], self.archs["text"], self.feature_dim, self.private.num_classes,
                           c.adapter_dropout, c.head, c.head_scale,
                           fusion_norm="layer" if c.dp else "batch").to(self.device)  # DP: no BatchNorm
        use_dropout_generator(model, self.dropout_generator)
        state = ClientState(model, Optimizers.create(model, c.lr, c.disc_lr, c.fusion_lr), GlobalTowers(self.feature_dim, self.device))
        load_state(self.state_dir, state, self._identity(self.feature_dim))
        return state

    def _identity(self, feature_dim: int) -> dict:
        c = self.config
        return {"client_id": c.client_id, "kind": c.kind, "image_arch": self.archs["image"], "text_arch": self.archs["text"],
                "towers": tower_tables(self.backbones),
                "feature_dim": feature_dim, "run_id": self.run_id}

    def _serve_round(self, start: RoundStart, start_id: str = "") -> None:
        c = self.config
        last = self._last_upload
        if start_id and last is not None and last.start_id == start_id and last.upload is not None:
            # The same RoundStart again (the server resent it after we rejoined): resend the same upload,
            # same message id, so the server keeps exactly one; never train a round twice.
            log.info("%s round %d: RoundStart again; resending upload %s", c.client_id, start.round, last.upload_id)
            self.messenger.send(last.upload, round=start.round, msg_id=last.upload_id, codecs=last.codecs)
            return
        with self.turns.take(c.client_id, start.round):
            train_seconds = self._train(start, start_id)
        with self.turns.deliver(c.client_id, start.round):  # the simulation's uploads arrive in the fleet's order
            upload = self._last_upload
            sent = self.messenger.send(upload.upload, round=start.round, msg_id=upload.upload_id, codecs=upload.codecs)
        if not self.state_in_memory:  # saved: it waits on disk until the next round
            self.state = None
        metrics, losses = upload.upload.metrics, upload.upload.losses
        self.reports.append(RoundReport(start.round, metrics, losses, train_seconds, sent))
        log.info("%s round %d: %s | losses %s | %.1fs train | %d bytes up (upload %s)", c.client_id, start.round,
                 _fmt({k: v for k, v in metrics.items() if not k.startswith(DIAG_PREFIX)}), _fmt(losses),
                 train_seconds, sent, upload.upload_id)

    def _train(self, start: RoundStart, start_id: str) -> float:
        """Stage 2 and what follows on the device: train, evaluate, save the state, and make the upload
        (kept in self._last_upload for the caller to send). Returns the training's seconds. The glue: each
        part is a method below (what the downlink brings, training under a privacy budget, the metrics, the
        uplink); the learning itself is training.py's."""
        c = self.config
        if self.state is None:  # it waited on disk since the last round (the rebuilt model's init draws
            self.state = self._load_state()  # from torch's global stream, which no device's round reads)
        state = self.state
        log.info("%s round %d: training", c.client_id, start.round)
        self.messenger.current_round = start.round
        settings = start.settings
        rows, G, consensus = self._downlink(start, state)
        last_beat = [time.monotonic()]

        def heartbeat() -> None:
            if time.monotonic() - last_beat[0] >= c.heartbeat_s:
                self._beat(start.round, "train")
                last_beat[0] = time.monotonic()

        started = time.perf_counter()
        diagnostics = DeviceDiagnostics()
        seed = device_seed(c.seed, c.partition)
        round_ = prepare_round(state.model, state.optimizers, state.towers, self.private.train, settings, start.round,
                               start.local_epochs, c.batch_size, seed, self.device,
                               self.public, rows, G, consensus, diagnostics, c.local_task_weight)
        objective = objective_for(round_)
        losses, privacy = self._train_objective(objective, start, state, seed, heartbeat)
        train_seconds = time.perf_counter() - started
        metrics = evaluate(state.model, state.towers, self.private.test, settings.gff, self.device,
                           torch.from_numpy(np.array(self.private.train.labels)), diagnostics)
        # The model's size travels with the metrics so the server can price FedAvg for the same model.
        metrics["num_params"] = float(count_parameters(state.model))
        if c.on_bad_sample == "skip":  # the bad rows left out of its data, so the run says what it trained without
            metrics["skipped_rows"] = float(self.private.skipped)
        uplink = self._uplink(objective, seed, start.round, G, diagnostics)
        metrics.update(privacy)  # what it has spent so far, and whether it still trains
        # Diagnostics ride in the metrics under diag_ keys (no wire change); the server files them apart.
        metrics.update(diagnostics_to_metrics(diagnostics.result()))
        # Training + evaluation + feature extraction: what the server subtracts from the round trip to
        # get this device's communication time.
        metrics["compute_seconds"] = time.perf_counter() - started
        state.last_round = start.round
        save_state(self.state_dir, state, self._identity(state.towers.feature_dim))
        upload = FeatureUpload(
            round=start.round, client_id=c.client_id,
            features={m: f.numpy().astype(np.float32, copy=False) for m, f in uplink.items()},
            metrics=metrics, losses=losses, train_seconds=train_seconds,
        )
        self._last_upload = SentUpload(start_id, upload, new_msg_id(), {"features": self._uplink_codec(settings)})
        return train_seconds

    def _downlink(self, start: RoundStart, state: ClientState
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What the RoundStart brings, made ready: the server's towers (when sent; the local encoders copy them
        once with local_init=global), the round's public rows, G of both modalities (a modality the server did
        not send computed here from its tower, which is cheaper on the wire) and the consensus."""
        c, settings = self.config, start.settings
        if start.tower:
            self._check_backbones(start.backbones)
            state.towers.load(start.tower_version, dict(start.tower_arch),
                              {name: torch.from_numpy(np.array(t)) for name, t in start.tower.items()})
        if settings.local_init == "global" and state.last_round < 0:
            copied = state.model.start_from(state.towers, self.archs)
            log.info("%s: local encoder(s) %s start from the server's towers", c.client_id, list(copied) or "none")
        rows = torch.from_numpy(np.array(start.public_indices, dtype=np.int64))
        needs = settings.needs()
        G = {m: torch.from_numpy(np.array(f, dtype=np.float32)) for m, f in start.global_features.items()}
        missing = tuple(m for m in MODALITIES if needs.global_features and m not in G and state.towers.has(m))
        G.update(G_from_towers(state.towers, self.public, rows, missing, self.device))
        if needs.global_features and set(G) != set(MODALITIES):
            raise EdgeError(f"the server's {settings.strategy} needs the global features of both modalities, "
                            f"RoundStart gave {sorted(G)}")
        consensus = {m: torch.from_numpy(np.array(f, dtype=np.float32)) for m, f in start.consensus.items()}
        return rows, G, consensus

    def _train_objective(self, objective, start: RoundStart, state: ClientState, seed: int,
                         heartbeat: Callable[[], None]) -> tuple[dict[str, float], dict[str, float]]:
        """The round's training: plain, or DP-SGD while the privacy budget affords the round's steps (past it the
        device no longer trains, and still evaluates and uploads). Returns (the mean loss parts, the privacy
        metrics: spent and budget epsilon, delta, whether it trained; {} without dp)."""
        c = self.config
        if not c.dp:
            return train_round(objective, heartbeat), {}
        budget = self._privacy_budget(state)
        steps = start.local_epochs * steps_per_epoch(len(self.private.train), c.batch_size)
        rate = sample_rate(len(self.private.train), c.batch_size)
        trains = budget.affords(steps, rate)
        losses: dict[str, float] = {}
        if trains:
            losses = train_private_round(objective, budget, c.lr, round_seed(seed, start.round), heartbeat, c.fusion_lr)
            state.dp_history = budget.history
        else:
            log.warning("%s round %d: privacy budget: this round's %d DP-SGD steps would take epsilon from %.3g "
                        "to %.3g, past dp_epsilon=%g (delta %g); the device no longer trains, it still evaluates "
                        "and uploads", c.client_id, start.round, steps, budget.spent(),
                        budget.epsilon_after(steps, rate), budget.epsilon, budget.delta)
        return losses, {"dp_epsilon": budget.spent(), "dp_budget": budget.epsilon, "dp_delta": budget.delta,
                        "dp_training": float(trains)}

    def _uplink(self, objective, seed: int, round_: int, G: dict[str, torch.Tensor],
                diagnostics: DeviceDiagnostics) -> dict[str, torch.Tensor]:
        """The features that go up (with upload_noise, clipped and noised), and how close they are to the server's
        G of the same rows, where held (a diagnostic)."""
        c = self.config
        uplink = objective.uplink()
        if c.upload_noise > 0:
            uplink = noisy_upload(uplink, c.upload_clip, c.upload_noise, upload_noise_generator(seed, round_))
        with diagnostics.timing():
            for modality, features in uplink.items():
                if modality in G:
                    diagnostics.put("upload_cos", mean_cosine(features, G[modality]), modality)
        return uplink

    def _privacy_budget(self, state: ClientState) -> PrivacyBudget:
        c = self.config
        return PrivacyBudget(c.dp_epsilon, c.dp_delta, c.dp_noise, c.dp_clip, list(state.dp_history))

    def _check_backbones(self, server_backbones: dict[str, str]) -> None:
        """The server's towers adapt frozen backbones: this device must hold the very same weights."""
        for name, digest in server_backbones.items():
            mine = self.backbones.get(name)
            if mine != digest:
                raise EdgeError(f"the server's towers adapt backbone {name} with weights sha256 {digest[:12]}..., this "
                                f"device has {mine[:12] + '...' if mine else 'none'}; {backbone_fix(name)}")

    def _uplink_codec(self, settings: MethodSettings) -> str:
        """The wire codec of this round's feature upload, as the server's feature_codec setting says (the
        settings were checked on decode: the name is a known codec)."""
        return wire_codec(settings.feature_codec)

    def close(self) -> None:
        self.messenger.close()


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in values.items())
