"""CreamFL: global-local cross-modal ensemble (a device's image feature of pair k is scored against the server's
text features, text against image); devices add inter- and intra-modal contrastive regularisers against the
server's public features (edge_client/objectives/creamfl.py)."""

from __future__ import annotations

from torch import Tensor

from fedafd.cloud_server.distill import sed_scores
from fedafd.cloud_server.strategies.base import Strategy
from fedafd.runtime.vocabulary import other_modality


class CreamFl(Strategy):
    name = "creamfl"

    def switches(self) -> dict:
        return dict(contrast_weight=0.5, contrast_temperature=0.5)

    def score(self, modality: str, features: Tensor, G: dict[str, Tensor]) -> Tensor:
        return sed_scores(features.unsqueeze(0), G[other_modality(modality)], self.config.sed_chunk)[0]
