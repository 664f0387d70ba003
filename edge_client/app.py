"""The edge device process: join, then for every RoundStart train, evaluate, upload public features."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedafd.edge_client.model import LocalModel, GlobalTowers
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.state import ClientState, load_state, save_state
from fedafd.edge_client.training import Optimizers, RoundPlan, evaluate, public_features, train_round
from fedafd.runtime.accounting import ByteCounter, ClientMessenger
from fedafd.runtime.codecs import FEATURE_CODECS, wire_codec
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.config import ClientConfig
from fedafd.runtime.data.modal import ModalData, load_public_data
from fedafd.runtime.models import count_parameters
from fedafd.runtime.torch_utils import configure_threads, resolve_device
from fedafd.runtime.transport import ClientTransport
from fedafd.runtime.wire import Ack, Bye, Error, FeatureUpload, Heartbeat, Join, RoundStart, Welcome

log = logging.getLogger("fedafd.edge")


class EdgeError(FedafdError):
    """The device cannot go on (no server, server refused it); the message says what to change."""


@dataclass
class RoundReport:
    round: int
    metrics: dict[str, float]
    losses: dict[str, float]
    train_seconds: float
    upload_bytes: int


class EdgeApp:
    def __init__(self, config: ClientConfig, transport: ClientTransport, state_dir: Path):
        self.config = config
        self.state_dir = state_dir
        self.counter = ByteCounter()
        self.messenger = ClientMessenger(transport, self.counter, config.client_id)
        self.device = resolve_device(config.device)
        configure_threads(config.threads)
        torch.manual_seed(config.seed * 7919 + config.partition)
        self.private = load_private_data(config.kind, config.partition, config.num_partitions, config.alpha,
                                         config.seed, config.max_private, config.max_test)
        self.public: ModalData = load_public_data("train")
        self.state: ClientState | None = None
        self.reports: list[RoundReport] = []

    # -- protocol -------------------------------------------------------------------------------
    def run(self) -> list[RoundReport]:
        """Join, serve rounds until the server says Bye. Ctrl-C sends Bye so the server stops waiting."""
        try:
            welcome = self._join()
            self._build_state(welcome.feature_dim)
            while True:
                received = self._recv(self.config.round_wait_s, "the server's next round")
                message = received.msg
                if isinstance(message, RoundStart):
                    self._serve_round(message)
                elif isinstance(message, Bye):
                    log.info("%s: server says bye (%s)", self.config.client_id, message.reason)
                    return self.reports
                elif isinstance(message, Error):
                    log.warning("%s: server error %s: %s", self.config.client_id, message.code, message.reason)
                elif not isinstance(message, (Ack, Welcome)):
                    log.warning("%s: ignoring unexpected %s", self.config.client_id, type(message).__name__)
        except KeyboardInterrupt:
            self.messenger.send(Bye(reason="interrupted"), round=-1)
            raise

    def _join(self) -> Welcome:
        c = self.config
        archs = {"image": c.image_arch if c.kind != "text" else "", "text": c.text_arch if c.kind != "image" else ""}
        self.messenger.send(Join(client_id=c.client_id, kind=c.kind, image_arch=archs["image"], text_arch=archs["text"],
                                 num_params=0, num_private=len(self.private.train)), round=-1)
        received = self._recv(c.connect_timeout_s, "the server's Welcome (is `fedafd-cloud serve` running at that "
                                                  "address? raise connect_timeout_s to wait longer)")
        if isinstance(received.msg, Error):
            raise EdgeError(f"server refused {c.client_id}: {received.msg.code}: {received.msg.reason}")
        if not isinstance(received.msg, Welcome):
            raise EdgeError(f"expected Welcome from the server, got {type(received.msg).__name__}")
        return received.msg

    def _recv(self, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EdgeError(f"{self.config.client_id}: timed out after {timeout_s:.0f}s waiting for {what}")
            received = self.messenger.recv(min(left, 1.0))
            if received is None:
                continue
            if received.error is not None:
                log.warning("%s: dropped a malformed message: %s", self.config.client_id, received.error)
                continue
            return received

    # -- one round ------------------------------------------------------------------------------
    def _build_state(self, feature_dim: int) -> None:
        c = self.config
        model = LocalModel(c.kind, c.image_arch, c.text_arch, feature_dim, self.private.num_classes).to(self.device)
        self.state = ClientState(model, Optimizers.create(model, c.lr, c.disc_lr), GlobalTowers(feature_dim, self.device))
        if load_state(self.state_dir, self.state, self._identity(feature_dim)):
            log.info("%s: resumed local state after round %d", c.client_id, self.state.last_round)

    def _identity(self, feature_dim: int) -> dict:
        c = self.config
        return {"client_id": c.client_id, "kind": c.kind, "image_arch": c.image_arch, "text_arch": c.text_arch,
                "feature_dim": feature_dim}

    def _serve_round(self, start: RoundStart) -> None:
        assert self.state is not None
        c, state = self.config, self.state
        self.messenger.current_round = start.round
        settings = start.settings
        federated = settings.get("strategy", "fedafd") != "local"
        if start.tower:
            state.towers.load(start.tower_version, dict(start.tower_arch),
                              {name: torch.from_numpy(np.array(t)) for name, t in start.tower.items()})
        rows = torch.from_numpy(np.array(start.public_indices, dtype=np.int64))
        plan = RoundPlan(
            round=start.round,
            local_epochs=start.local_epochs,
            baa=federated and bool(settings.get("baa", True)),
            gff=federated and bool(settings.get("gff", True)),
            beta=float(settings.get("beta", 0.5)),
            public_features={m: torch.from_numpy(np.array(f, dtype=np.float32)) for m, f in start.global_features.items()},
            public_rows=rows,
        )
        last_beat = [time.monotonic()]

        def heartbeat() -> None:
            if time.monotonic() - last_beat[0] >= c.heartbeat_s:
                self.messenger.send(Heartbeat(client_id=c.client_id, round=start.round, stage="train"), round=start.round)
                last_beat[0] = time.monotonic()

        started = time.perf_counter()
        losses = train_round(state.model, state.optimizers, state.towers, self.private.train, self.public, plan,
                             c.batch_size, c.seed * 7919 + c.partition, self.device, heartbeat)
        train_seconds = time.perf_counter() - started
        metrics = evaluate(state.model, state.towers, self.private.test, plan.gff, self.device)
        # The model's size travels with the metrics so the server can price FedAvg for the same model.
        metrics["num_params"] = float(count_parameters(state.model))
        uploads = public_features(state.model, self.public, rows, self.device) if federated else {}
        # Training + evaluation + feature extraction: what the server subtracts from the round trip to
        # get this device's communication time.
        metrics["compute_seconds"] = time.perf_counter() - started
        state.last_round = start.round
        save_state(self.state_dir, state, self._identity(state.towers.feature_dim))
        sent = self.messenger.send(FeatureUpload(
            round=start.round, client_id=c.client_id,
            features={m: f.numpy().astype(np.float32, copy=False) for m, f in uploads.items()},
            metrics=metrics, losses=losses, train_seconds=train_seconds,
        ), round=start.round, codecs={"features": self._uplink_codec(settings)})
        self.reports.append(RoundReport(start.round, metrics, losses, train_seconds, sent))
        log.info("%s round %d: %s | losses %s | %.1fs train | %d bytes up", c.client_id, start.round,
                 _fmt(metrics), _fmt(losses), train_seconds, sent)

    def _uplink_codec(self, settings: dict) -> str:
        """The wire codec of this round's feature upload, as the server's feature_codec setting says."""
        name = settings.get("feature_codec", "fp32")
        if name not in FEATURE_CODECS:
            log.warning("%s: server asked for unknown feature codec %r; sending fp32", self.config.client_id, name)
            name = "fp32"
        return wire_codec(name)

    def close(self) -> None:
        self.messenger.close()


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in values.items())
