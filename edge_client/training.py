"""Stage 2 on a device: BAA over the public set, GFF over the private data, the task loss. No sockets here."""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fedafd.edge_client.alignment import discriminator_loss, generator_loss
from fedafd.edge_client.model import GlobalTowers, LocalModel, other_modality
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.retrieval import retrieval_metrics, top1_accuracy
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
    """Cross-entropy on the fused feature (classification) or InfoNCE between fused features (retrieval)."""
    fused = {}
    for modality in model.modalities:
        local = model.encode(modality, data.batch(modality, rows, device))
        global_ = global_cache[modality][rows.to(global_cache[modality].device)] if modality in global_cache else None
        fused[modality] = model.fuse(modality, local, global_)
    if model.head is not None:
        (feature,) = fused.values()
        return F.cross_entropy(model.head(feature), data.label_batch(rows, device))
    return retrieval_loss(fused["image"], fused["text"], model.logit_scale)


@contextlib.contextmanager
def batchnorm_statistics_frozen(module: torch.nn.Module) -> Iterator[None]:
    """Forward passes inside still normalise with their batch's statistics (and back-propagate through
    them) but leave every BatchNorm's running mean and variance as they were (momentum 0)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, saved):
            norm.momentum = momentum


@dataclass(frozen=True)
class PublicBatch:
    """A batch of public pairs with the server's global features of the same rows."""

    inputs: dict[str, tuple[torch.Tensor, ...]]  # modality -> encoder inputs
    global_features: dict[str, torch.Tensor]  # modality -> (B, d)


def train_step(model: LocalModel, optimizers: Optimizers, private: ModalData, private_rows: torch.Tensor,
               global_cache: dict[str, torch.Tensor], public_batch: PublicBatch | None, beta: float,
               device: torch.device) -> dict[str, float]:
    """One step: (BAA, when a public batch is given) one discriminator step, then one step of the local
    model on L_task + L_G against the freshly updated discriminators. Returns the loss parts by name."""
    parts = {"task": 0.0, "adv_gen": 0.0, "disc": 0.0}
    adversarial = torch.zeros((), device=device)
    if public_batch is not None:
        intra, cross = model.discriminators["intra"], model.discriminators["cross"]
        g = public_batch.global_features
        # Public pictures (colour emoji) are not what the device classifies: they must not move the
        # BatchNorm statistics its private task is evaluated with.
        with batchnorm_statistics_frozen(model):
            locals_ = {m: model.encode(m, public_batch.inputs[m]) for m in model.modalities}
        # The local features are detached here, so the discriminator step touches no encoder gradient.
        disc = sum(discriminator_loss(intra, cross, local.detach(), g[m], g[other_modality(m)], beta)
                   for m, local in locals_.items())
        optimizers.discriminator.zero_grad(set_to_none=True)
        disc.backward()
        optimizers.discriminator.step()
        adversarial = sum(generator_loss(intra, cross, local, beta) for local in locals_.values())
        parts["disc"], parts["adv_gen"] = disc.item(), adversarial.item()
    task = task_loss(model, private, private_rows, global_cache, device)
    optimizers.task.zero_grad(set_to_none=True)
    (task + adversarial).backward()
    optimizers.task.step()
    parts["task"] = task.item()
    return parts


@torch.no_grad()
def encode_all(encode: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], data: ModalData, modality: str,
               device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """(N, d) features of every row, in order."""
    outputs = [encode(data.batch(modality, rows, device)) for rows in batch_indices(len(data), batch_size)]
    return torch.cat(outputs) if outputs else torch.zeros(0)


def global_features(towers: GlobalTowers, data: ModalData, modalities: tuple[str, ...],
                    device: torch.device) -> dict[str, torch.Tensor]:
    """f_g of the private data: the tower is frozen for the whole round, so compute it once and cache it."""
    return {m: encode_all(lambda x, m=m: towers.encode(m, x), data, m, device) for m in modalities if towers.has(m)}


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
                rows = plan.public_rows[public_positions]
                public_batch = PublicBatch(
                    inputs={m: public.batch(m, rows, device) for m in model.modalities},
                    global_features={m: f[public_positions].to(device) for m, f in plan.public_features.items()},
                )
            parts = train_step(model, optimizers, private, private_rows, global_cache, public_batch, plan.beta, device)
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
    subset = public.select(rows.numpy())
    return {m: encode_all(lambda x, m=m: model.encode(m, x), subset, m, device).cpu() for m in model.modalities}


@torch.no_grad()
def evaluate(model: LocalModel, towers: GlobalTowers, test: ModalData, use_fusion: bool,
             device: torch.device) -> dict[str, float]:
    """Top-1 (%) on fused features for classifiers; R@K (%) both directions for retrieval devices."""
    model.eval()
    use_global = use_fusion and all(towers.has(m) for m in model.modalities)
    fused = {}
    for modality in model.modalities:
        local = encode_all(lambda x, m=modality: model.encode(m, x), test, modality, device)
        global_ = encode_all(lambda x, m=modality: towers.encode(m, x), test, modality, device) if use_global else None
        fused[modality] = model.fuse(modality, local, global_)
    if model.head is not None:
        (feature,) = fused.values()
        return {"top1": top1_accuracy(model.head(feature), test.label_batch(slice(None), device))}
    return retrieval_metrics(fused["image"], fused["text"], torch.arange(len(test)))
