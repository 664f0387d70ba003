"""Bi-level adversarial alignment (BAA), docs/method.md round step 3.

Two discriminators push a client's local features of the public set toward the server's global
features: ``D_in`` (intra-modal) takes the global feature of the same modality as "real", ``D_cr``
(cross-modal) the global feature of the other modality; the local feature is "fake" for both.
Discriminators return *logits*, scored with BCE-with-logits (the research code applied a sigmoid
twice; docs/method.md "Where we deliberately differ").

For a multimodal client, call the losses once per modality (image local feature with
``global_same=G_img, global_other=G_txt``; text local feature with the two swapped) and add them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedafd.edge_client.diagnostics import DiscriminatorTally
from fedafd.runtime.vocabulary import other_modality

__all__ = ["Discriminator", "discriminator_logits", "discriminator_loss", "generator_loss", "discriminator_step"]


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


def discriminator_logits(
    d_intra: nn.Module, d_cross: nn.Module, fake: Tensor, global_same: Tensor, global_other: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"intra": (D_in(g_same), D_in(fake)), "cross": (D_cr(g_other), D_cr(fake))}``: each discriminator's
    (real, fake) logits, (B,) each. The loss scores them, and the diagnostics count its right calls."""
    return {"intra": (d_intra(global_same), d_intra(fake)), "cross": (d_cross(global_other), d_cross(fake))}


def discriminator_loss(
    d_intra: nn.Module,
    d_cross: nn.Module,
    local: Tensor,
    global_same: Tensor,
    global_other: Tensor,
    beta: float,
    real_label: float = 1.0,
    tally: DiscriminatorTally | None = None,
) -> Tensor:
    """``beta * [BCE(D_in(g_same), 1) + BCE(D_in(f), 0) + BCE(D_cr(g_other), 1)
    + BCE(D_cr(f), 0)]``.

    ``f = local.detach()`` and the global features are detached too, so only the discriminators
    receive gradients. Each BCE is a mean over the batch. All inputs are (B, d). ``real_label`` below 1
    is one-sided label smoothing (a stabiliser; docs/method.md's loss is 1.0). ``tally`` (diagnostics), when
    given, counts the discriminators' right calls on these very logits.
    """
    logits = discriminator_logits(d_intra, d_cross, local.detach(), global_same.detach(), global_other.detach())
    if tally is not None:
        tally.add(logits)
    return beta * sum(_bce(real, real_label) + _bce(fake, 0.0) for real, fake in logits.values())


def generator_loss(d_intra: nn.Module, d_cross: nn.Module, local: Tensor, beta: float) -> Tensor:
    """``beta * [BCE(D_in(local), 1) + BCE(D_cr(local), 1)]``: the encoder's adversarial loss.

    Gradients flow into ``local`` (and, as a side effect, into the discriminators' ``.grad``;
    `discriminator_step` clears those before it steps). The device adds it to its task loss and takes
    one step on the sum (docs/method.md: client loss = L_task + beta * L_adv).
    """
    return beta * (_bce(d_intra(local), 1.0) + _bce(d_cross(local), 1.0))


def discriminator_step(
    d_intra: nn.Module,
    d_cross: nn.Module,
    d_optimizer: torch.optim.Optimizer,
    local: dict[str, Tensor],
    global_: dict[str, Tensor],
    beta: float,
    real_label: float = 1.0,
    tally: DiscriminatorTally | None = None,
) -> float:
    """One optimiser step of both discriminators, on every modality's local features (fake; a
    multimodal client passes two) against the server's global features (real): the same modality's for
    ``D_in``, the other modality's for ``D_cr``. The local features are detached inside, so no encoder
    gradient is touched. Returns L_D (already multiplied by ``beta``). ``tally`` (diagnostics), when given,
    counts the discriminators' right calls on the logits of this step, before it updates them."""
    loss = sum(discriminator_loss(d_intra, d_cross, f, global_[m], global_[other_modality(m)], beta, real_label, tally)
               for m, f in local.items())
    d_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    d_optimizer.step()
    return float(loss.detach())
