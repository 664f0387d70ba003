"""What a federated strategy decides on the server, in three methods; everything else (sockets, rounds,
checkpoints) stays in app.py. New strategies (CreamFL, FedMD, FedCMI) implement the same three.

- `shares_global_model`: whether RoundStart carries the global features and towers (devices align to and
  fuse with them) and whether devices upload public features;
- `device_settings`: the method settings every device receives in RoundStart;
- `teachers`: from the devices' public features, the per-modality targets stage 3 distils toward.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fedafd.cloud_server.distill import mean_teacher, sed_scores, sed_teacher, sed_weights
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.wire import MODALITIES


class Strategy(Protocol):
    name: str

    def shares_global_model(self) -> bool: ...

    def device_settings(self) -> dict: ...

    def teachers(self, uploads: dict[str, dict[str, torch.Tensor]], server_features: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
        """uploads: client id -> modality -> (P, d). Returns modality -> teacher (P, d) and, per modality,
        each sender's mean weight (for the metrics)."""
        ...


class FedAfd:
    """FedAFD (method.md): BAA and GFF on the devices, similarity-guided ensemble distillation on the server.
    The ablation switches baa, gff, sed turn each part off; without SED the teacher is the plain mean."""

    name = "fedafd"

    def __init__(self, baa: bool, gff: bool, sed: bool, beta: float, sed_chunk: int, real_label: float = 1.0,
                 local_init: str = "random"):
        self.baa, self.gff, self.sed, self.beta, self.sed_chunk = baa, gff, sed, beta, sed_chunk
        self.real_label, self.local_init = real_label, local_init

    def shares_global_model(self) -> bool:
        return True

    def device_settings(self) -> dict:
        return {"strategy": self.name, "baa": self.baa, "gff": self.gff, "sed": self.sed, "beta": self.beta,
                "real_label": self.real_label, "local_init": self.local_init}

    def teachers(self, uploads: dict[str, dict[str, torch.Tensor]], server_features: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
        teachers, mean_weights = {}, {}
        for modality in MODALITIES:
            senders = [cid for cid, features in uploads.items() if modality in features]
            if not senders:
                continue  # no device sent this modality: skipped, never a crash
            stacked = torch.stack([uploads[cid][modality] for cid in senders])  # (C, P, d)
            if not self.sed:
                teachers[modality] = mean_teacher(stacked)
                continue
            weights = sed_weights(sed_scores(stacked, server_features[modality], chunk_size=self.sed_chunk))  # (C, P)
            teachers[modality] = sed_teacher(stacked, weights)
            mean_weights[modality] = dict(zip(senders, weights.mean(dim=1).tolist()))
        return teachers, mean_weights


class Local:
    """LOCAL, the no-federation baseline: devices train on their own data only; the server only trains
    its encoders on the public set. Nothing but metrics goes up, nothing but the round's start comes down."""

    name = "local"

    def shares_global_model(self) -> bool:
        return False

    def device_settings(self) -> dict:
        return {"strategy": self.name, "baa": False, "gff": False, "sed": False, "beta": 0.0}

    def teachers(self, uploads, server_features):
        return {}, {}


def build_strategy(config: ServerConfig) -> Strategy:
    if config.strategy == "local":
        return Local()
    return FedAfd(config.baa, config.gff, config.sed, config.beta, config.sed_chunk, config.real_label,
                  config.local_init)
