"""A method on the server: one Strategy object with a hook per phase of the round, today's behaviour (FedAFD's
round without its parts switched on) as the defaults; the round loop (cloud_server/app.py) calls them one at a
time. The device's side of each method is its objective (edge_client/objectives/<name>.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedafd.cloud_server.distributed import ONE_PROCESS, Ranks
from fedafd.cloud_server.stages import GlobalModel, distill_epoch, train_contrastive_epoch
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.vocabulary import MODALITIES


@dataclass(frozen=True)
class Downlink:
    """What one device is sent besides the round's settings."""

    towers: tuple[str, ...]
    """Modalities whose frozen global tower goes down (GFF's f_g, or G computed on the device)."""
    global_features: tuple[str, ...]
    """Modalities whose G, the server's (P, d) public features, goes down as a tensor."""
    consensus: dict[str, np.ndarray] = field(default_factory=dict)
    """FedMD: last round's teacher per modality."""


class Strategy:
    """The shared defaults: no federated part switched on, the plain mean as the teacher, stage 1 and stage 3
    as docs/method.md has them, no state across rounds."""

    name = ""

    def __init__(self, config: ServerConfig):
        self.config = config

    # -- what goes down ------------------------------------------------------------------------------
    def switches(self) -> dict:
        """The MethodSettings fields this method sets (the others keep their defaults: off)."""
        return {}

    def settings(self) -> MethodSettings:
        """The recipe every device receives in RoundStart."""
        return MethodSettings(strategy=self.name, feature_codec=self.config.feature_codec, **self.switches())

    def downlink(self, modalities: tuple[str, ...], settings: MethodSettings, model: GlobalModel,
                 public_size: int) -> Downlink:
        """What a device with `modalities` is sent, as settings.needs() says: the towers of its modalities when
        it fuses (GFF); when it needs G, G of both modalities, each either as the (P, d) tensor or, where that is
        fewer numbers, as the tower the device computes G with from the public set it holds (an adapter over a
        frozen backbone is a quarter of G_img's size at d = 256)."""
        needs = settings.needs()
        towers = list(modalities) if needs.towers else []
        if not needs.global_features:
            return Downlink(tuple(towers), ())
        for modality in MODALITIES:
            tower_size = sum(t.numel() for t in model.encoders[modality].state_dict().values())
            if modality not in towers and tower_size < public_size * self.config.feature_dim:
                towers.append(modality)
        towers.sort(key=MODALITIES.index)
        return Downlink(tuple(towers), tuple(m for m in MODALITIES if m not in towers))

    # -- stage 1 -------------------------------------------------------------------------------------
    def train_public(self, model: GlobalModel, optimizer: torch.optim.Optimizer, public: ModalData,
                     generator: torch.Generator, device: torch.device, ranks: Ranks = ONE_PROCESS) -> float:
        """Stage 1: the global encoders trained on the public pairs; the last epoch's loss."""
        loss = 0.0
        for _ in range(self.config.server_epochs):
            loss = train_contrastive_epoch(model, optimizer, public, self.config.batch_size, generator, device, ranks)
        return loss

    # -- how uploads combine -------------------------------------------------------------------------
    def score(self, modality: str, features: Tensor, G: dict[str, Tensor]) -> Tensor:
        """(P,) trust in one upload's (P, d) features of `modality` per public sample; the teacher weighs the
        devices by softmax over their scores (distill.TeacherFold). Equal scores make the plain mean."""
        return torch.zeros(len(features))

    def keep(self, teachers: dict[str, Tensor]) -> None:
        """The round's teachers, once folded: a method that keeps state across rounds takes it here."""

    # -- stage 3 -------------------------------------------------------------------------------------
    def distil(self, model: GlobalModel, optimizer: torch.optim.Optimizer, public: ModalData,
               teachers: dict[str, Tensor], generator: torch.Generator, device: torch.device,
               ranks: Ranks = ONE_PROCESS) -> float:
        """Stage 3: the global encoders distilled toward the teachers (none: nothing), their features or their
        relations (`distill_target`); the last epoch's loss."""
        loss = 0.0
        for _ in range(self.config.distill_epochs):
            loss = distill_epoch(model, optimizer, public, teachers, self.config.gamma, self.config.batch_size,
                                 generator, device, ranks, self.config.distill_target)
        return loss

    # -- state across rounds (checkpointed) ----------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """From a checkpoint (possibly of an older format without the state: then nothing)."""
