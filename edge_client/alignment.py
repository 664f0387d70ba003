"""Bi-level adversarial alignment (BAA), method.md round step 3.

Two discriminators push a client's local features of the public set toward the server's global
features: ``D_in`` (intra-modal) takes the global feature of the same modality as "real", ``D_cr``
(cross-modal) the global feature of the other modality; the local feature is "fake" for both.
Discriminators return *logits*, scored with BCE-with-logits (the research code applied a sigmoid
twice; method.md "Where we deliberately differ").

For a multimodal client, call the losses once per modality (image local feature with
``global_same=G_img, global_other=G_txt``; text local feature with the two swapped) and add them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Discriminator",
    "discriminator_loss",
    "generator_loss",
    "discriminator_step",
    "encoder_step",
    "alternating_step",
]


class Discriminator(nn.Module):
    """MLP ``d -> 128 -> 64 -> 1`` with LeakyReLU(0.2); ``forward`` returns logits of shape (B,)."""

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 64), negative_slope: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(negative_slope)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def last(self) -> nn.Linear:
        """The output layer (handy for tests that fix the logits)."""
        return self.net[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)  # (B,)


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_loss(
    d_intra: nn.Module,
    d_cross: nn.Module,
    local: Tensor,
    global_same: Tensor,
    global_other: Tensor,
    beta: float,
) -> Tensor:
    """``beta * [BCE(D_in(g_same), 1) + BCE(D_in(f), 0) + BCE(D_cr(g_other), 1)
    + BCE(D_cr(f), 0)]``.

    ``f = local.detach()`` and the global features are detached too, so only the discriminators
    receive gradients. Each BCE is a mean over the batch. All inputs are (B, d).
    """
    fake = local.detach()
    return beta * (
        _bce(d_intra(global_same.detach()), 1.0)
        + _bce(d_intra(fake), 0.0)
        + _bce(d_cross(global_other.detach()), 1.0)
        + _bce(d_cross(fake), 0.0)
    )


def generator_loss(d_intra: nn.Module, d_cross: nn.Module, local: Tensor, beta: float) -> Tensor:
    """``beta * [BCE(D_in(local), 1) + BCE(D_cr(local), 1)]``: the encoder's adversarial loss.

    Gradients flow into ``local`` (and, as a side effect, into the discriminators' ``.grad``; step
    only the encoder optimiser and zero the discriminators' gradients before their next step).
    """
    return beta * (_bce(d_intra(local), 1.0) + _bce(d_cross(local), 1.0))


def discriminator_step(
    d_intra: nn.Module,
    d_cross: nn.Module,
    d_optimizer: torch.optim.Optimizer,
    local: Tensor,
    global_same: Tensor,
    global_other: Tensor,
    beta: float,
) -> float:
    """One optimiser step on the discriminators; the encoder's gradients are not touched."""
    d_optimizer.zero_grad(set_to_none=True)
    loss = discriminator_loss(d_intra, d_cross, local, global_same, global_other, beta)
    loss.backward()
    d_optimizer.step()
    return float(loss.detach())


def encoder_step(
    d_intra: nn.Module,
    d_cross: nn.Module,
    encoder_optimizer: torch.optim.Optimizer,
    local: Tensor,
    beta: float,
) -> float:
    """One optimiser step on the encoder against the current discriminators.

    The discriminators' parameters are frozen (``requires_grad`` off) for the backward pass, so no
    stray gradient is left on them, and restored afterwards.
    """
    frozen = [p for d in (d_intra, d_cross) for p in d.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        encoder_optimizer.zero_grad(set_to_none=True)
        loss = generator_loss(d_intra, d_cross, local, beta)
        loss.backward()
        encoder_optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return float(loss.detach())


def alternating_step(
    d_intra: nn.Module,
    d_cross: nn.Module,
    d_optimizer: torch.optim.Optimizer,
    encoder_optimizer: torch.optim.Optimizer,
    local_fn: Callable[[], Tensor],
    global_same: Tensor,
    global_other: Tensor,
    beta: float,
) -> dict[str, float]:
    """One discriminator step, then one encoder step, on one public batch.

    ``local_fn()`` computes the local feature (B, d) with grad. It is called once: the discriminator
    step uses its detached value and the encoder step backpropagates through it against the
    *updated* discriminators. This equals recomputing it, since the discriminator step leaves the
    encoder's weights untouched, and avoids a second forward (and a second BatchNorm statistics
    update).

    Returns ``{"disc": L_D, "adv_gen": L_G}`` (both already multiplied by ``beta``).
    """
    local = local_fn()
    disc = discriminator_step(d_intra, d_cross, d_optimizer, local, global_same, global_other, beta)
    adv_gen = encoder_step(d_intra, d_cross, encoder_optimizer, local, beta)
    return {"disc": disc, "adv_gen": adv_gen}
