"""The losses both sides share: one InfoNCE (server stage 1, retrieval devices, CreamFL's regularisers,
FedCMI's infiltration) and one feature regression (server stage 3, FedMD's digest, FedGEMS/FedET devices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(queries: Tensor, keys: Tensor, scale: Tensor | float, symmetric: bool = True) -> Tensor:
    """Cross-entropy of ``scale * <q_i, k_j>`` with the matched row as the target (row i <-> row i), on
    L2-normalised inputs; symmetric: the mean of both directions (CLIP's loss)."""
    if queries.dim() != 2 or queries.shape != keys.shape:
        raise ValueError(f"expected paired (B, d) features, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    logits = scale * (F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T)  # (B, B)
    targets = torch.arange(len(logits), device=logits.device)
    forward = F.cross_entropy(logits, targets)
    return 0.5 * (forward + F.cross_entropy(logits.T, targets)) if symmetric else forward


def distillation_loss(student: Tensor, teacher: Tensor, gamma: float) -> Tensor:
    """``gamma * MSE(student, teacher)``, mean over all elements; the teacher gets no gradient."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    return gamma * F.mse_loss(student, teacher.detach().to(student.dtype))


def relation_loss(student: Tensor, teacher: Tensor, gamma: float) -> Tensor:
    """``gamma * MSE(S S^T, T T^T)`` over a batch, S and T the L2-normalised rows of student and teacher (B, d):
    the student's cosine similarities between the batch's samples regressed toward the teacher's. Invariant to
    any rotation of the teacher's space, so a teacher in a space of its own teaches its relations, not its
    coordinates. The teacher gets no gradient."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher.detach().to(student.dtype), dim=-1)
    return gamma * F.mse_loss(s @ s.T, t @ t.T)  # (B, B) each


DISTILL_TARGETS = {"features": distillation_loss, "relations": relation_loss}
"""Stage 3's targets: the teacher's features (docs/method.md's MSE) or its within-batch relations."""
