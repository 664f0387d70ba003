"""A method on the device: one Objective per round, with a hook per part of local training, today's plain
local training as the defaults; edge_client/training.py's loop calls them (before the epochs, each step's loss,
after each epoch, the uplink). The server's side of each method is its strategy (cloud_server/strategies)."""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from fedafd.edge_client.training import DeviceRound, public_pass, task_loss, uplink_features
from fedafd.runtime.losses import distillation_loss


class Objective:
    """Plain local training on the task loss (through GFF when the settings fuse), and the uplink the settings
    ask for. A method overrides the hooks it changes."""

    name = ""

    def __init__(self, round: DeviceRound):
        self.round = round

    def before_epochs(self) -> dict[str, float]:
        """What runs before the first epoch (a digest pass, round-constant tensors); loss parts by name."""
        return {}

    def before_epoch(self) -> dict[str, float]:
        """What opens each epoch (FedAFD's adversarial pass); loss parts by name, each already divided by the
        number of epochs, so their sum over the round is their mean."""
        return {}

    def public_batches(self) -> Iterator[torch.Tensor | None]:
        """Called at each epoch's start: positions in the public rows to pair with each private batch, or None."""
        return itertools.repeat(None)

    def loss_step(self, private_rows: torch.Tensor, public_positions: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """One step's loss (the caller steps the task optimiser on it) and its parts by name."""
        r = self.round
        task = task_loss(r.model, r.private, private_rows, r.f_g, r.device, r.local_task_weight)
        return task + torch.zeros((), device=r.device), {"task": task.item()}

    def after_epoch(self) -> dict[str, float]:
        """What follows each epoch (a pass over the public set); loss parts by name, each already divided by
        the number of epochs, so their sum over the round is their mean."""
        return {}

    def uplink(self) -> dict[str, torch.Tensor]:
        """What goes up: the local-encoder features of the public set (none when the settings upload nothing)."""
        r = self.round
        if not r.settings.uplink:
            return {}
        return uplink_features(r.model, r.public, r.public_rows, r.device)


def digest(round: DeviceRound, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """One pass over the public set regressing the local features toward `targets` (modality -> (P, d); only the
    model's modalities count), at the settings' digest weight: FedMD's digest of the consensus, FedGEMS' and
    FedET's transfer of the server's G. {"digest": its mean loss}, or {} when there is nothing to digest (FedMD's
    first round)."""
    r = round
    targets = {m: t for m, t in targets.items() if m in r.model.modalities}
    if not targets:
        return {}
    return {"digest": public_pass(r.model, r.optimizers, r.public, r.public_rows, r.batch_size, r.generator, r.device,
                                  lambda positions, locals_: sum(
                                      distillation_loss(locals_[m], target[positions].to(r.device),
                                                        r.settings.digest_weight)
                                      for m, target in targets.items()))}
