"""Similarity-guided ensemble distillation (SED), method.md round step 5.

Plain functions over tensors, one modality at a time; the caller loops over modalities and skips a
modality that no client sent (these functions raise on ``C == 0`` rather than guess).

For client ``c`` and public sample ``k``, with ``v`` the client's feature and ``g`` the server's
feature of the same modality, both L2-normalised::

    s_ck = <v_ck, g_k> - log sum_j exp(<v_ck, g_j>)     # InfoNCE log-probability over P
    w_ck = softmax_c(s_ck)                               # per sample, over clients
    t_k  = sum_c w_ck * v_ck                             # the aggregated teacher

No temperature is applied to the similarities: method.md writes none, so none is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sed_scores",
    "sed_weights",
    "sed_teacher",
    "mean_teacher",
    "distillation_loss",
]


def _check_client_features(client_features: Tensor) -> None:
    if client_features.dim() != 3:
        raise ValueError(
            f"client_features must be (C, P, d), got shape {tuple(client_features.shape)}"
        )
    if client_features.shape[0] == 0:
        raise ValueError(
            "SED needs at least one client (C == 0); skip this modality in the caller instead"
        )
    if client_features.shape[1] == 0:
        raise ValueError("client_features has no public samples (P == 0)")


def sed_scores(client_features: Tensor, server_features: Tensor, chunk_size: int = 1024) -> Tensor:
    """SED scores ``s_ck`` for every client and public sample.

    Args:
        client_features: (C, P, d) local-encoder features of the public set, one slice per client,
            rows in the same public order as ``server_features``. Need not be normalised.
        server_features: (P, d) global features of the same modality. Need not be normalised.
        chunk_size: rows of ``P`` scored at once; peak extra memory is (chunk_size, P) per client,
            never (P, P).

    Returns:
        (C, P) float tensor, ``s_ck = <v_ck, g_k> - logsumexp_j <v_ck, g_j>`` on L2-normalised
        features (always <= 0, a log-probability).
    """
    _check_client_features(client_features)
    if server_features.dim() != 2:
        raise ValueError(
            f"server_features must be (P, d), got shape {tuple(server_features.shape)}"
        )
    n_clients, n_public, dim = client_features.shape
    if tuple(server_features.shape) != (n_public, dim):
        raise ValueError(
            f"client_features (C, P, d) = {tuple(client_features.shape)} does not match "
            f"server_features (P, d) = {tuple(server_features.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    g = F.normalize(server_features.float(), dim=-1)  # (P, d)
    v = F.normalize(client_features.float().to(g.device), dim=-1)  # (C, P, d)
    scores = torch.empty(n_clients, n_public, dtype=g.dtype, device=g.device)
    for c in range(n_clients):
        for start in range(0, n_public, chunk_size):
            stop = min(start + chunk_size, n_public)
            v_chunk = v[c, start:stop]  # (n, d)
            sims = v_chunk @ g.T  # (n, P)
            positive = (v_chunk * g[start:stop]).sum(dim=-1)  # (n,) = <v_ck, g_k>
            scores[c, start:stop] = positive - torch.logsumexp(sims, dim=-1)
    return scores


def sed_weights(scores: Tensor) -> Tensor:
    """Per-sample client weights: softmax over the client axis of (C, P) scores -> (C, P)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (C, P), got shape {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("SED needs at least one client (C == 0); skip this modality in the caller")
    return torch.softmax(scores, dim=0)


def sed_teacher(client_features: Tensor, weights: Tensor) -> Tensor:
    """Aggregated teacher ``t_k = sum_c w_ck * v_ck`` -> (P, d).

    The client features are L2-normalised before weighting (the same ``v`` the scores were computed
    on), so each client contributes on equal terms whatever the scale of its encoder. The result is
    a convex combination of unit vectors and is *not* re-normalised (its norm is <= 1 and shrinks
    where clients disagree); the server's global features are L2-normalised too, so teacher and
    student live on the same scale.
    """
    _check_client_features(client_features)
    if tuple(weights.shape) != tuple(client_features.shape[:2]):
        raise ValueError(
            f"weights (C, P) = {tuple(weights.shape)} does not match client_features "
            f"(C, P, d) = {tuple(client_features.shape)}"
        )
    v = F.normalize(client_features.float(), dim=-1)  # (C, P, d)
    w = weights.to(device=v.device, dtype=v.dtype)
    return (w.unsqueeze(-1) * v).sum(dim=0)  # (P, d)


def mean_teacher(client_features: Tensor) -> Tensor:
    """The "without SED" ablation: plain mean of the L2-normalised client features -> (P, d)."""
    _check_client_features(client_features)
    return F.normalize(client_features.float(), dim=-1).mean(dim=0)


def distillation_loss(student: Tensor, teacher: Tensor, gamma: float) -> Tensor:
    """``gamma * MSE(student, teacher)``, mean over all elements; the teacher gets no gradient."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ"
        )
    return gamma * F.mse_loss(student, teacher.detach().to(student.dtype))
