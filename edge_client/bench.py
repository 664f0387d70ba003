"""`fedafd-edge bench`: time this device's FedAFD training step, public feature extraction and ONNX
inference, and write a device profile (TOML) from what was measured. No sockets here."""

from __future__ import annotations

import dataclasses
import datetime
import platform
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedafd.edge_client.model import GlobalTowers, LocalModel, build_encoder
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.training import Optimizers, PublicBatch, global_features, public_features, train_step
from fedafd.runtime.config import ClientConfig
from fedafd.runtime.data.modal import load_public_data
from fedafd.runtime.models import count_parameters
from fedafd.runtime.shaping import load_profile, profile_to_toml
from fedafd.runtime.timing import time_calls
from fedafd.runtime.torch_utils import configure_threads, resolve_device


def time_per_call(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of one call of `fn` over `repeats` timed calls after `warmup` untimed ones."""
    return float(np.median(time_calls(fn, repeats, warmup)))


def onnx_ms_per_sample(onnx_dir: Path, repeats: int = 20) -> dict[str, float]:
    """ms per sample (batch 1) of each .onnx graph in `onnx_dir`, inputs made from the graph's own input
    declarations (dynamic dims = 1, integer inputs = ones)."""
    import onnxruntime as ort

    kinds = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(bool)": np.bool_, "tensor(float16)": np.float16}
    results = {}
    # The fp32 inference graphs only: int8 copies and the stand-alone towers are alternatives, not steps.
    graphs = [p for p in sorted(Path(onnx_dir).glob("*.onnx"))
              if not p.name.endswith(".int8.onnx") and not p.name.startswith("tower_")]
    for path in graphs:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {}
        for spec in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
            dtype = kinds.get(spec.type, np.float32)
            feeds[spec.name] = (np.random.default_rng(0).standard_normal(shape).astype(dtype)
                                if np.issubdtype(dtype, np.floating) else np.ones(shape, dtype))
        results[path.name] = 1000 * time_per_call(lambda: session.run(None, feeds), repeats)
    return results


def run_bench(config: ClientConfig, onnx_dir: Path | None, out: Path, name: str, link: str,
              reference_ms: float, feature_dim: int = 256, server_image_arch: str = "resnet_tiny",
              server_text_arch: str = "transformer_tiny", steps: int = 5) -> dict:
    """Measures and writes the profile; returns what was measured (ms per sample) and where it went."""
    device = resolve_device(config.device)
    configure_threads(config.threads)
    torch.manual_seed(config.seed)
    private = load_private_data(config.kind, 0, 1, config.alpha, config.seed, max(config.batch_size * 4, 64), 64)
    public = load_public_data("train")
    model = LocalModel(config.kind, config.image_arch, config.text_arch, feature_dim, private.num_classes).to(device)
    optimizers = Optimizers.create(model, config.lr, config.disc_lr)
    # A frozen global tower of the server's default architecture (random weights: same cost as trained ones).
    towers = GlobalTowers(feature_dim, device)
    archs = {"image": server_image_arch, "text": server_text_arch}
    flat = {f"{m}.{k}": v for m in model.modalities for k, v in build_encoder(m, archs[m], feature_dim).state_dict().items()}
    towers.load(1, {m: archs[m] for m in model.modalities}, flat)
    cache = global_features(towers, private.train, model.modalities, device)
    batch = config.batch_size
    private_rows = torch.arange(min(batch, len(private.train)))
    public_rows = torch.arange(batch)
    public_batch = PublicBatch(
        inputs={m: public.batch(m, public_rows, device) for m in model.modalities},
        global_features={m: torch.nn.functional.normalize(torch.randn(batch, feature_dim), dim=1).to(device)
                         for m in ("image", "text")})
    model.train()
    step_s = time_per_call(lambda: train_step(model, optimizers, private.train, private_rows, cache, public_batch,
                                              0.5, device), steps)
    extract_rows = torch.arange(min(256, len(public)))
    extract_s = time_per_call(lambda: public_features(model, public, extract_rows, device), 3, warmup=1)
    measured = {
        "train_ms_per_sample": 1000 * step_s / len(private_rows),
        "extract_ms_per_sample": 1000 * extract_s / len(extract_rows),
    }
    onnx = onnx_ms_per_sample(onnx_dir) if onnx_dir is not None else {}
    # One input through each modality's graph (a multimodal device encodes a picture and a caption).
    measured["infer_ms_per_sample"] = float(sum(onnx.values()))
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
    return {**measured, "onnx_graphs_ms": onnx, "onnx": "skipped (no --onnx-dir)" if onnx_dir is None else str(onnx_dir),
            "num_params": count_parameters(model), "compute_factor": profile.compute_factor, "profile": str(out)}
