"""Checking an exported graph against what it was exported from.

Every graph is verified before the folder is written as done: `onnx.checker.check_model(full_check=True)`;
ONNX Runtime vs the PyTorch module on real test samples, batched and at batch 1 (max abs difference,
top-1 agreement; beyond `atol` the export fails); and that module vs the training code path on the same
rows (beyond `training_atol` the export fails). The result is staged in a temporary folder and renamed
into place only when all passed.

An int8 copy is compared with its fp32 graph on the same test rows (size, batch-1 latency, agreement).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedafd.export.graphs import ExportError
from fedafd.export.infer import file_sha256, open_session
from fedafd.export.timing import quick_latency_ms

def _run_torch(module: nn.Module, inputs: tuple[np.ndarray, ...], batch_size: int = 256) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(inputs[0]), batch_size):
            out = module(*(torch.from_numpy(np.ascontiguousarray(a[start:start + batch_size])) for a in inputs))
            out = out if isinstance(out, tuple) else (out,)
            parts.append([o.numpy() for o in out])
    return [np.concatenate(cols) for cols in zip(*parts)]


def run_onnx(session: Any, names: list[str], inputs: tuple[np.ndarray, ...], batch_size: int = 256) -> list[np.ndarray]:
    feeds_names = [i.name for i in session.get_inputs()]
    parts = []
    for start in range(0, len(inputs[0]), batch_size):
        feeds = {n: np.ascontiguousarray(a[start:start + batch_size]) for n, a in zip(feeds_names, inputs)}
        parts.append(session.run(names, feeds))
    return [np.concatenate(cols) for cols in zip(*parts)]


def _max_diffs(names: list[str], got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, float]:
    return {n: float(np.abs(g - w).max(initial=0.0)) for n, g, w in zip(names, got, want)}


def check_parity(module: nn.Module, path: Path, outputs: list[dict[str, Any]], inputs: tuple[np.ndarray, ...],
                 atol: float, expected: list[np.ndarray] | None = None, training_atol: float = 0.0) -> dict[str, Any]:
    """ORT vs the PyTorch module it was exported from, on the same real samples, as one batch and row by row
    (the dynamic batch axis); and, when `expected` is given, that module vs the training code path on the
    same rows (which reads the backbones' features from the cache instead of running them)."""
    names = [o["name"] for o in outputs]
    reference = _run_torch(module, inputs)
    session = open_session(path)
    batched = run_onnx(session, names, inputs)
    single = run_onnx(session, names, tuple(a[:4] for a in inputs), batch_size=1)
    diffs = _max_diffs(names, batched, reference)
    diffs_b1 = _max_diffs(names, single, [r[:4] for r in reference])
    report: dict[str, Any] = {"samples": int(len(inputs[0])), "max_abs_diff": diffs, "max_abs_diff_batch1": diffs_b1,
                              "atol": atol}
    scores_ort, scores_ref = batched[0], reference[0]
    if names[0] == "feature":  # retrieval: the top-1 neighbour of each row among the batch's rows
        scores_ort, scores_ref = scores_ort @ scores_ort.T, scores_ref @ scores_ref.T
    report["top1_agreement"] = float((scores_ort.argmax(1) == scores_ref.argmax(1)).mean())
    worst = max(list(diffs.values()) + list(diffs_b1.values()))
    line = (f"  parity {path.name}: {report['samples']} samples, max |ORT - PyTorch| {worst:.2e}, "
            f"top-1 agreement {100 * report['top1_agreement']:.1f}%")
    training_worst = 0.0
    if expected is not None:
        training = _max_diffs(names, reference, expected)
        training_worst = max(training.values())
        report["vs_training"] = {"max_abs_diff": training, "atol": training_atol}
        line += f", max |PyTorch graph - training path| {training_worst:.2e}"
    print(line)
    if not np.isfinite(worst) or worst > atol:
        raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch by {worst:.3g} (> atol {atol:g}) "
                          f"on real test samples; not exported")
    if not np.isfinite(training_worst) or training_worst > training_atol:
        raise ExportError(f"{path.name}: the graph differs from what training and evaluation compute by "
                          f"{training_worst:.3g} (> {training_atol:g}); is the backbone feature cache from these "
                          f"weights? Not exported")
    return report


def int8_entry(fp32_path: Path, int8_path: Path, outputs: list[dict[str, Any]], inputs: tuple[np.ndarray, ...],
                labels: np.ndarray | None) -> dict[str, Any]:
    """Size, batch-1 latency and agreement of the int8 graph with the fp32 one on the same test rows."""
    names = [o["name"] for o in outputs]
    fp32 = run_onnx(open_session(fp32_path), names, inputs)
    int8 = run_onnx(open_session(int8_path), names, inputs)
    entry: dict[str, Any] = {
        "file": int8_path.name, "sha256": file_sha256(int8_path), "size_bytes": int8_path.stat().st_size,
        "size_ratio": int8_path.stat().st_size / fp32_path.stat().st_size, "eval_samples": int(len(fp32[0])),
        "latency_b1_ms": quick_latency_ms(int8_path, inputs), "fp32_latency_b1_ms": quick_latency_ms(fp32_path, inputs),
        "max_abs_diff": float(np.abs(int8[0] - fp32[0]).max()),
    }
    features_fp32, features_int8 = fp32[-1], int8[-1]  # (N, d): the fused feature
    if names[0] == "probs":
        entry["top1_agreement"] = float((int8[0].argmax(1) == fp32[0].argmax(1)).mean())
        if labels is not None:
            entry["fp32_top1"] = 100.0 * float((fp32[0].argmax(1) == labels).mean())
            entry["int8_top1"] = 100.0 * float((int8[0].argmax(1) == labels).mean())
            entry["top1_delta"] = entry["int8_top1"] - entry["fp32_top1"]
        features_fp32, features_int8 = _unit(features_fp32), _unit(features_int8)
    entry["mean_cosine"] = float(np.mean(np.sum(features_int8 * features_fp32, axis=1)))
    return entry


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-6)
