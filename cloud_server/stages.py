"""The server's learning stages as plain functions over models and tensors (no sockets here).

Stage 1 trains the global encoders on the public pairs and extracts their features; stage 3 distils the
global encoders toward the clients' (similarity-weighted) public features; evaluation is retrieval on the
held-out public split.

Each takes `ranks` (distributed.py): with several server ranks each trains and encodes its shard of every
global batch; with one (the default) every hook is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from fedafd.cloud_server.contrastive import build_contrastive_loss
from fedafd.cloud_server.distributed import ONE_PROCESS, Ranks
from fedafd.runtime.losses import DISTILL_TARGETS
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.models import (ADAPTER_DROPOUT, TowerEncoder, build_encoder, encode_all, encode_rows,
                                   encoder_backbone, lr_groups, tower_lrs)
from fedafd.runtime.retrieval import pair_retrieval_metrics
from fedafd.runtime.torch_utils import batch_indices


class GlobalModel(nn.Module):
    """The server's global image and text encoders and the stage-1 loss (whose a, b are learnable)."""

    def __init__(self, image_arch: str, text_arch: str, feature_dim: int, contrastive_loss: str,
                 adapter_dropout: float = ADAPTER_DROPOUT):
        super().__init__()
        self.archs = {"image": image_arch, "text": text_arch}
        self.encoders = nn.ModuleDict({m: build_encoder(m, arch, feature_dim, adapter_dropout)
                                       for m, arch in self.archs.items()})
        self.loss = build_contrastive_loss(contrastive_loss)

    def backbones(self) -> dict[str, str]:
        """Modality -> the backbone its tower adapts, or the finetune tower it runs (towers trained from scratch
        have none): what a device must hold to run the tower."""
        return {m: b for m, e in self.encoders.items() if (b := encoder_backbone(e)) is not None}

    def tower_state(self, modalities: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Flat 'MODALITY.param' weights of the given towers, on the CPU (the downlink's tower tensors)."""
        return {f"{m}.{name}": t.detach().cpu().contiguous()
                for m in modalities for name, t in self.encoders[m].state_dict().items()}


def build_optimizers(model: GlobalModel, lr: float, distill_lr: float) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Stage 1's Adam (the encoders and the loss's a, b) and stage 3's own: Adam's moments of the contrastive
    loss are not those of distillation."""
    towers = tower_lrs(model)  # a finetune tower at its own rate in both
    return (torch.optim.Adam(lr_groups(list(model.named_parameters()), lr, towers), lr=lr),
            torch.optim.Adam(lr_groups([(f"encoders.{n}", p) for n, p in model.encoders.named_parameters()], distill_lr,
                                       towers), lr=distill_lr))


def mixed_precision(model: nn.Module, device: torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA when the model runs a finetune tower (a ResNet or BERT trained end to end: where
    the cost is); a no-op otherwise, so the adapters' numbers stay exactly fp32. Losses autocast to fp32."""
    enabled = device.type == "cuda" and any(isinstance(m, TowerEncoder) for m in model.modules())
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def train_contrastive_epoch(model: GlobalModel, optimizer: torch.optim.Optimizer, public: ModalData,
                            batch_size: int, generator: torch.Generator, device: torch.device,
                            ranks: Ranks = ONE_PROCESS) -> float:
    """Stage 1: one epoch of the image-text contrastive loss over the public pairs; mean loss. With several
    ranks the loss is over the whole global batch: the shards' features are gathered with their gradients."""
    model.train()
    encoders = {m: ranks.replica(e) for m, e in model.encoders.items()}
    loss_fn = ranks.replica(model.loss)
    total, steps = 0.0, 0
    for rows in batch_indices(len(public), batch_size, generator):
        if len(rows) < max(2, ranks.world_size):  # a contrastive batch needs negatives, every rank a row
            continue
        mine = ranks.shard(rows)
        with mixed_precision(model, device):
            image = ranks.gather(encode_rows(encoders["image"], "image", public, mine, device), len(rows))  # (B, d)
            text = ranks.gather(encode_rows(encoders["text"], "text", public, mine, device), len(rows))  # (B, d)
            loss = loss_fn(image.float(), text.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


@torch.no_grad()
def extract_features(encoder: nn.Module, data: ModalData, modality: str, device: torch.device,
                     batch_size: int = 256, ranks: Ranks = ONE_PROCESS) -> torch.Tensor:
    """(N, d) L2-normalised features in eval mode, rows in order (every rank encodes its shard; all get all)."""
    encoder.eval()
    mine = ranks.shard(torch.arange(len(data)))
    return ranks.gather(encode_all(lambda part: encode_rows(encoder, modality, data, mine[part], device), len(mine),
                                   batch_size), len(data))


def distill_epoch(model: GlobalModel, optimizer: torch.optim.Optimizer, public: ModalData,
                  teachers: dict[str, torch.Tensor], gamma: float, batch_size: int, generator: torch.Generator,
                  device: torch.device, ranks: Ranks = ONE_PROCESS, target: str = "features") -> float:
    """Stage 3: gamma * MSE between each global encoder's output and its modality's teacher, over P.
    Modalities without a teacher (no client sent them this round) are skipped. Per sample, so each rank
    needs only its shard (weighted by its share of the batch). `target` (runtime.losses.DISTILL_TARGETS):
    features (docs/method.md) or relations (the cosine similarities within each rank's shard of the batch)."""
    if not teachers:
        return 0.0
    model.train()
    encoders = {m: ranks.replica(e) for m, e in model.encoders.items()}
    total, steps = 0.0, 0
    for rows in batch_indices(len(public), batch_size, generator):
        if len(rows) < max(2, ranks.world_size):  # BatchNorm cannot train on a batch of one, every rank needs a row
            continue
        mine = ranks.shard(rows)
        with mixed_precision(model, device):
            loss = ranks.share(len(mine), len(rows)) * sum(
                DISTILL_TARGETS[target](encode_rows(encoders[m], m, public, mine, device).float(),
                                        teacher[mine.to(teacher.device)], gamma)
                for m, teacher in teachers.items()
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
    return ranks.average(total) / max(steps, 1)


@torch.no_grad()
def evaluate_retrieval(model: GlobalModel, test: ModalData, device: torch.device,
                       ranks: Ranks = ONE_PROCESS) -> dict[str, float]:
    """Server retrieval on its test pairs (rows of one picture share its image id: one candidate per picture,
    one query per caption); rank 0 alone computes the metrics (the others return {})."""
    image = extract_features(model.encoders["image"], test, "image", device, ranks=ranks)
    text = extract_features(model.encoders["text"], test, "text", device, ranks=ranks)
    return pair_retrieval_metrics(image, text, test.image_ids) if ranks.is_main else {}
