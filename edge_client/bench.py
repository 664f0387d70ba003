"""`fedafd-edge bench`: time this device's FedAFD training step, public feature extraction and ONNX
inference (each exported graph, fp32 and int8, batch 1 and 32, with its file size), and write a device
profile (TOML) from what was measured. No sockets here."""

from __future__ import annotations

import dataclasses
import datetime
import platform
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.training import (
    Optimizers, PublicBatch, RoundPlan, global_features, public_features, train_step,
)
from fedafd.runtime.config import ClientConfig, ServerConfig
from fedafd.runtime.data.modal import load_public_data
from fedafd.runtime.models import backbone_of, build_encoder, count_parameters
from fedafd.runtime.wire import MODALITIES_OF_KIND
from fedafd.runtime.shaping import load_profile, profile_to_toml
from fedafd.runtime.timing import time_calls
from fedafd.runtime.torch_utils import configure_threads, resolve_device


def time_per_call(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of one call of `fn` over `repeats` timed calls after `warmup` untimed ones."""
    return float(np.median(time_calls(fn, repeats, warmup)))


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
    import json

    from fedafd.export.infer import MANIFEST_FILE, open_session
    from fedafd.runtime.data.text import MAX_TEXT_LEN

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


def run_bench(config: ClientConfig, onnx_dir: Path | None, out: Path, name: str, link: str,
              reference_ms: float, feature_dim: int = 256, server_image_arch: str = ServerConfig.image_arch,
              server_text_arch: str = ServerConfig.text_arch, steps: int = 5) -> dict:
    """Measures and writes the profile; returns what was measured (ms per sample) and where it went.

    Encoders over a frozen backbone read its cached features here as in training (the backbone ran once,
    when the cache was built), so train and extract time the adapters; `--onnx-dir` times the deployable
    graphs, backbones inside."""
    device = resolve_device(config.device)
    configure_threads(config.threads)
    torch.manual_seed(config.seed)
    kind_modalities = MODALITIES_OF_KIND[config.kind]
    archs = {"image": server_image_arch, "text": server_text_arch}
    own = {"image": config.image_arch, "text": config.text_arch}
    backbones = tuple(sorted({backbone_of(a) for m in kind_modalities for a in (archs[m], own[m])} - {None}))
    private = load_private_data(config.kind, 0, 1, config.alpha, config.seed, max(config.batch_size * 4, 64), 64,
                                backbones=backbones)
    public = load_public_data("train", backbones)
    model = LocalModel(config.kind, config.image_arch, config.text_arch, feature_dim, private.num_classes,
                       config.adapter_dropout).to(device)
    optimizers = Optimizers.create(model, config.lr, config.disc_lr)
    # A frozen global tower of the server's default architecture (random weights: same cost as trained ones).
    towers = GlobalTowers(feature_dim, device)
    flat = {f"{m}.{k}": v for m in model.modalities for k, v in build_encoder(m, archs[m], feature_dim).state_dict().items()}
    towers.load(1, {m: archs[m] for m in model.modalities}, flat)
    cache = global_features(towers, private.train, model.modalities, device)
    batch = config.batch_size
    private_rows = torch.arange(min(batch, len(private.train)))
    public_rows = torch.arange(batch)
    public_batch = PublicBatch(
        data=public, rows=public_rows,
        global_features={m: torch.nn.functional.normalize(torch.randn(batch, feature_dim), dim=1).to(device)
                         for m in ("image", "text")})  # D_cr compares with the other modality's G
    model.train()
    step_s = time_per_call(lambda: train_step(model, optimizers, private.train, private_rows, cache, public_batch,
                                              RoundPlan(0, 1, baa=True, gff=True, beta=0.5), device), steps)
    extract_rows = torch.arange(min(256, len(public)))
    extract_s = time_per_call(lambda: public_features(model, public, extract_rows, device), 3, warmup=1)
    measured = {
        "train_ms_per_sample": 1000 * step_s / len(private_rows),
        "extract_ms_per_sample": 1000 * extract_s / len(extract_rows),
    }
    graphs = onnx_rows(onnx_dir) if onnx_dir is not None else []
    # One input through each modality's fp32 graph (a multimodal device encodes a picture and a caption).
    measured["infer_ms_per_sample"] = float(sum(r["b1_ms"] for r in graphs if r["precision"] == "fp32"))
    base = load_profile(link)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    profile = dataclasses.replace(
        base, name=name,
        description=f"{platform.node() or 'this device'} ({platform.machine()}, {platform.processor() or 'cpu'}), "
                    f"{config.kind} client {config.image_arch if config.kind != 'text' else ''}"
                    f"{'/' if config.kind == 'multimodal' else ''}{config.text_arch if config.kind != 'image' else ''}",
        compute_factor=measured["train_ms_per_sample"] / reference_ms if reference_ms > 0 else 1.0,
        source=f"compute measured by `fedafd-edge bench` on {when} (torch {torch.__version__}, device {device}, "
               f"{config.threads or 'default'} thread(s), batch {batch}, d={feature_dim}); link values copied from "
               f"the shipped {base.name} profile (see its source)",
        **measured)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_to_toml(profile))
    return {**measured, "onnx_graphs": graphs, "onnx": "skipped (no --onnx-dir)" if onnx_dir is None else str(onnx_dir),
            "num_params": count_parameters(model), "compute_factor": profile.compute_factor, "profile": str(out)}
