"""What an edge device trains (local encoders, fusion, task head, discriminators) and the frozen global tower."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedafd.edge_client.alignment import Discriminator
from fedafd.edge_client.fusion import GranularityFusion
from fedafd.runtime.config import CLASSIFIER_HEADS
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.models import ADAPTER_DROPOUT, build_encoder, encode_rows, input_view, l2_normalise, lr_groups
from fedafd.runtime.vocabulary import MODALITIES_OF_KIND


MAX_HEAD_SCALE = 100.0
"""Ceiling of the cosine head's learnable logit scale (as CLIP caps its temperature)."""


class CosineClassifier(nn.Module):
    """``logits = s * <z / |z|, w_c / |w_c|>`` with a learnable scale ``s = exp(log_scale)`` (capped at
    MAX_HEAD_SCALE), so logits can grow past the +-|w| a linear layer reads from unit-norm (or convex mixes of
    unit-norm) features. (B, d) -> (B, C)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"the cosine head's initial scale must be > 0, got {scale}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=in_features ** -0.5)
        self.log_scale = nn.Parameter(torch.tensor(float(math.log(scale))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosine = l2_normalise(features) @ l2_normalise(self.weight).T  # (B, C)
        return self.log_scale.clamp(max=math.log(MAX_HEAD_SCALE)).exp() * cosine


def build_head(head: str, feature_dim: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    """A classification head of the given kind (HEADS)."""
    if head == "cosine":
        return CosineClassifier(feature_dim, num_classes, scale)
    if head == "linear":
        return nn.Linear(feature_dim, num_classes)
    raise ValueError(f"unknown head {head!r}; known: {', '.join(CLASSIFIER_HEADS)}")


def saved_model_options(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """The LocalModel options a saved state_dict was built with, read off its keys: the head (a cosine head
    keeps its log scale) and the fusion's norm (BatchNorm keeps running statistics)."""
    return {"head": "cosine" if "head.log_scale" in weights else "linear",
            "fusion_norm": "batch" if any(k.startswith("fusions.") and k.endswith(".running_mean") for k in weights)
            or not any(k.startswith("fusions.") for k in weights) else "layer"}


class LocalModel(nn.Module):
    """A device's own model. Multimodal devices keep one fusion module per modality (the image and text
    features come from different towers, so one shared gate would have to serve two distributions)."""

    def __init__(self, kind: str, image_arch: str, text_arch: str, feature_dim: int, num_classes: int,
                 adapter_dropout: float = ADAPTER_DROPOUT, head: str = "linear", head_scale: float = 16.0,
                 fusion_norm: str = "batch"):
        super().__init__()
        self.kind = kind
        self.modalities = MODALITIES_OF_KIND[kind]
        archs = {"image": image_arch, "text": text_arch}
        self.encoders = nn.ModuleDict({m: build_encoder(m, archs[m], feature_dim, adapter_dropout)
                                       for m in self.modalities})
        self.fusions = nn.ModuleDict({m: GranularityFusion(feature_dim, norm=fusion_norm) for m in self.modalities})
        # Classification devices: a head on the fused feature (`head`: cosine with a learnable scale, or the
        # paper's linear). Retrieval devices: a learnable InfoNCE temperature (log scale, CLIP's init 1/0.07).
        self.head = build_head(head, feature_dim, num_classes, head_scale) if kind != "multimodal" else None
        self.logit_scale = nn.Parameter(torch.tensor(2.6593)) if kind == "multimodal" else None
        self.discriminators = nn.ModuleDict({"intra": Discriminator(feature_dim), "cross": Discriminator(feature_dim)})
        # FedCMI's infiltration projector (classification devices): trained only under that strategy.
        self.infiltration = nn.Linear(feature_dim, feature_dim) if kind != "multimodal" else None

    def infiltrate(self, local: torch.Tensor) -> torch.Tensor:
        """FedCMI: the infiltration projector's view of a local feature, L2-normalised like the feature."""
        return l2_normalise(self.infiltration(local))

    def view(self, modality: str) -> str:
        """What the local encoder of `modality` reads (raw inputs or a backbone's cached features)."""
        return input_view(self.encoders[modality])

    def encode(self, modality: str, data: ModalData, rows, device: torch.device) -> torch.Tensor:
        """Local features of `rows` of `data`: (B, d), L2-normalised."""
        return encode_rows(self.encoders[modality], modality, data, rows, device)

    def fuse(self, modality: str, local: torch.Tensor, global_: torch.Tensor | None) -> torch.Tensor:
        """z, the feature the task consumes: GFF of local and global when a global feature is given."""
        if global_ is None:
            return local
        return self.fusions[modality](local, global_)

    def head_outputs(self, modality: str, local: torch.Tensor, global_: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, output): the fused feature and what the task reads from it, class logits (B, C) for a
        classifier, z L2-normalised (B, d) for retrieval. Training, evaluation and the exported ONNX
        graph all go through here."""
        fused = self.fuse(modality, local, global_)
        return fused, (self.head(fused) if self.head is not None else l2_normalise(fused))

    def start_from(self, towers: "GlobalTowers", archs: dict[str, str]) -> tuple[str, ...]:
        """Copy the server's tower into each local encoder of the same architecture (`archs`: this
        device's); returns the modalities copied. A device that starts in the server's feature space
        uploads features SED can compare sample by sample; weights only ever come down."""
        copied = []
        for modality in self.modalities:
            if towers.has(modality) and towers.archs.get(modality) == archs[modality]:
                self.encoders[modality].load_state_dict(towers.encoders[modality].state_dict())
                copied.append(modality)
        return tuple(copied)

    def named_task_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Everything the task/generator step updates (not the discriminators), by name."""
        return [(name, p) for name, p in self.named_parameters() if not name.startswith("discriminators.")]

    def private_modules(self, fuses: bool) -> nn.ModuleDict:
        """What the private task loss trains (DP-SGD wraps exactly these): the local encoders, the fusions when the
        round fuses, and the head. The discriminators only ever see public rows and G; a retrieval device's logit
        scale is a bare parameter, and retrieval is not DP-trained (its InfoNCE couples the samples of a batch)."""
        parts = {"encoders": self.encoders, **({"fusions": self.fusions} if fuses else {})}
        if self.head is not None:
            parts["head"] = self.head
        return nn.ModuleDict(parts)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminators.parameters())


class GlobalTowers:
    """The server's encoders (those it sent): frozen, always in eval mode (BatchNorm never drifts,
    dropout never fires), replaced whenever the server sends a new version."""

    def __init__(self, feature_dim: int, device: torch.device):
        self.feature_dim = feature_dim
        self.device = device
        self.version = -1
        self.archs: dict[str, str] = {}
        self.encoders: dict[str, nn.Module] = {}

    def load(self, version: int, archs: dict[str, str], flat_state: dict[str, torch.Tensor]) -> None:
        """flat_state keys are 'MODALITY.param.name' (the wire's tower tensors)."""
        by_modality: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat_state.items():
            modality, _, name = key.partition(".")
            by_modality.setdefault(modality, {})[name] = tensor
        encoders = {}
        for modality, state in by_modality.items():
            if modality not in archs:
                raise ValueError(f"tower weights for {modality!r} arrived without its architecture name")
            encoder = build_encoder(modality, archs[modality], self.feature_dim)
            encoder.load_state_dict(state, strict=True)
            encoder.to(self.device).eval().requires_grad_(False)
            encoders[modality] = encoder
        self.encoders, self.archs, self.version = encoders, {m: archs[m] for m in encoders}, version

    def flat_state(self) -> dict[str, torch.Tensor]:
        return {f"{m}.{name}": t.detach().cpu() for m, enc in self.encoders.items() for name, t in enc.state_dict().items()}

    def has(self, modality: str) -> bool:
        return modality in self.encoders

    @torch.no_grad()
    def encode(self, modality: str, data: ModalData, rows, device: torch.device) -> torch.Tensor:
        return encode_rows(self.encoders[modality], modality, data, rows, device)


def adam_groups(named: list[tuple[str, nn.Parameter]], lr: float, fusion_lr: float,
                towers: dict[str, float] | None = None) -> list[dict]:
    """Adam's parameter groups: GFF's gates ("fusions.*") at fusion_lr, the rest at lr; one group when fusion_lr is
    0 or lr (the paper's single rate, and the optimiser states saved before fusion_lr existed). The gates end in BatchNorm,
    whose bias alone sets a gate's mean: at lr 1e-3 Adam moves it by at most 1e-3 a step (docs/learning.md H10).
    A finetune tower with an lr of its own (`towers`: models.tower_lrs) gets one more group at it."""
    own = {"fusions.": fusion_lr} if fusion_lr and fusion_lr != lr else {}
    return lr_groups(named, lr, own | (towers or {}))
