"""Similarity-guided ensemble distillation (SED), docs/method.md round step 5.

One modality at a time; the caller skips a modality that no client sent (these raise on ``C == 0``
rather than guess). Uploads are folded into the teacher as they arrive (TeacherFold).

For client ``c`` and public sample ``k``, with ``v`` the client's feature and ``g`` the server's
feature of the same modality, both L2-normalised::

    s_ck = <v_ck, g_k> - log sum_j exp(<v_ck, g_j>)     # InfoNCE log-probability over P
    w_ck = softmax_c(s_ck)                               # per sample, over clients
    t_k  = sum_c w_ck * v_ck                             # the aggregated teacher

docs/method.md writes no temperature; ``temperature`` (config ``sed_temperature``, 1: the method's form) divides
the similarities, ``s_ck = <v_ck, g_k>/T - log sum_j exp(<v_ck, g_j>/T)``: cosines in [-1, 1] over P samples
at T = 1 leave every client's log-probability near -log P and the weights near uniform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sed_scores", "weight_entropy", "TeacherFold"]


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


def sed_scores(client_features: Tensor, server_features: Tensor, chunk_size: int = 1024,
               temperature: float = 1.0) -> Tensor:
    """SED scores ``s_ck`` for every client and public sample.

    Args:
        client_features: (C, P, d) local-encoder features of the public set, one slice per client,
            rows in the same public order as ``server_features``. Need not be normalised.
        server_features: (P, d) global features of the same modality. Need not be normalised.
        chunk_size: rows of ``P`` scored at once; peak extra memory is (chunk_size, P) per client,
            never (P, P).
        temperature: divides the cosine similarities (1: docs/method.md's form).

    Returns:
        (C, P) float tensor, ``s_ck = <v_ck, g_k>/T - logsumexp_j <v_ck, g_j>/T`` on L2-normalised
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
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    g = F.normalize(server_features.float(), dim=-1)  # (P, d)
    v = F.normalize(client_features.float().to(g.device), dim=-1)  # (C, P, d)
    scores = torch.empty(n_clients, n_public, dtype=g.dtype, device=g.device)
    for c in range(n_clients):
        for start in range(0, n_public, chunk_size):
            stop = min(start + chunk_size, n_public)
            v_chunk = v[c, start:stop]  # (n, d)
            sims = v_chunk @ g.T / temperature  # (n, P)
            positive = (v_chunk * g[start:stop]).sum(dim=-1) / temperature  # (n,) = <v_ck, g_k> / T
            scores[c, start:stop] = positive - torch.logsumexp(sims, dim=-1)
    return scores


def weight_entropy(weights: Tensor) -> float | None:
    """The entropy of per-sample weights over clients, normalised by log C to [0, 1], averaged over samples:
    ``mean_k [-sum_c w_ck log w_ck] / log C`` for weights (C, P) that sum to 1 over c (0 log 0 = 0).
    1: every sample weighs its clients equally (the teacher is the plain mean); near 0: one client decides each
    sample. None with one client, where log C = 0 leaves it undefined."""
    if weights.dim() != 2 or weights.shape[1] == 0:
        raise ValueError(f"weights must be (C, P) with P > 0, got {tuple(weights.shape)}")
    clients = weights.shape[0]
    if clients < 2:
        return None
    entropy = -torch.special.xlogy(weights, weights).sum(0)  # (P,)
    return float(entropy.mean() / math.log(clients))


class TeacherFold:
    """The teacher of one modality, ``t_k = sum_c w_ck v_ck`` with ``w_ck = softmax_c(s_ck)``, folded in one
    upload at a time (an online softmax: a running max of the scores, the running sum of their exps and the
    running exp-weighted sum of features, rescaled whenever the max rises). Memory is O(P x d) whatever the
    number of clients, an upload is not kept once folded in, and the result is the same in any order.

    The scores say how much each client is trusted on each sample: SED's ``s_ck`` (FedAFD), the score
    against the other modality (CreamFL), or zeros, which make the teacher the plain mean of the
    L2-normalised features (the "without SED" ablation, FedMD's consensus). Only each client's (P,)
    scores are kept, for its mean weight in the metrics.
    """

    def __init__(self) -> None:
        self._max: Tensor | None = None  # (P,) running max of the scores
        self._total: Tensor | None = None  # (P,) sum_c exp(s_ck - max_k)
        self._weighted: Tensor | None = None  # (P, d) sum_c exp(s_ck - max_k) v_ck
        self._scores: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._scores)

    def add(self, client_id: str, features: Tensor, scores: Tensor) -> None:
        """features: (P, d), need not be normalised; scores: (P,) finite."""
        if client_id in self._scores:
            raise ValueError(f"{client_id} was already folded into this teacher")
        if features.dim() != 2 or scores.shape != features.shape[:1]:
            raise ValueError(f"features must be (P, d) and scores (P,), got {tuple(features.shape)} and "
                             f"{tuple(scores.shape)}")
        if self._weighted is not None and features.shape != self._weighted.shape:
            raise ValueError(f"features {tuple(features.shape)} do not match the others' {tuple(self._weighted.shape)}")
        if not torch.isfinite(scores).all():
            raise ValueError("scores must be finite")
        v = F.normalize(features.float(), dim=-1)
        # Scores in float64: a score offset by 1e4 (FedGEMS' unselected devices) keeps its small differences.
        scores = scores.double().to(v.device)
        if self._max is None:
            self._max, self._total, self._weighted = scores, torch.ones_like(scores), v.clone()
        else:
            new_max = torch.maximum(self._max, scores)
            rescale, weight = torch.exp(self._max - new_max), torch.exp(scores - new_max)
            self._total = self._total * rescale + weight
            self._weighted = (self._weighted * rescale.unsqueeze(1).to(v.dtype)
                              + weight.unsqueeze(1).to(v.dtype) * v)
            self._max = new_max
        self._scores[client_id] = scores

    def teacher(self) -> Tensor:
        """(P, d): a convex combination of unit vectors, not re-normalised (its norm shrinks where clients
        disagree); the server's global features are unit vectors too, so teacher and student share a scale."""
        if self._weighted is None:
            raise ValueError("no client was folded in; skip this modality in the caller")
        return self._weighted / self._total.unsqueeze(1).to(self._weighted.dtype)

    def mean_weights(self) -> dict[str, float]:
        """Each client's weight w_ck averaged over the public samples (they sum to 1 over clients)."""
        if self._max is None:
            return {}
        log_norm = self._max + torch.log(self._total)
        return {cid: float(torch.exp(scores - log_norm).mean()) for cid, scores in self._scores.items()}

    def weight_entropy(self) -> float | None:
        """`weight_entropy` of the weights w_ck of every client folded in (a diagnostic: 1 = the plain mean);
        None with fewer than two clients."""
        if len(self._scores) < 2:
            return None
        log_norm = self._max + torch.log(self._total)
        entropy = torch.zeros_like(log_norm)  # (P,), summed client by client: no (C, P) stack
        for scores in self._scores.values():
            weights = torch.exp(scores - log_norm)
            entropy -= torch.special.xlogy(weights, weights)
        return float(entropy.mean() / math.log(len(self._scores)))
