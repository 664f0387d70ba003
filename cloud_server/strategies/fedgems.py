"""FedGEMS (selective knowledge fusion) at the representation level: on each public sample only the devices that
retrieve its pair at top-1 among the server's other-modality features are fused, weighted by softmax_c(1 /
entropy) of their retrieval distributions; where none does, all devices are, by the same weights. Devices then
take the server's knowledge back: a digest pass toward its global features (edge_client/objectives/fedgems.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedafd.cloud_server.strategies.base import Strategy
from fedafd.runtime.vocabulary import other_modality

CONFIDENCE_TEMPERATURE = 0.07
"""Temperature of the retrieval distributions FedGEMS and FedET judge confidence by (CLIP's initial one): at 1,
cosines in [-1, 1] spread over P samples give every client a near-uniform distribution and the same entropy."""
UNSELECTED = 1e4
"""How far FedGEMS lowers the score of a client that does not retrieve its pair: exp(-1e4) is 0 in float32, so
such clients get no weight wherever another client is right, and equal footing where none is."""


def retrieval_log_probs(features: Tensor, anchors: Tensor, temperature: float, chunk_size: int) -> Tensor:
    """(P, P) log softmax_j <v_k, a_j> / T of L2-normalised features against the server's anchors, by rows."""
    v, a = F.normalize(features.float(), dim=-1), F.normalize(anchors.float(), dim=-1)
    return torch.cat([torch.log_softmax(v[start:start + chunk_size] @ a.T / temperature, dim=1)
                      for start in range(0, len(v), chunk_size)])


class FedGems(Strategy):
    name = "fedgems"

    def switches(self) -> dict:
        return dict(digest="global", digest_weight=1.0)

    def score(self, modality: str, features: Tensor, G: dict[str, Tensor]) -> Tensor:
        log_probs = retrieval_log_probs(features, G[other_modality(modality)], CONFIDENCE_TEMPERATURE,
                                        self.config.sed_chunk)
        entropy = -(log_probs.exp() * log_probs).sum(1)
        correct = log_probs.argmax(1) == torch.arange(len(features))
        return 1.0 / entropy.clamp_min(1e-6) - UNSELECTED * (~correct).float()
