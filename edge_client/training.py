"""Stage 2 on a device: BAA over the public set, GFF over the private data, the task loss. No sockets here."""

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
from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.retrieval import held_rows, personalised_accuracy, retrieval_metrics
from fedafd.runtime.torch_utils import batch_indices, seeded_generator


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
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * image @ text.T  # (B, B)
    targets = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


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


def train_step(model: LocalModel, optimizers: Optimizers, private: ModalData, private_rows: torch.Tensor,
               global_cache: dict[str, torch.Tensor], public_batch: PublicBatch | None, beta: float,
               device: torch.device, real_label: float = 1.0) -> dict[str, float]:
    """One step: (BAA, when a public batch is given) one discriminator step, then one step of the local
    model on L_task + L_G against the freshly updated discriminators. Returns the loss parts by name."""
    parts = {"task": 0.0, "adv_gen": 0.0, "disc": 0.0}
    adversarial = torch.zeros((), device=device)
    if public_batch is not None:
        intra, cross = model.discriminators["intra"], model.discriminators["cross"]
        # The public features are computed exactly as the uplink computes them (eval mode: running
        # BatchNorm statistics, no dropout), so the discriminators judge, and the encoder aligns, the
        # feature the server receives and compares with G; gradients still flow. Colour emoji also
        # never move the statistics the private task is evaluated with.
        with evaluation_mode(model.encoders):
            locals_ = {m: model.encode(m, public_batch.data, public_batch.rows, device) for m in model.modalities}
        parts["disc"] = discriminator_step(intra, cross, optimizers.discriminator, locals_,
                                           public_batch.global_features, beta, real_label)
        adversarial = sum(generator_loss(intra, cross, local, beta) for local in locals_.values())
        parts["adv_gen"] = float(adversarial.detach())
    task = task_loss(model, private, private_rows, global_cache, device)
    optimizers.task.zero_grad(set_to_none=True)
    (task + adversarial).backward()
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
                heartbeat: Callable[[], None] = lambda: None) -> dict[str, float]:
    """E local epochs over the private data, each step paired with a public batch for BAA; returns the
    mean of each loss part over all steps."""
    model.train()
    use_global = plan.gff and all(towers.has(m) for m in model.modalities)
    global_cache = global_features(towers, private, model.modalities, device) if use_global else {}
    if plan.baa and (public is None or plan.public_rows is None or not plan.public_features):
        raise ValueError("BAA needs the public set and the server's global public features")
    generator = seeded_generator(seed * 1_000_003 + plan.round)
    totals = {"task": 0.0, "adv_gen": 0.0, "disc": 0.0}
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
            parts = train_step(model, optimizers, private, private_rows, global_cache, public_batch, plan.beta,
                               device, plan.real_label)
            for key, value in parts.items():
                totals[key] += value
            steps += 1
            heartbeat()
    means = {key: value / max(steps, 1) for key, value in totals.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"training diverged in round {plan.round}: {means}")
    return means


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
             train_labels: torch.Tensor) -> dict[str, float]:
    """Classifiers: top-1 (%) on the whole test split, the personalised top-1 and its full-test bound
    (runtime.retrieval.personalised_accuracy). Retrieval devices: R@K (%) both ways on the whole test
    split and, as pers_*, on the test pairs of the categories the device holds (`train_labels`)."""
    model.eval()
    use_global = use_fusion and all(towers.has(m) for m in model.modalities)
    outputs = {}
    for modality in model.modalities:
        local = encode_all(lambda rows, m=modality: model.encode(m, test, rows, device), len(test))
        global_ = (encode_all(lambda rows, m=modality: towers.encode(m, test, rows, device), len(test))
                   if use_global else None)
        outputs[modality] = model.head_outputs(modality, local, global_)[1]
    labels = test.label_batch(np.arange(len(test)), device)
    if model.head is not None:
        (logits,) = outputs.values()
        return personalised_accuracy(logits.argmax(dim=1), labels, train_labels, model.head.out_features)
    metrics = retrieval_metrics(outputs["image"], outputs["text"], torch.arange(len(test)))
    held = held_rows(labels, train_labels)
    if len(held):
        personal = retrieval_metrics(outputs["image"][held], outputs["text"][held], torch.arange(len(held)))
        metrics.update({f"pers_{key}": value for key, value in personal.items()})
    return metrics
