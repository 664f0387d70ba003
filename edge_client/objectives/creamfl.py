"""CreamFL on the device: after each epoch, one pass over the public set with its inter- and intra-modal
contrastive regularisers against the server's G (docs/strategies.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedafd.edge_client.objectives.base import Objective
from fedafd.edge_client.training import public_pass, uplink_features
from fedafd.runtime.vocabulary import other_modality


def creamfl_regularisers(local: torch.Tensor, old_local: torch.Tensor, positions: torch.Tensor, modality: str,
                         G: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """CreamFL's regularisers of a device's public features (B, d) of `modality` at `positions` of the public
    rows. Inter-modal: cross-entropy over all P of <z_k, g_j^other> / T, the target its own pair. Intra-modal
    (MOON's form): the server's feature of the same sample is the positive, and the feature this device's
    encoder gave at the start of the round (`old_local`) is the negative."""
    inter = F.cross_entropy(local @ G[other_modality(modality)].T / temperature, positions)
    own = G[modality][positions]
    pair = torch.stack([(local * own).sum(1), (local * old_local).sum(1)], dim=1) / temperature  # (B, 2)
    intra = F.cross_entropy(pair, torch.zeros(len(local), dtype=torch.long, device=local.device))
    return inter + intra


class CreamFlObjective(Objective):
    name = "creamfl"

    def before_epochs(self) -> dict[str, float]:
        r = self.round
        # The intra-modal negative: the public features as the round started (the uplink's eval-mode encoders),
        # constant for the round, so computed once.
        self.round_start = uplink_features(r.model, r.public, r.public_rows, r.device)
        self.G = {m: g.to(r.device) for m, g in r.G.items()}
        return {}

    def after_epoch(self) -> dict[str, float]:
        r, settings = self.round, self.round.settings
        loss = public_pass(r.model, r.optimizers, r.public, r.public_rows, r.batch_size, r.generator, r.device,
                           lambda positions, locals_: settings.contrast_weight * sum(
                               creamfl_regularisers(local, self.round_start[m][positions].to(r.device),
                                                    positions.to(r.device), m, self.G, settings.contrast_temperature)
                               for m, local in locals_.items()))
        return {"contrast": loss / r.local_epochs}
