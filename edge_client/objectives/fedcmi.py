"""FedCMI on a classification device: an infiltration projector under the device's classifier, trained with the
task's cross-entropy at every step and, after each epoch, distilled toward the server's G of the dominant modality
with class-wise temperatures (docs/strategies.md). A retrieval device trains as under LOCAL (and uploads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedafd.edge_client.model import LocalModel
from fedafd.edge_client.objectives.base import Objective
from fedafd.edge_client.training import evaluation_mode, public_pass, task_loss
from fedafd.runtime.models import encode_all
from fedafd.runtime.data.modal import ModalData


def class_temperatures(model: LocalModel, private: ModalData, device: torch.device) -> torch.Tensor:
    """FedCMI's class-wise temperatures (C,), once per round on the private training data: with r_c the mean
    true-class probability through the infiltration projector over that through the encoder's own feature,
    T_c = 1 / (1 + 2 log(r_c / mean r)) where r_c is above the mean, else 1, so the distillation is sharper for
    the classes where the dominant modality's knowledge already serves the device better."""
    rows = torch.arange(len(private))
    with torch.no_grad(), evaluation_mode(model):
        (modality,) = model.modalities
        local = encode_all(lambda r: model.encode(modality, private, r, device), len(private))
        labels = private.label_batch(rows, device)
        own = torch.softmax(model.head(local), 1).gather(1, labels[:, None]).squeeze(1)
        infiltrated = torch.softmax(model.head(model.infiltrate(local)), 1).gather(1, labels[:, None]).squeeze(1)
    classes = model.head.out_features
    count = torch.bincount(labels, minlength=classes).clamp_min(1)
    ratio = (torch.bincount(labels, infiltrated, classes) / count) / (torch.bincount(labels, own, classes) / count).clamp_min(1e-6)
    present = torch.bincount(labels, minlength=classes) > 0
    mean = ratio[present].mean()
    sharpen = present & (ratio > mean)
    temperatures = torch.ones(classes, device=device)
    temperatures[sharpen] = 1.0 / (1.0 + 2.0 * torch.log(ratio[sharpen] / mean))
    return temperatures


def infiltration_loss(model: LocalModel, local: torch.Tensor, positions: torch.Tensor, dominant: torch.Tensor,
                      temperatures: torch.Tensor) -> torch.Tensor:
    """FedCMI's infiltration distillation: the projector's output for public sample k should pick out the
    dominant modality's global feature of k among all P, at the temperature of the class the device's head
    gives k (class-wise temperatures)."""
    infiltrated = model.infiltrate(local)
    with torch.no_grad():
        classes = model.head(local).argmax(1)
    logits = infiltrated @ dominant.T / temperatures[classes].unsqueeze(1)  # (B, P)
    return F.cross_entropy(logits, positions)


class FedCmiObjective(Objective):
    name = "fedcmi"

    @property
    def infiltrates(self) -> bool:
        return self.round.settings.infiltration_weight > 0 and self.round.model.head is not None

    def before_epochs(self) -> dict[str, float]:
        if self.infiltrates:
            r = self.round
            self.G = {m: g.to(r.device) for m, g in r.G.items()}
            self.temperatures = class_temperatures(r.model, r.private, r.device)
        return {}

    def loss_step(self, private_rows: torch.Tensor, public_positions: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        if not self.infiltrates:
            return super().loss_step(private_rows, public_positions)
        r, model = self.round, self.round.model
        extra = torch.zeros((), device=r.device)
        task = task_loss(model, r.private, private_rows, r.f_g, r.device, r.local_task_weight)
        # The infiltration projector sits under the same classifier as the encoder's own feature.
        (modality,) = model.modalities
        infiltrated = model.infiltrate(model.encode(modality, r.private, private_rows, r.device))
        extra = extra + F.cross_entropy(model.head(infiltrated), r.private.label_batch(private_rows, r.device))
        return task + extra, {"task": task.item()}

    def after_epoch(self) -> dict[str, float]:
        if not self.infiltrates:
            return {}
        r, settings = self.round, self.round.settings
        loss = public_pass(r.model, r.optimizers, r.public, r.public_rows, r.batch_size, r.generator, r.device,
                           lambda positions, locals_: settings.infiltration_weight * infiltration_loss(
                               r.model, next(iter(locals_.values())), positions.to(r.device),
                               self.G[settings.dominant_modality],
                               settings.contrast_temperature * self.temperatures))
        return {"infiltration": loss / r.local_epochs}
