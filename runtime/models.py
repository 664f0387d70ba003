"""The model zoo both sides build from: image and text encoders that end in an L2-normalised (B, d) feature.

Two families, which a federation mixes:
- trained from scratch on raw inputs (`cnn_small`, `resnet_tiny`; `gru`, `transformer_tiny`): images
  float in [0, 1] (B, 3, 32, 32), texts (input_ids, attention_mask) int64 (B, L) from the MiniLM tokenizer;
- adapters over a frozen pretrained backbone (`effnet_linear`, `effnet_mlp` over EfficientNet-Lite0;
  `minilm_linear`, `minilm_mlp` over all-MiniLM-L6-v2): they read the backbone's cached features
  (runtime/backbones.py, runtime/data/features.py). With a tower of the user's own named (`image_tower`,
  `text_tower`), an adapter reads that tower instead: `resolve_arch` makes the architecture
  `tower_linear@NAME` or `tower_mlp@NAME`, NAME the registered tower (its source and digest), so two
  encoders of one architecture string always read the same weights.

Clients and the server may each pick a different architecture: FedAFD only ever compares features,
never weights.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedafd.runtime.backbones import BACKBONES, backbone_spec, is_cached, masked_mean, register_tower, user_tower
from fedafd.runtime.data.modal import RAW, ModalData
from fedafd.runtime.data.views import INPUTS_PREFIX
from fedafd.runtime.data.text import MAX_TEXT_LEN, PAD_ID, VOCAB_SIZE
from fedafd.runtime.torch_utils import batch_indices

# Channel statistics of the 3x32x32 training images are unknown ahead of time (they mix grayscale
# products, emoji and stamps), so the small nets centre [0, 1] on 0.5; BatchNorm does the rest.
_SMALL_MEAN, _SMALL_STD = 0.5, 0.5
ADAPTER_DROPOUT = 0.5
"""Dropout on the backbone feature an adapter reads (train mode only): with about a thousand public
pairs a linear adapter over 1,280 features overfits, and 0.5 lifted held-out emoji rsum from 249 to 268."""
ADAPTER_HIDDEN = 512
"""Hidden width of the MLP adapters."""


def l2_normalise(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1, eps=1e-6)


class CnnSmall(nn.Module):
    """Three conv blocks (32, 64, 128 channels), global average pool, a linear projection to d."""

    def __init__(self, feature_dim: int):
        super().__init__()
        blocks = []
        width = 3
        for channels in (32, 64, 128):
            blocks += [nn.Conv2d(width, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            width = channels
        self.features = nn.Sequential(*blocks)
        self.project = nn.Linear(width, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features((images - _SMALL_MEAN) / _SMALL_STD)  # (B, 128, 4, 4)
        return l2_normalise(self.project(x.mean(dim=(2, 3))))  # (B, d)


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with an identity (or 1x1 strided) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetTiny(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem and three stages of one basic block each (32, 64, 128 channels)."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 64, 2), BasicBlock(64, 128, 2))
        self.project = nn.Linear(128, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem((images - _SMALL_MEAN) / _SMALL_STD))  # (B, 128, 8, 8)
        return l2_normalise(self.project(x.mean(dim=(2, 3))))  # (B, d)


class GruEncoder(nn.Module):
    """Token embeddings, a bidirectional GRU, the mean of its outputs over real tokens, a linear projection."""

    def __init__(self, feature_dim: int, embed_dim: int = 128, hidden: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, embed_dim, padding_idx=PAD_ID)
        self.gru = nn.GRU(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.project = nn.Linear(2 * hidden, feature_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.gru(self.embedding(input_ids))  # (B, L, 2H)
        return l2_normalise(self.project(masked_mean(outputs, attention_mask)))  # (B, d)


class TransformerTiny(nn.Module):
    """A 2-layer, 128-wide BERT built with `transformers` from a config (random init), mean-pooled."""

    def __init__(self, feature_dim: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=256, max_position_embeddings=MAX_TEXT_LEN, pad_token_id=PAD_ID,
                            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.project = nn.Linear(config.hidden_size, feature_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, 128)
        return l2_normalise(self.project(masked_mean(hidden, attention_mask)))  # (B, d)


class SeededDropout(nn.Dropout):
    """nn.Dropout that draws its masks from `generator` when one is set: a device's own stream, so that the
    devices a simulation trains at the same time in one process never share torch's global random numbers.
    Without a generator (the server) it is nn.Dropout; in eval mode (and in an exported graph) the identity."""

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or self.generator is None:
            return super().forward(x)
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)


def use_dropout_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Every SeededDropout in `model` draws from `generator` from now on."""
    for module in model.modules():
        if isinstance(module, SeededDropout):
            module.generator = generator


class BackboneAdapter(nn.Module):
    """The trainable part of a tower over a frozen pretrained backbone: dropout on the backbone's
    pooled feature, then a linear layer (or a one-hidden-layer MLP) to d, L2-normalised.

    It reads the backbone's *cached* features (B, D) (runtime/data/features.py), never pixels or
    tokens: the backbone is the same package on every machine and never trains, so it never travels.
    Only this adapter trains, is checkpointed and crosses the network."""

    def __init__(self, backbone: str, feature_dim: int, hidden: int = 0, dropout: float = ADAPTER_DROPOUT):
        super().__init__()
        self.input_view = backbone
        width = backbone_spec(backbone).dim
        layers: list[nn.Module] = [SeededDropout(dropout)]
        if hidden:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, feature_dim)]
        else:
            layers.append(nn.Linear(width, feature_dim))
        self.project = nn.Sequential(*layers)

    def forward(self, backbone_features: torch.Tensor) -> torch.Tensor:
        return l2_normalise(self.project(backbone_features))  # (B, D) -> (B, d)


class TowerEncoder(nn.Module):
    """A user's tower that trains (train = "finetune") under an adapter: it reads the tower's own inputs (the view
    `inputs:NAME`: pictures at its size, its tokenizer's ids), runs the tower, whose last `finetune_blocks`
    blocks (all: 0) train at the tower's `lr`, and adapts its pooled feature as BackboneAdapter does.

    The tower stays in eval mode while its weights move (BatchNorm statistics and dropout as pretrained), so a
    device never draws from torch's global random numbers. Its state holds only what trains (the adapter and
    the trainable blocks' parameters): the rest is the tower's files, which NAME's digest names, so a
    checkpoint, a device's state and the downlink never carry a frozen weight."""

    def __init__(self, name: str, feature_dim: int, hidden: int = 0, dropout: float = ADAPTER_DROPOUT):
        super().__init__()
        from fedafd.runtime.towers import load_tower

        spec = user_tower(name)
        self.input_view = f"{INPUTS_PREFIX}{name}"
        self.tower = load_tower(spec)
        self.adapter = BackboneAdapter(name, feature_dim, hidden=hidden, dropout=dropout)
        self.tower_lr = spec.lr
        """The tower's own learning rate (0: the optimiser's)."""
        self.travelling = {f"tower.{n}" for n, p in self.tower.named_parameters() if p.requires_grad}
        """The tower's keys its state keeps: its trainable parameters, fixed when built (not when frozen later)."""
        self.frozen = {f"tower.{n}" for n in self.tower.state_dict()} - self.travelling
        self.register_state_dict_post_hook(_keep_travelling)
        self.register_load_state_dict_post_hook(_frozen_not_missing)
        self.tower.eval()

    def train(self, mode: bool = True) -> "TowerEncoder":
        super().train(mode)
        self.tower.eval()  # see the class: only the weights train
        return self

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.tower(*inputs))  # raw tower inputs -> (B, D) -> (B, d)


def _keep_travelling(module: TowerEncoder, state: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state if k.startswith(f"{prefix}tower.") and k[len(prefix):] not in module.travelling]:
        del state[key]


def _frozen_not_missing(module: TowerEncoder, incompatible) -> None:
    """A state without the frozen tower weights is complete: they come from the tower's files."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not any(k == f or k.endswith(f".{f}") for f in module.frozen)]


def tower_lrs(model: nn.Module) -> dict[str, float]:
    """Parameter-name prefix -> learning rate, for every finetune tower in `model` with a rate of its own."""
    return {f"{name}.tower." if name else "tower.": m.tower_lr for name, m in model.named_modules()
            if isinstance(m, TowerEncoder) and m.tower_lr}


def lr_groups(named: list[tuple[str, nn.Parameter]], lr: float, own: dict[str, float]) -> list[dict]:
    """Optimiser parameter groups: the parameters under each prefix of `own` at its rate, the rest at lr (first);
    one group when `own` is empty."""
    groups = [{"params": [p for n, p in named if not any(n.startswith(x) for x in own)], "lr": lr}]
    groups += [{"params": [p for n, p in named if n.startswith(prefix)], "lr": rate} for prefix, rate in own.items()]
    return groups


ADAPTERS: dict[str, tuple[str, int]] = {
    "effnet_linear": ("efficientnet_lite0", 0), "effnet_mlp": ("efficientnet_lite0", ADAPTER_HIDDEN),
    "minilm_linear": ("minilm", 0), "minilm_mlp": ("minilm", ADAPTER_HIDDEN),
}
"""Adapter architecture -> (the frozen backbone it adapts, hidden width; 0: linear). The other
architectures train from scratch on raw inputs."""
TOWER_ADAPTERS: dict[str, int] = {"tower_linear": 0, "tower_mlp": ADAPTER_HIDDEN}
"""Adapters over a user's tower, written `tower_linear@NAME` (resolve_arch): the hidden width (0: linear)."""


def _adapters(modality: str) -> dict[str, Callable[[int, float], nn.Module]]:
    return {arch: (lambda d, dropout, b=backbone, h=hidden: BackboneAdapter(b, d, hidden=h, dropout=dropout))
            for arch, (backbone, hidden) in ADAPTERS.items() if BACKBONES[backbone].modality == modality}


IMAGE_ENCODERS: dict[str, Callable[[int, float], nn.Module]] = {
    "cnn_small": lambda d, dropout: CnnSmall(d),
    "resnet_tiny": lambda d, dropout: ResNetTiny(d),
    **_adapters("image"),
}
TEXT_ENCODERS: dict[str, Callable[[int, float], nn.Module]] = {
    "gru": lambda d, dropout: GruEncoder(d),
    "transformer_tiny": lambda d, dropout: TransformerTiny(d),
    **_adapters("text"),
}
IMAGE_ARCHS = tuple(IMAGE_ENCODERS)
TEXT_ARCHS = tuple(TEXT_ENCODERS)


ENCODERS = {"image": IMAGE_ENCODERS, "text": TEXT_ENCODERS}


def resolve_arch(modality: str, arch: str, tower: str = "") -> str:
    """The architecture an encoder is built with: `arch` itself without a tower; with one (a tower spec, see
    runtime/towers.parse_tower) an adapter arch becomes the same-shaped adapter over that tower,
    `tower_linear@NAME` or `tower_mlp@NAME` (the tower registered as a backbone under NAME). A tower given to
    an encoder trained from scratch is refused: it would not read it."""
    if not tower:
        return arch
    from fedafd.runtime.towers import parse_tower

    key = f"{modality}_tower"
    base = arch.partition("@")[0]
    if base in ADAPTERS:
        hidden = ADAPTERS[base][1]
    elif base in TOWER_ADAPTERS:
        hidden = TOWER_ADAPTERS[base]
    else:
        adapters = [a for a, (b, _) in ADAPTERS.items() if BACKBONES[b].modality == modality] + list(TOWER_ADAPTERS)
        raise ValueError(f"{key} is set but {modality}_arch={arch} trains from scratch on raw inputs and would not "
                         f"read it: pick an adapter ({', '.join(adapters)})")
    spec = parse_tower(_tower_value(tower), key)
    if spec.modality != modality:
        raise ValueError(f"{key}: {spec.path} is a{'n' if spec.modality == 'image' else ''} {spec.modality} tower")
    adapter = "tower_mlp" if hidden else "tower_linear"
    return f"{adapter}@{register_tower(spec)}"


def _tower_value(tower: str) -> str | dict:
    """A tower setting as parse_tower reads it: SOURCE:PATH, or a table (kept in configs as its JSON)."""
    if tower.lstrip().startswith("{"):
        import json

        return json.loads(tower)
    return tower


def build_encoder(modality: str, arch: str, feature_dim: int, dropout: float = ADAPTER_DROPOUT) -> nn.Module:
    """An encoder of the zoo, or an adapter over a registered tower (`tower_linear@NAME`, from resolve_arch);
    `dropout` is the adapters' input dropout (the small nets have none)."""
    base, _, tower = arch.partition("@")
    if tower:
        if base not in TOWER_ADAPTERS:
            raise ValueError(f"unknown tower adapter {base!r} in {arch!r}; choose one of {', '.join(TOWER_ADAPTERS)}")
        if backbone_spec(tower).modality != modality:
            raise ValueError(f"{arch} reads a {backbone_spec(tower).modality} tower, not {modality}")
        if not is_cached(tower):  # a finetune tower runs inside its encoder
            return TowerEncoder(tower, feature_dim, hidden=TOWER_ADAPTERS[base], dropout=dropout)
        return BackboneAdapter(tower, feature_dim, hidden=TOWER_ADAPTERS[base], dropout=dropout)
    zoo = ENCODERS[modality]
    if arch not in zoo:
        raise ValueError(f"unknown {modality} architecture {arch!r}; choose one of {', '.join(zoo)}")
    return zoo[arch](feature_dim, dropout)


def input_view(encoder: nn.Module) -> str:
    """What an encoder reads: RAW (pixels or token ids) or the name of the backbone whose cached
    features it adapts."""
    return getattr(encoder, "input_view", RAW)


def encoder_backbone(encoder: nn.Module) -> str | None:
    """The registered backbone an encoder depends on: the one whose cached features it adapts, or the finetune
    tower it runs (its `inputs:NAME` view); None for an encoder trained from scratch."""
    view = input_view(encoder)
    return None if view == RAW else view.removeprefix(INPUTS_PREFIX)


def backbone_of(arch: str) -> str | None:
    """The frozen backbone an architecture adapts (None: trained from scratch), without building it."""
    if "@" in arch:
        return arch.partition("@")[2]
    return ADAPTERS[arch][0] if arch in ADAPTERS else None


def encode_rows(encoder: nn.Module, modality: str, data: ModalData, rows, device: torch.device) -> torch.Tensor:
    """(B, d) features of `rows` of `data`, from what the encoder reads: raw inputs or its backbone's
    cached features."""
    view = input_view(encoder)
    if view.startswith(INPUTS_PREFIX):  # a finetune tower: its own inputs, prepared as its feature cache would
        from fedafd.runtime.data.features import tower_batch

        if isinstance(rows, torch.Tensor):
            rows = rows.numpy()
        return encoder(*(t.to(device) for t in tower_batch(view.removeprefix(INPUTS_PREFIX), data, rows)))
    return encoder(*data.batch(modality, rows, device, view))


@torch.no_grad()
def encode_all(encode: Callable[[torch.Tensor], torch.Tensor], count: int, batch_size: int = 256) -> torch.Tensor:
    """(N, d) features of rows 0..count-1 in order, in batches; `encode(rows)` encodes one batch of row indices
    (the server's G and evaluation, a device's f_g, uplink and evaluation all batch through here)."""
    outputs = [encode(rows) for rows in batch_indices(count, batch_size)]
    return torch.cat(outputs) if outputs else torch.zeros(0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
