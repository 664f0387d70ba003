"""FedET at the representation level: each device's upload is weighted per sample by its confidence, the variance
of its log-probabilities of retrieving over the server's other-modality features (alpha_ck = sigma_ck / sum_c
sigma_ck, i.e. softmax_c of log sigma); devices take the server's knowledge back with a digest toward its global
features (edge_client/objectives/fedet.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from fedafd.cloud_server.strategies.base import Strategy
from fedafd.cloud_server.strategies.fedgems import CONFIDENCE_TEMPERATURE, retrieval_log_probs
from fedafd.runtime.vocabulary import other_modality


class FedEt(Strategy):
    name = "fedet"

    def switches(self) -> dict:
        return dict(digest="global", digest_weight=1.0)

    def score(self, modality: str, features: Tensor, G: dict[str, Tensor]) -> Tensor:
        log_probs = retrieval_log_probs(features, G[other_modality(modality)], CONFIDENCE_TEMPERATURE,
                                        self.config.sed_chunk)
        return torch.log(log_probs.var(dim=1).clamp_min(1e-12))
