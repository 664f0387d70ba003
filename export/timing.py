"""Timing exported graphs with ONNX Runtime: every graph of a model folder at a few batch sizes (what
`fedafd-edge bench --onnx-dir` writes into a device profile) and one graph's batch-1 latency (what the
exporter records for its int8 copies). The full benchmark is benchmarks/latency.py. No torch here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedafd.export.infer import MANIFEST_FILE, open_session
from fedafd.runtime.data.text import MAX_TEXT_LEN
from fedafd.runtime.timing import time_per_call

ONNX_BATCHES = (1, 32)
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


def _feeds(session, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Inputs made from the graph's own declarations: the batch axis `batch`, other dynamic axes `seq_len`,
    floats uniform in [0, 1) (pictures), integers ones (token ids and a full attention mask)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if axis == 0 else seq_len)
                 for axis, d in enumerate(spec.shape)]
        dtype = _ORT_DTYPES.get(spec.type, np.float32)
        feeds[spec.name] = (rng.random(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                            else np.ones(shape, dtype))
    return feeds


def onnx_rows(onnx_dir: Path, repeats: int = 20, batches: tuple[int, ...] = ONNX_BATCHES) -> list[dict]:
    """One row per inference graph in `onnx_dir` and precision: file, size and median ms per call at each
    batch size (the int8 copies beside their fp32 graphs; the stand-alone towers are alternatives, not
    steps, and left out). Text inputs are `max_len` long (the manifest's, else runtime's MAX_TEXT_LEN)."""
    onnx_dir = Path(onnx_dir)
    manifest = json.loads((onnx_dir / MANIFEST_FILE).read_text()) if (onnx_dir / MANIFEST_FILE).is_file() else {}
    seq_len = int(manifest.get("preprocessing", {}).get("text", {}).get("max_len", MAX_TEXT_LEN))
    backbones = {g["file"].removesuffix(".onnx"): g.get("backbones", []) for g in manifest.get("graphs", {}).values()}
    rows = []
    for path in sorted(onnx_dir.glob("*.onnx")):
        if path.name.startswith("tower_"):
            continue
        precision = "int8" if path.name.endswith(".int8.onnx") else "fp32"
        stem = path.name.removesuffix(".onnx").removesuffix(".int8")
        session = open_session(path)
        row = {"graph": stem, "file": path.name, "precision": precision, "size_bytes": path.stat().st_size,
               "backbones": backbones.get(stem, [])}
        for batch in batches:
            feeds = _feeds(session, batch, seq_len)
            row[f"b{batch}_ms"] = 1000 * time_per_call(lambda: session.run(None, feeds),
                                                       repeats if batch == 1 else max(3, repeats // 4))
        rows.append(row)
    return rows


def quick_latency_ms(path: Path, inputs: tuple[np.ndarray, ...], runs: int = 30) -> float:
    """Median batch-1 latency of one session on the first row of `inputs`, after one untimed call."""
    session = open_session(path)
    feeds = {i.name: np.ascontiguousarray(a[:1]) for i, a in zip(session.get_inputs(), inputs)}
    return 1000.0 * time_per_call(lambda: session.run(None, feeds), runs, warmup=1)
