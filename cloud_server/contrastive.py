"""Stage-1 image-text losses for the global encoders (docs/method.md round step 1).

Both losses take a batch of paired features ``(image (B, d), text (B, d))`` where row ``i`` of one
matches row ``i`` of the other, L2-normalise them, and return a scalar loss. Their temperature-like
parameters are learnable, so the loss module's parameters must go into the server's optimiser.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedafd.runtime.losses import info_nce

__all__ = ["PcmeSoftContrastive", "InfoNceLoss", "build_contrastive_loss"]


def _check_pair(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "expected paired (B, d) features, got image "
            f"{tuple(image_features.shape)} and text {tuple(text_features.shape)}"
        )


def pairwise_distance(u: Tensor, t: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances ``||u_i - t_j||`` -> (B_u, B_t); gradient-safe at zero distance."""
    sq = (u * u).sum(-1, keepdim=True) + (t * t).sum(-1).unsqueeze(0) - 2.0 * (u @ t.T)
    return sq.clamp_min(eps).sqrt()


class PcmeSoftContrastive(nn.Module):
    """PCME soft contrastive loss with one sample per embedding.

    ``l_ij = -a * ||u_i - t_j|| + b`` on L2-normalised features (so distances lie in [0, 2]),
    matching probability ``sigmoid(l_ij)``, binary cross-entropy with target 1 for the matched pairs
    (the diagonal) and 0 for every other pair of the batch.

    Weighting: ``loss = mean over the B positives + mean over the B*(B-1) negatives``. A plain mean
    over all B^2 pairs would let the negatives outweigh the positives (B-1):1 and push every pair
    apart; balancing the two halves trains the matched pairs as hard as the unmatched ones.

    ``a`` and ``b`` are unconstrained learnable scalars, both initialised to 15 (docs/method.md).
    """

    def __init__(self, init_a: float = 15.0, init_b: float = 15.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(init_a)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """(B, B) matching logits ``-a * ||u_i - t_j|| + b`` on L2-normalised features."""
        u = F.normalize(image_features, dim=-1)
        t = F.normalize(text_features, dim=-1)
        return -self.a * pairwise_distance(u, t) + self.b

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        _check_pair(image_features, text_features)
        logits = self.logits(image_features, text_features)  # (B, B)
        n = logits.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        bce = F.binary_cross_entropy_with_logits(logits, eye.to(logits.dtype), reduction="none")
        positive = bce[eye].mean()
        if n == 1:  # no negatives in a batch of one
            return positive
        return positive + bce[~eye].mean()


class InfoNceLoss(nn.Module):
    """CLIP's symmetric cross-entropy over cosine similarities with a learnable log-temperature.

    ``logits = exp(logit_scale) * u @ t.T`` on L2-normalised features; loss = mean of the
    image->text and text->image cross-entropies with the diagonal as targets. ``logit_scale`` is
    initialised to log(1/0.07) and clamped to [0, log(100)] when used, as in CLIP.
    """

    max_logit_scale = math.log(100.0)

    def __init__(self, init_temperature: float = 0.07) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        _check_pair(image_features, text_features)
        return info_nce(image_features, text_features, self.logit_scale.clamp(0.0, self.max_logit_scale).exp())


def build_contrastive_loss(name: str) -> nn.Module:
    """``"pcme"`` -> :class:`PcmeSoftContrastive`, ``"infonce"`` -> :class:`InfoNceLoss`."""
    key = name.strip().lower()
    if key == "pcme":
        return PcmeSoftContrastive()
    if key == "infonce":
        return InfoNceLoss()
    raise ValueError(f"unknown contrastive loss {name!r}; choose 'pcme' or 'infonce'")
