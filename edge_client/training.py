"""Stage 2 on a device, as plain functions without sockets: the task loss over the private data (through GFF),
the loop of E local epochs that a method's objective (edge_client/objectives) fills in, one pass over the
public set, the uplink's features, and evaluation."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fedafd.edge_client.diagnostics import DeviceDiagnostics, logit_norm
from fedafd.edge_client.model import GlobalTowers, LocalModel, adam_groups
from fedafd.edge_client.privacy import PrivacyBudget, PrivateSteps
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.losses import info_nce
from fedafd.runtime.models import encode_all, tower_lrs
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.retrieval import held_rows, pair_retrieval_metrics, personalised_accuracy
from fedafd.runtime.torch_utils import batch_indices, round_seed, seeded_generator


@dataclass
class Optimizers:
    task: torch.optim.Optimizer
    discriminator: torch.optim.Optimizer

    @staticmethod
    def create(model: LocalModel, lr: float, disc_lr: float, fusion_lr: float = 0.0) -> "Optimizers":
        return Optimizers(
            task=torch.optim.Adam(adam_groups(model.named_task_parameters(), lr, fusion_lr, tower_lrs(model)), lr=lr),
            discriminator=torch.optim.Adam(model.discriminator_parameters(), lr=disc_lr, betas=(0.5, 0.999)),
        )

    def state_dict(self) -> dict:
        return {"task": self.task.state_dict(), "discriminator": self.discriminator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = len(state["task"]["param_groups"]), len(self.task.param_groups)
        if saved != now:
            raise ValueError(f"this device state's optimiser has {saved} parameter group(s), this device {now}: it was "
                             f"saved with {'fusion_lr equal to lr (0)' if saved == 1 else 'its own fusion_lr'}; "
                             f"resume it with the same fusion_lr (--local-set fusion_lr=...)")
        self.task.load_state_dict(state["task"])
        self.discriminator.load_state_dict(state["discriminator"])


def retrieval_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch's matched pairs (row i <-> row i)."""
    return info_nce(image, text, logit_scale.clamp(max=math.log(100.0)).exp())


def task_loss(model: LocalModel, data: ModalData, rows: torch.Tensor, f_g: dict[str, torch.Tensor],
              device: torch.device, local_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the fused feature z (classification) or InfoNCE between the L2-normalised fused
    features (retrieval), through LocalModel.head_outputs like evaluation and the ONNX graph. `f_g`: the
    frozen global tower's features of `data` by modality (GFF; without them z is f_l). `local_weight` > 0 adds
    the same loss on f_l alone (through the same head) at that weight, where z is fused."""
    fused, local = {}, {}
    for modality in model.modalities:
        f_l = model.encode(modality, data, rows, device)  # (B, d)
        g = f_g[modality][rows.to(f_g[modality].device)] if modality in f_g else None
        fused[modality] = model.head_outputs(modality, f_l, g)[1]
        if local_weight and g is not None:
            local[modality] = model.head_outputs(modality, f_l, None)[1]
    loss = _task_loss_of(model, data, rows, fused, device)
    if local:
        loss = loss + local_weight * _task_loss_of(model, data, rows, local, device)
    return loss


def _task_loss_of(model: LocalModel, data: ModalData, rows: torch.Tensor, outputs: dict[str, torch.Tensor],
                  device: torch.device) -> torch.Tensor:
    """The task's loss on the head's outputs by modality: cross-entropy on the logits, or InfoNCE of the pairs."""
    if model.head is not None:
        (logits,) = outputs.values()
        return F.cross_entropy(logits, data.label_batch(rows, device))
    return retrieval_loss(outputs["image"], outputs["text"], model.logit_scale)


@contextlib.contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[None]:
    """Forward passes inside run as in eval mode (BatchNorm with its running statistics, no dropout) and
    still back-propagate; every submodule's train/eval flag is restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@dataclass
class DeviceRound:
    """What one round of local training works on: the device's model and data, the server's settings and the
    tensors it sent (or that were computed from what it sent). Names as in docs/method.md."""

    round: int
    local_epochs: int
    settings: MethodSettings
    model: LocalModel
    optimizers: Optimizers
    private: ModalData
    batch_size: int
    generator: torch.Generator
    """The round's shuffles (private batches, public batches, public passes), drawn in the order they run."""
    device: torch.device
    public: ModalData | None = None
    public_rows: torch.Tensor | None = None
    """(P,) rows of the public train split, in the order of G and of the uplink."""
    G: dict[str, torch.Tensor] = field(default_factory=dict)
    """Modality -> (P, d): the server's global public features (settings.needs().global_features)."""
    consensus: dict[str, torch.Tensor] = field(default_factory=dict)
    """Modality -> (P, d): last round's teacher (FedMD)."""
    f_g: dict[str, torch.Tensor] = field(default_factory=dict)
    """Modality -> (N, d): the frozen global tower's features of the private data, computed once (GFF)."""
    diagnostics: DeviceDiagnostics | None = None
    privacy: PrivateSteps | None = None
    """DP-SGD for the private steps (a DP device), or None: plain Adam on optimizers.task."""
    local_task_weight: float = 0.0
    """Weight of the task loss on f_l alone beside the one on z (ClientConfig.local_task_weight)."""


def prepare_round(model: LocalModel, optimizers: Optimizers, towers: GlobalTowers, private: ModalData,
                  settings: MethodSettings, round_: int, local_epochs: int, batch_size: int, seed: int,
                  device: torch.device, public: ModalData | None = None, public_rows: torch.Tensor | None = None,
                  G: dict[str, torch.Tensor] | None = None, consensus: dict[str, torch.Tensor] | None = None,
                  diagnostics: DeviceDiagnostics | None = None, local_task_weight: float = 0.0) -> DeviceRound:
    """A DeviceRound from what the device holds and what the server sent: f_g of the private data when the
    settings fuse and the towers of every modality of the model arrived; the round's generator from the
    device's seed."""
    fuses = settings.needs().towers and all(towers.has(m) for m in model.modalities)
    G = G or {}
    if settings.needs().global_features and (public is None or public_rows is None or not G):
        raise ValueError(f"{settings.strategy} with these settings needs the public set and the server's global "
                         f"public features G")
    return DeviceRound(
        round=round_, local_epochs=local_epochs, settings=settings, model=model, optimizers=optimizers,
        private=private, batch_size=batch_size, generator=seeded_generator(round_seed(seed, round_)), device=device,
        public=public, public_rows=public_rows, G=G, consensus=consensus or {},
        f_g=private_global_features(towers, private, model.modalities, device) if fuses else {},
        diagnostics=diagnostics, local_task_weight=local_task_weight,
    )


class RoundObjective(Protocol):
    """A method's device side (edge_client/objectives/base.py Objective)."""

    round: DeviceRound

    def before_epochs(self) -> dict[str, float]: ...

    def before_epoch(self) -> dict[str, float]: ...

    def public_batches(self) -> Iterator[torch.Tensor | None]: ...

    def loss_step(self, private_rows: torch.Tensor, public_positions: torch.Tensor | None
                  ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_epoch(self) -> dict[str, float]: ...


def train_step(objective: RoundObjective, private_rows: torch.Tensor, public_positions: torch.Tensor | None
               ) -> dict[str, float]:
    """One optimiser step of the local model on the objective's loss (its own parts, such as BAA's
    discriminator step, run inside loss_step); returns the loss parts by name. On a DP device the step is
    DP-SGD: per-sample gradients recorded through the forward and backward, clipped and noised by the step."""
    privacy = objective.round.privacy
    optimizer = objective.round.optimizers.task if privacy is None else privacy.optimizer
    with privacy.recording() if privacy is not None else contextlib.nullcontext():
        loss, parts = objective.loss_step(private_rows, public_positions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    return parts


def train_round(objective: RoundObjective, heartbeat: Callable[[], None] = lambda: None) -> dict[str, float]:
    """E local epochs over the private data, each step paired with what objective.public_batches() gives; the
    objective's passes before the epochs, and before and after each one. Returns each loss part's mean over the
    round: a step's parts over the steps, a pass's parts as the passes report them."""
    r = objective.round
    if r.privacy is not None and (reason := r.settings.dp_conflict()):
        raise ValueError(f"a DP device cannot train {r.settings.strategy} with these settings: {reason}")
    r.model.train()
    totals = dict(objective.before_epochs())
    r.model.train()
    step_parts: set[str] = set()
    steps = 0
    # BatchNorm cannot train on a batch of one; a DP device has none (and Poisson batches may be that small)
    smallest = 2 if r.privacy is None else 1
    for _epoch in range(r.local_epochs):
        for key, value in objective.before_epoch().items():
            totals[key] = totals.get(key, 0.0) + value
        private_batches = (batch_indices(len(r.private), r.batch_size, r.generator) if r.privacy is None
                           else r.privacy.batches(r.generator))
        for private_rows, public_positions in zip(private_batches, objective.public_batches()):
            if len(private_rows) < smallest:
                continue
            for key, value in train_step(objective, private_rows, public_positions).items():
                totals[key] = totals.get(key, 0.0) + value
                step_parts.add(key)
            steps += 1
            heartbeat()
        for key, value in objective.after_epoch().items():
            totals[key] = totals.get(key, 0.0) + value
    means = {key: value / max(steps, 1) if key in step_parts else value for key, value in totals.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"training diverged in round {r.round}: {means}")
    return means


def train_private_round(objective: RoundObjective, budget: PrivacyBudget, lr: float, seed: int,
                        heartbeat: Callable[[], None] = lambda: None, fusion_lr: float = 0.0) -> dict[str, float]:
    """train_round with DP-SGD on the private steps (edge_client/privacy.py), accounted in `budget`; the
    per-sample machinery is off the model again afterwards. Returns the loss parts."""
    r = objective.round
    r.privacy = PrivateSteps(r.model.private_modules(fuses=bool(r.f_g)), budget, len(r.private), r.batch_size, lr,
                             seed, fusion_lr)
    try:
        return train_round(objective, heartbeat)
    finally:
        r.privacy.close()
        r.privacy = None


def private_global_features(towers: GlobalTowers, data: ModalData, modalities: tuple[str, ...],
                            device: torch.device) -> dict[str, torch.Tensor]:
    """f_g of the private data: the tower is frozen for the whole round, so compute it once and cache it."""
    return {m: encode_all(lambda rows, m=m: towers.encode(m, data, rows, device), len(data))
            for m in modalities if towers.has(m)}


def G_from_towers(towers: GlobalTowers, public: ModalData, rows: torch.Tensor, modalities: tuple[str, ...],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """G of the public rows, computed on the device from the towers the server sent (instead of the server
    sending the (P, d) features themselves): the same eval-mode encoders over the same public inputs."""
    return {m: encode_all(lambda positions, m=m: towers.encode(m, public, rows[positions], device), len(rows)).cpu()
            for m in modalities}


def public_pass(model: LocalModel, optimizers: Optimizers, public: ModalData | None, public_rows: torch.Tensor | None,
                batch_size: int, generator: torch.Generator, device: torch.device,
                loss_of: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]) -> float:
    """One pass over the public rows in shuffled batches, one step of the local model each on
    `loss_of(positions, local public features by modality)`. The encoders run as the uplink runs them (eval
    mode, with gradients), as in BAA. Returns the mean loss."""
    if public is None or public_rows is None:
        raise ValueError("this method trains on the public set: RoundStart must carry its rows")
    total, steps = 0.0, 0
    for positions in batch_indices(len(public_rows), batch_size, generator):
        with evaluation_mode(model.encoders):
            locals_ = {m: model.encode(m, public, public_rows[positions], device) for m in model.modalities}
        loss = loss_of(positions, locals_)
        optimizers.task.zero_grad(set_to_none=True)
        loss.backward()
        optimizers.task.step()
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


@torch.no_grad()
def uplink_features(model: LocalModel, public: ModalData, rows: torch.Tensor, device: torch.device
                    ) -> dict[str, torch.Tensor]:
    """The uplink: local-encoder (not fused) features of the public set, eval mode, (P, d) per modality."""
    model.eval()
    return {m: encode_all(lambda positions, m=m: model.encode(m, public, rows[positions], device), len(rows)).cpu()
            for m in model.modalities}


@torch.no_grad()
def evaluate(model: LocalModel, towers: GlobalTowers, test: ModalData, use_fusion: bool, device: torch.device,
             train_labels: torch.Tensor, diagnostics: DeviceDiagnostics | None = None) -> dict[str, float]:
    """Classifiers: top-1 (%) on the whole test split, the personalised top-1 and its full-test bound
    (runtime.retrieval.personalised_accuracy). Retrieval devices: R@K (%) both ways on the whole test
    split and, as pers_*, on the test pairs of the categories the device holds (`train_labels`).
    `diagnostics`, when given, gets GFF's gate statistics of this pass (when it fuses) and the mean norm
    of a classifier's logits."""
    model.eval()
    use_global = use_fusion and all(towers.has(m) for m in model.modalities)
    outputs = {}
    for modality in model.modalities:
        local = encode_all(lambda rows, m=modality: model.encode(m, test, rows, device), len(test))
        global_ = (encode_all(lambda rows, m=modality: towers.encode(m, test, rows, device), len(test))
                   if use_global else None)
        watch = (diagnostics.watching_gates(modality, model.fusions[modality])
                 if diagnostics is not None and use_global else contextlib.nullcontext())
        with watch:
            outputs[modality] = model.head_outputs(modality, local, global_)[1]
    labels = test.label_batch(np.arange(len(test)), device)
    if model.head is not None:
        (logits,) = outputs.values()
        if diagnostics is not None and len(logits):
            with diagnostics.timing():
                diagnostics.put("logit_norm", logit_norm(logits))
        return personalised_accuracy(logits.argmax(dim=1), labels, train_labels, model.head.out_features)
    metrics = pair_retrieval_metrics(outputs["image"], outputs["text"], test.image_ids)
    held = held_rows(labels, train_labels)
    if len(held):
        held_ids = None if test.image_ids is None else test.image_ids[held.cpu().numpy()]
        personal = pair_retrieval_metrics(outputs["image"][held], outputs["text"][held], held_ids)
        metrics.update({f"pers_{key}": value for key, value in personal.items()})
    return metrics
