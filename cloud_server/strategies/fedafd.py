"""FedAFD (docs/method.md) on the server: devices run BAA and GFF (edge_client/objectives/fedafd.py); uploads are
weighted per sample by similarity-guided ensemble distillation (SED). The switches baa, gff, sed turn each part
off; without SED the teacher is the plain mean."""

from __future__ import annotations

from torch import Tensor

from fedafd.cloud_server.distill import sed_scores
from fedafd.cloud_server.strategies.base import Strategy


class FedAfd(Strategy):
    name = "fedafd"

    def switches(self) -> dict:
        c = self.config
        return dict(baa=c.baa, baa_schedule=c.baa_schedule, baa_batches=c.baa_batches, disc_steps=c.disc_steps,
                    beta=c.beta, real_label=c.real_label, gff=c.gff, local_init=c.local_init)

    def score(self, modality: str, features: Tensor, G: dict[str, Tensor]) -> Tensor:
        """s_ck = <v_ck, g_k>/T - log sum_j exp <v_ck, g_j>/T: how well device c's feature of sample k picks out
        the server's feature of k among all of P (T: sed_temperature, 1 in docs/method.md)."""
        if not self.config.sed:
            return super().score(modality, features, G)
        return sed_scores(features.unsqueeze(0), G[modality], self.config.sed_chunk, self.config.sed_temperature)[0]
