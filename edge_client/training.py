"""Stage 2 on a device: the task loss over the private data (with GFF), and whatever the method adds over
the public set: BAA (FedAFD), a digest pass (FedMD, FedGEMS, FedET), contrastive regularisers (CreamFL).
No sockets here."""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fedafd.edge_client.alignment import discriminator_step, generator_loss
from fedafd.edge_client.diagnostics import DeviceDiagnostics, DiscriminatorTally, logit_norm
from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.losses import distillation_loss, info_nce
from fedafd.runtime.retrieval import held_rows, personalised_accuracy, retrieval_metrics
from fedafd.runtime.torch_utils import batch_indices, seeded_generator
from fedafd.runtime.wire import other_modality


@dataclass(frozen=True)
class RoundPlan:
    """What the server asked for this round (RoundStart), in the form training needs."""

    round: int
    local_epochs: int
    baa: bool
    gff: bool
    beta: float
    public_features: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (P, d) global features
    public_rows: torch.Tensor | None = None  # (P,) rows of the public train split, in the order of the features
    real_label: float = 1.0  # the discriminators' target for real features (below 1: label smoothing)
    digest_targets: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (P, d) to regress toward first
    digest_weight: float = 0.0
    contrast_weight: float = 0.0  # CreamFL's inter- + intra-modal regularisers (0: off)
    contrast_temperature: float = 1.0
    infiltration_weight: float = 0.0  # FedCMI's infiltration projector (0: off)
    dominant_modality: str = "text"  # whose global features FedCMI's infiltration projector is distilled toward


@dataclass
class Optimizers:
    task: torch.optim.Optimizer
    discriminator: torch.optim.Optimizer

    @staticmethod
    def create(model: LocalModel, lr: float, disc_lr: float) -> "Optimizers":
        return Optimizers(
            task=torch.optim.Adam(model.task_parameters(), lr=lr),
            discriminator=torch.optim.Adam(model.discriminator_parameters(), lr=disc_lr, betas=(0.5, 0.999)),
        )

    def state_dict(self) -> dict:
        return {"task": self.task.state_dict(), "discriminator": self.discriminator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.task.load_state_dict(state["task"])
        self.discriminator.load_state_dict(state["discriminator"])


def retrieval_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch's matched pairs (row i <-> row i)."""
    return info_nce(image, text, logit_scale.clamp(max=math.log(100.0)).exp())


def task_loss(model: LocalModel, data: ModalData, rows: torch.Tensor, global_cache: dict[str, torch.Tensor],
              device: torch.device) -> torch.Tensor:
    """Cross-entropy on the fused feature (classification) or InfoNCE between the L2-normalised fused
    features (retrieval), through LocalModel.head_outputs like evaluation and the ONNX graph."""
    outputs = {}
    for modality in model.modalities:
        local = model.encode(modality, data, rows, device)  # (B, d)
        global_ = global_cache[modality][rows.to(global_cache[modality].device)] if modality in global_cache else None
        outputs[modality] = model.head_outputs(modality, local, global_)[1]
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


@dataclass(frozen=True)
class PublicBatch:
    """A batch of public pairs with the server's global features of the same rows."""

    data: ModalData  # the public set
    rows: torch.Tensor  # (B,) rows of `data`
    global_features: dict[str, torch.Tensor]  # modality -> (B, d)


def creamfl_regularisers(local: torch.Tensor, old_local: torch.Tensor, positions: torch.Tensor, modality: str,
                         global_features: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """CreamFL's regularisers of a device's public features (B, d) of `modality` at `positions` of the public
    rows. Inter-modal: cross-entropy over all P of <z_k, g_j^other> / T, the target its own pair. Intra-modal
    (MOON's form): the server's feature of the same sample is the positive, and the feature this device's
    encoder gave at the start of the round (`old_local`) is the negative."""
    inter = F.cross_entropy(local @ global_features[other_modality(modality)].T / temperature, positions)
    own = global_features[modality][positions]
    pair = torch.stack([(local * own).sum(1), (local * old_local).sum(1)], dim=1) / temperature  # (B, 2)
    intra = F.cross_entropy(pair, torch.zeros(len(local), dtype=torch.long, device=local.device))
    return inter + intra


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


def train_step(model: LocalModel, optimizers: Optimizers, private: ModalData, private_rows: torch.Tensor,
               global_cache: dict[str, torch.Tensor], public_batch: PublicBatch | None, plan: RoundPlan,
               device: torch.device, tally: DiscriminatorTally | None = None) -> dict[str, float]:
    """One step. With a public batch (BAA): one discriminator step, then the local model's step on L_task
    plus L_G against the freshly updated discriminators; FedCMI adds its infiltration projector's
    cross-entropy on the same private batch. Returns the loss parts by name. `tally` (diagnostics) counts
    the discriminators' right calls on the discriminator step's logits."""
    parts = {"task": 0.0}
    extra = torch.zeros((), device=device)  # what the method adds to L_task
    if public_batch is not None:
        # The public features are computed exactly as the uplink computes them (eval mode: running
        # BatchNorm statistics, no dropout), so the discriminators judge, and the encoder aligns, the
        # feature the server receives and compares with G; gradients still flow. Colour emoji also
        # never move the statistics the private task is evaluated with.
        with evaluation_mode(model.encoders):
            locals_ = {m: model.encode(m, public_batch.data, public_batch.rows, device) for m in model.modalities}
        if plan.baa:
            intra, cross = model.discriminators["intra"], model.discriminators["cross"]
            parts["disc"] = discriminator_step(intra, cross, optimizers.discriminator, locals_,
                                               public_batch.global_features, plan.beta, plan.real_label, tally)
            adversarial = sum(generator_loss(intra, cross, local, plan.beta) for local in locals_.values())
            parts["adv_gen"] = float(adversarial.detach())
            extra = extra + adversarial
    task = task_loss(model, private, private_rows, global_cache, device)
    if plan.infiltration_weight > 0:
        # FedCMI: the infiltration projector sits under the same classifier as the encoder's own feature.
        (modality,) = model.modalities
        infiltrated = model.infiltrate(model.encode(modality, private, private_rows, device))
        extra = extra + F.cross_entropy(model.head(infiltrated), private.label_batch(private_rows, device))
    optimizers.task.zero_grad(set_to_none=True)
    (task + extra).backward()
    optimizers.task.step()
    parts["task"] = task.item()
    return parts


@torch.no_grad()
def encode_all(encode: Callable[[torch.Tensor], torch.Tensor], count: int, batch_size: int = 256) -> torch.Tensor:
    """(N, d) features of rows 0..count-1 in order; `encode(rows)` encodes one batch of row indices."""
    outputs = [encode(rows) for rows in batch_indices(count, batch_size)]
    return torch.cat(outputs) if outputs else torch.zeros(0)


def global_features(towers: GlobalTowers, data: ModalData, modalities: tuple[str, ...],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """f_g of the private data: the tower is frozen for the whole round, so compute it once and cache it."""
    return {m: encode_all(lambda rows, m=m: towers.encode(m, data, rows, device), len(data))
            for m in modalities if towers.has(m)}


def global_public_features(towers: GlobalTowers, public: ModalData, rows: torch.Tensor, modalities: tuple[str, ...],
                           device: torch.device) -> dict[str, torch.Tensor]:
    """G of the public rows, computed on the device from the towers the server sent (instead of the server
    sending the (P, d) features themselves): the same eval-mode encoders over the same public inputs."""
    return {m: encode_all(lambda positions, m=m: towers.encode(m, public, rows[positions], device), len(rows)).cpu()
            for m in modalities}


def train_round(model: LocalModel, optimizers: Optimizers, towers: GlobalTowers, private: ModalData,
                public: ModalData | None, plan: RoundPlan, batch_size: int, seed: int, device: torch.device,
                heartbeat: Callable[[], None] = lambda: None, diagnostics: DeviceDiagnostics | None = None
                ) -> dict[str, float]:
    """E local epochs over the private data, each step paired with a public batch for BAA; returns the
    mean of each loss part over all steps. `diagnostics`, when given, tallies BAA's discriminators."""
    model.train()
    use_global = plan.gff and all(towers.has(m) for m in model.modalities)
    global_cache = global_features(towers, private, model.modalities, device) if use_global else {}
    needs_global = plan.baa or plan.contrast_weight > 0 or plan.infiltration_weight > 0
    if needs_global and (public is None or plan.public_rows is None or not plan.public_features):
        raise ValueError("BAA, CreamFL and FedCMI need the public set and the server's global public features")
    if plan.infiltration_weight > 0 and model.head is None:
        raise ValueError("FedCMI's infiltration projector is for classification devices")
    generator = seeded_generator(seed * 1_000_003 + plan.round)
    totals: dict[str, float] = {}
    if plan.digest_targets:
        # FedMD's digest and the FedGEMS/FedET devices' transfer: regress the public features toward the targets.
        totals["digest"] = public_pass(model, optimizers, public, plan.public_rows, batch_size, generator, device,
                                       lambda positions, locals_: sum(
                                           distillation_loss(locals_[m], target[positions].to(device), plan.digest_weight)
                                           for m, target in plan.digest_targets.items()))
    # CreamFL's intra-modal negative: the public features as the round started (the uplink's eval-mode
    # encoders), constant for the round, so computed once.
    round_start = public_features(model, public, plan.public_rows, device) if plan.contrast_weight > 0 else None
    model.train()
    temperatures = class_temperatures(model, private, device) if plan.infiltration_weight > 0 else None
    global_public = {m: f.to(device) for m, f in plan.public_features.items()}
    steps = 0
    for _epoch in range(plan.local_epochs):
        positions = _cycle(len(plan.public_rows), batch_size, generator) if plan.baa else itertools.repeat(None)
        for private_rows, public_positions in zip(batch_indices(len(private), batch_size, generator), positions):
            if len(private_rows) < 2:  # BatchNorm cannot train on a batch of one
                continue
            public_batch = None
            if public_positions is not None:
                public_batch = PublicBatch(
                    data=public, rows=plan.public_rows[public_positions],
                    global_features={m: f[public_positions].to(device) for m, f in plan.public_features.items()},
                )
            parts = train_step(model, optimizers, private, private_rows, global_cache, public_batch, plan, device,
                               diagnostics.discriminators if diagnostics is not None else None)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
            heartbeat()
        if round_start is not None:  # CreamFL: one regularising pass over the public set after each epoch
            totals["contrast"] = totals.get("contrast", 0.0) + public_pass(
                model, optimizers, public, plan.public_rows, batch_size, generator, device,
                lambda positions, locals_: plan.contrast_weight * sum(
                    creamfl_regularisers(local, round_start[m][positions].to(device), positions.to(device), m,
                                         global_public, plan.contrast_temperature)
                    for m, local in locals_.items())) / plan.local_epochs
        if temperatures is not None:  # FedCMI: the infiltration projector's distillation toward the dominant modality
            totals["infiltration"] = totals.get("infiltration", 0.0) + public_pass(
                model, optimizers, public, plan.public_rows, batch_size, generator, device,
                lambda positions, locals_: plan.infiltration_weight * infiltration_loss(
                    model, next(iter(locals_.values())), positions.to(device), global_public[plan.dominant_modality],
                    plan.contrast_temperature * temperatures)) / plan.local_epochs
    per_step = {key: value / max(steps, 1) for key, value in totals.items() if key not in ("digest", "contrast", "infiltration")}
    means = {**totals, **per_step}
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"training diverged in round {plan.round}: {means}")
    return means


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


def _cycle(count: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of positions in range(count)."""
    while True:
        yield from batch_indices(count, batch_size, generator)


@torch.no_grad()
def public_features(model: LocalModel, public: ModalData, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
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
    metrics = retrieval_metrics(outputs["image"], outputs["text"], torch.arange(len(test)))
    held = held_rows(labels, train_labels)
    if len(held):
        personal = retrieval_metrics(outputs["image"][held], outputs["text"][held], torch.arange(len(held)))
        metrics.update({f"pers_{key}": value for key, value in personal.items()})
    return metrics
