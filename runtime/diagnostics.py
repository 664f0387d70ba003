"""Per-round learning diagnostics that both sides share: the one cosine they both report, and how a device's
diagnostics travel inside its FeatureUpload's `metrics` map (no wire change) and come out of it on the server.

On the wire a device-wide diagnostic is `diag_<name>` and one of a modality `diag_<modality>.<name>`; in the
round record they become the client's own `diagnostics` dict, `{name: value, modality: {name: value}}`, so
nothing that averages `metrics` by kind sees them. docs/implementation.md "Learning diagnostics" says what each one means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fedafd.runtime.vocabulary import MODALITIES

__all__ = ["DIAG_PREFIX", "mean_cosine", "diagnostics_to_metrics", "split_diagnostics"]

DIAG_PREFIX = "diag_"
"""The prefix that marks a diagnostic among an upload's metrics."""


@torch.no_grad()
def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over rows k of cos(a_k, b_k) for two (N, d) tensors of the same rows (neither need be normalised;
    a zero row counts as cosine 0)."""
    if a.dim() != 2 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"expected two non-empty (N, d) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((F.normalize(a.float(), dim=1) * F.normalize(b.float().to(a.device), dim=1)).sum(1).mean())


def diagnostics_to_metrics(diagnostics: dict) -> dict[str, float]:
    """`{name: v, modality: {name: v}}` -> the upload's metric keys `diag_name`, `diag_modality.name`;
    values that are not finite are left out (JSON has no NaN)."""
    out: dict[str, float] = {}
    for key, value in diagnostics.items():
        if isinstance(value, dict):
            out.update({f"{DIAG_PREFIX}{key}.{name}": float(v) for name, v in value.items() if math.isfinite(v)})
        elif math.isfinite(value):
            out[f"{DIAG_PREFIX}{key}"] = float(value)
    return out


def split_diagnostics(metrics: dict[str, float]) -> tuple[dict[str, float], dict]:
    """An upload's metrics -> (the task metrics, the diagnostics dict): the inverse of diagnostics_to_metrics.
    A `diag_` key whose part before the dot is not a modality stays flat under its whole name; a flat key named
    like a modality is dropped (it would clash with that modality's dict; only a foreign build sends one)."""
    plain: dict[str, float] = {}
    diagnostics: dict = {}
    for key, value in metrics.items():
        if not key.startswith(DIAG_PREFIX):
            plain[key] = value
            continue
        name = key[len(DIAG_PREFIX):]
        modality, dot, rest = name.partition(".")
        if dot and modality in MODALITIES and rest:
            diagnostics.setdefault(modality, {})[rest] = value
        elif name not in MODALITIES:
            diagnostics[name] = value
    return plain, diagnostics
