"""What an edge device trains (local encoders, fusion, task head, discriminators) and the frozen global tower."""

from __future__ import annotations

import torch
from torch import nn

from fedafd.edge_client.alignment import Discriminator
from fedafd.edge_client.fusion import GranularityFusion
from fedafd.runtime.models import build_image_encoder, build_text_encoder
from fedafd.runtime.wire import MODALITIES_OF_KIND


def other_modality(modality: str) -> str:
    return "text" if modality == "image" else "image"


def build_encoder(modality: str, arch: str, feature_dim: int) -> nn.Module:
    if modality == "image":
        return build_image_encoder(arch, feature_dim)
    return build_text_encoder(arch, feature_dim)


class LocalModel(nn.Module):
    """A device's own model. Multimodal devices keep one fusion module per modality (the image and text
    features come from different towers, so one shared gate would have to serve two distributions)."""

    def __init__(self, kind: str, image_arch: str, text_arch: str, feature_dim: int, num_classes: int):
        super().__init__()
        self.kind = kind
        self.modalities = MODALITIES_OF_KIND[kind]
        archs = {"image": image_arch, "text": text_arch}
        self.encoders = nn.ModuleDict({m: build_encoder(m, archs[m], feature_dim) for m in self.modalities})
        self.fusions = nn.ModuleDict({m: GranularityFusion(feature_dim) for m in self.modalities})
        # Classification devices: a linear head on the fused feature. Retrieval devices: a learnable
        # InfoNCE temperature (log scale, CLIP's init 1/0.07).
        self.head = nn.Linear(feature_dim, num_classes) if kind != "multimodal" else None
        self.logit_scale = nn.Parameter(torch.tensor(2.6593)) if kind == "multimodal" else None
        self.discriminators = nn.ModuleDict({"intra": Discriminator(feature_dim), "cross": Discriminator(feature_dim)})

    def encode(self, modality: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.encoders[modality](*inputs)  # (B, d), L2-normalised

    def fuse(self, modality: str, local: torch.Tensor, global_: torch.Tensor | None) -> torch.Tensor:
        """The feature the task consumes: GFF of local and global when a global feature is given."""
        if global_ is None:
            return local
        return self.fusions[modality](local, global_)

    def task_parameters(self) -> list[nn.Parameter]:
        """Everything the task/generator step updates (not the discriminators)."""
        return [p for name, p in self.named_parameters() if not name.startswith("discriminators.")]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminators.parameters())


class GlobalTowers:
    """The server's encoders of this device's modalities: frozen, always in eval mode (BatchNorm never
    drifts, dropout never fires), replaced whenever the server sends a new version."""

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
        self.encoders, self.archs, self.version = encoders, dict(archs), version

    def flat_state(self) -> dict[str, torch.Tensor]:
        return {f"{m}.{name}": t.detach().cpu() for m, enc in self.encoders.items() for name, t in enc.state_dict().items()}

    def has(self, modality: str) -> bool:
        return modality in self.encoders

    @torch.no_grad()
    def encode(self, modality: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.encoders[modality](*inputs)
