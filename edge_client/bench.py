"""`fedafd-edge bench`: time this device's FedAFD training step and public feature extraction, and write a
device profile (TOML) from what was measured, with the ONNX inference times of the exported graphs that
export/timing.py measured (the command is in export/cli.py). No sockets here."""

from __future__ import annotations

import dataclasses
import datetime
import platform
from pathlib import Path

import torch

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.private_data import load_private_data
from fedafd.edge_client.objectives import objective_for
from fedafd.edge_client.training import Optimizers, prepare_round, train_step, uplink_features
from fedafd.runtime.config import ClientConfig, ServerConfig, encoder_archs
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.data.modal import load_public_data
from fedafd.runtime.models import backbone_of, build_encoder, count_parameters, resolve_arch
from fedafd.runtime.vocabulary import MODALITIES_OF_KIND
from fedafd.runtime.shaping import load_profile, profile_to_toml
from fedafd.runtime.timing import time_per_call
from fedafd.runtime.torch_utils import configure_threads, resolve_device


def run_bench(config: ClientConfig, onnx_dir: Path | None, graphs: list[dict], out: Path, name: str, link: str,
              reference_ms: float, feature_dim: int = 256, server_image_arch: str = ServerConfig.image_arch,
              server_text_arch: str = ServerConfig.text_arch, steps: int = 5) -> dict:
    """Measures and writes the profile; returns what was measured (ms per sample) and where it went.

    Encoders over a frozen backbone read its cached features here as in training (the backbone ran once,
    when the cache was built), so train and extract time the adapters. `graphs` are the rows
    export.timing.onnx_rows timed in `onnx_dir` (the deployable graphs, backbones inside; [] without one)."""
    device = resolve_device(config.device)
    configure_threads(config.threads)
    torch.manual_seed(config.seed)
    kind_modalities = MODALITIES_OF_KIND[config.kind]
    archs = {"image": server_image_arch, "text": server_text_arch}
    own = encoder_archs(config)
    # The server's adapters over its own towers, where the device names them (server_*_tower).
    archs = {m: resolve_arch(m, archs[m], getattr(config, f"server_{m}_tower")) for m in archs}
    backbones = tuple(sorted({backbone_of(a) for m in kind_modalities for a in (archs[m], own[m])} - {None}))
    private = load_private_data(dataclasses.replace(config, partition=0, num_partitions=1, data="",
                                                    max_private=max(config.batch_size * 4, 64), max_test=64),
                                backbones=backbones)
    public = load_public_data("train", backbones)
    model = LocalModel(config.kind, own["image"], own["text"], feature_dim, private.num_classes,
                       config.adapter_dropout, config.head, config.head_scale).to(device)
    optimizers = Optimizers.create(model, config.lr, config.disc_lr, config.fusion_lr)
    # A frozen global tower of the server's default architecture (random weights: same cost as trained ones).
    towers = GlobalTowers(feature_dim, device)
    flat = {f"{m}.{k}": v for m in model.modalities for k, v in build_encoder(m, archs[m], feature_dim).state_dict().items()}
    towers.load(1, {m: archs[m] for m in model.modalities}, flat)
    batch = config.batch_size
    private_rows = torch.arange(min(batch, len(private.train)))
    public_rows = torch.arange(batch)
    G = {m: torch.nn.functional.normalize(torch.randn(batch, feature_dim), dim=1).to(device)
         for m in ("image", "text")}  # D_cr compares with the other modality's G
    settings = MethodSettings("fedafd", baa=True, gff=True, beta=0.5)
    objective = objective_for(prepare_round(model, optimizers, towers, private.train, settings, 0, 1, batch, 0, device,
                                            public, public_rows, G))
    model.train()
    step_s = time_per_call(lambda: train_step(objective, private_rows, public_rows), steps)
    extract_rows = torch.arange(min(256, len(public)))
    extract_s = time_per_call(lambda: uplink_features(model, public, extract_rows, device), 3, warmup=1)
    measured = {
        "train_ms_per_sample": 1000 * step_s / len(private_rows),
        "extract_ms_per_sample": 1000 * extract_s / len(extract_rows),
    }
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
