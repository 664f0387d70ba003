"""Granularity-aware feature fusion (GFF), docs/method.md round step 3.

``M(x) = sigmoid(T1(x) + T2(x))`` with T1, T2 two parallel bottlenecks ``d -> d/4 -> d``
(Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d; LayerNorm in place of BatchNorm on differentially private
devices, whose per-sample gradients BatchNorm's batch statistics would mix)::

    h = M(f_l + f_g) * f_l + (1 - M(f_l + f_g)) * f_g      # first level
    z = M'(h) * f_l + (1 - M'(h)) * f_g                    # second level, its own gate

The module is meant to persist across rounds together with its optimiser state (docs/method.md "Where we
deliberately differ"). BatchNorm1d in training mode needs batches of at least two rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["FUSION_NORMS", "bottleneck", "AttentionGate", "GranularityFusion", "gated_mix", "fuse"]


FUSION_NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
"""The bottlenecks' normalisation: batch (docs/method.md's) or layer (DP-SGD: one sample's output depends on it alone)."""


def bottleneck(dim: int, reduction: int = 4, norm: str = "batch") -> nn.Sequential:
    """``Linear(d, d/r), Norm, ReLU, Linear(d/r, d), Norm`` (d/r at least 1; Norm: FUSION_NORMS[norm])."""
    hidden = max(1, dim // reduction)
    Norm = FUSION_NORMS[norm]
    return nn.Sequential(
        nn.Linear(dim, hidden),
        Norm(hidden),
        nn.ReLU(),
        nn.Linear(hidden, dim),
        Norm(dim),
    )


class AttentionGate(nn.Module):
    """``M(x) = sigmoid(T1(x) + T2(x))``: (B, d) -> per-element gate in (0, 1), shape (B, d)."""

    def __init__(self, dim: int, reduction: int = 4, norm: str = "batch") -> None:
        super().__init__()
        self.t1 = bottleneck(dim, reduction, norm)
        self.t2 = bottleneck(dim, reduction, norm)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.t1(x) + self.t2(x))


def gated_mix(gate: Tensor, f_local: Tensor, f_global: Tensor) -> Tensor:
    """``gate * f_local + (1 - gate) * f_global``, elementwise."""
    return gate * f_local + (1.0 - gate) * f_global


def fuse(
    gate1: Callable[[Tensor], Tensor],
    gate2: Callable[[Tensor], Tensor],
    f_local: Tensor,
    f_global: Tensor,
) -> Tensor:
    """The two-level GFF formula with any gate callables (B, d) -> (B, d); returns z (B, d)."""
    if f_local.shape != f_global.shape:
        raise ValueError(
            f"f_local {tuple(f_local.shape)} and f_global {tuple(f_global.shape)} shapes differ"
        )
    h = gated_mix(gate1(f_local + f_global), f_local, f_global)  # (B, d)
    return gated_mix(gate2(h), f_local, f_global)  # (B, d)


class GranularityFusion(nn.Module):
    """Two-level GFF with two independent :class:`AttentionGate` s: ``forward(f_l, f_g) -> z``."""

    def __init__(self, dim: int, reduction: int = 4, norm: str = "batch") -> None:
        super().__init__()
        self.gate1 = AttentionGate(dim, reduction, norm)
        self.gate2 = AttentionGate(dim, reduction, norm)

    def forward(self, f_local: Tensor, f_global: Tensor) -> Tensor:
        return fuse(self.gate1, self.gate2, f_local, f_global)
