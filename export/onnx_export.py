"""A trained client (or the server's global towers) -> verified ONNX graphs, a manifest and the tokenizer.

The graphs are export/graphs.py's modules, exported there; export/verify.py checks each against PyTorch and
the training code path, and the int8 copies against fp32. The result is staged in a temporary folder and
renamed into place only when all passed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedafd.edge_client.model import MODALITIES_OF_KIND, GlobalTowers, LocalModel, saved_model_options
from fedafd.cloud_server.checkpoint import CHECKPOINT_FILE as SERVER_CHECKPOINT
from fedafd.cloud_server.checkpoint import LEGACY_CHECKPOINT_FILE, checkpoint_path, load_server_checkpoint
from fedafd.cloud_server.stages import GlobalModel
from fedafd.edge_client.state import LEGACY_STATE_FILE, STATE_CONFIG_FILE, STATE_FILE, read_state_meta
from fedafd.export.graphs import (BackboneCache, ClientGraph, ExportError, TowerGraph, export_graph, graph_input,
                                  input_specs, output_specs)
from fedafd.export.infer import MANIFEST_FILE, MANIFEST_FORMAT, TOKENIZER_FILE, ModelError, file_sha256
from fedafd.export.quantize import FP32_BACKBONES, quantize_graph
from fedafd.export.verify import check_parity, int8_entry
from fedafd.runtime.backbones import BACKBONE_IMAGE_SIZE, backbone_digest, backbone_spec, register_tables, user_tower
from fedafd.runtime.config import ServerConfig, build_config, encoder_archs
from fedafd.runtime.data.features import OPSET, tower_batch
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.data.text import MAX_TEXT_LEN, PAD_ID, tokenizer_path
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.models import encode_rows, encoder_backbone, input_view
from fedafd.runtime.checkpoint import load_checkpoint

log = logging.getLogger("fedafd.export")


@dataclass(frozen=True)
class ExportOptions:
    parity_samples: int = 64
    """Test samples on which ONNX Runtime must match PyTorch."""
    eval_samples: int = 1000
    """Test samples for the fp32 vs int8 accuracy comparison (0: all of the capped test split)."""
    atol: float = 1e-4
    """Largest allowed |ORT - PyTorch| on any output (probabilities and features are O(1))."""
    training_atol: float = 1e-3
    """Largest allowed |the graph's PyTorch module - the training code path| on any output: the graph runs
    the backbones, training reads their features from the cache ONNX Runtime computed (measured: ~1e-6)."""
    quantize: bool = True
    """Also write an int8 graph per modality."""
    fusion: bool = True
    """Fuse with the global tower (GFF) when the state holds one; False exports the local path only
    (for a client trained with gff off or strategy=local)."""
    exporter: str = "torchscript"
    """torchscript (torch.onnx.export dynamo=False) or dynamo."""


# -- loading what to export ----------------------------------------------------------------------

@dataclass
class LoadedClient:
    model: LocalModel
    towers: GlobalTowers
    meta: dict[str, Any]
    config: dict[str, Any]

    def fusion(self, wanted: bool = True) -> bool:
        """Whether the exported path fuses with the global tower: wanted, and a tower for every modality."""
        return wanted and all(self.towers.has(m) for m in self.model.modalities)

    def backbone_names(self, fusion: bool) -> tuple[str, ...]:
        """The frozen backbones the exported graphs contain (those the local encoders and towers read)."""
        encoders = [self.model.encoders[m] for m in self.model.modalities]
        if fusion:
            encoders += [self.towers.encoders[m] for m in self.model.modalities]
        return tuple(sorted({encoder_backbone(e) for e in encoders} - {None}))


def load_client(state_dir: Path) -> LoadedClient:
    """The client's model and towers from STATE_DIR/client_state.safetensors (+ config.json when `join`
    wrote one), in eval mode on the CPU."""
    path = Path(state_dir) / STATE_FILE
    try:
        found = read_state_meta(state_dir) is not None
        tensors, meta = load_checkpoint(path) if found else ({}, {})
    except FedafdError as err:
        raise ExportError(f"cannot export {state_dir}: {err}") from None
    if not found:
        raise ExportError(f"no client state at {path}: point at the --state-dir a `fedafd-edge join` used "
                          f"(default edge_state/<run id>/<client id>) after at least one round")
    weights = tensors["model"]
    num_classes = int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0
    try:
        register_tables(meta.get("towers", {}))  # the user towers its encoders read, registered here too
    except FedafdError as err:
        raise ExportError(f"cannot export {state_dir}: {err}") from None
    try:
        model = LocalModel(meta["kind"], meta["image_arch"], meta["text_arch"], meta["feature_dim"], max(num_classes, 1),
                           **saved_model_options(weights))  # the head and fusion the state was trained with
        model.load_state_dict(weights)
        towers = GlobalTowers(meta["feature_dim"], torch.device("cpu"))
        if tensors["towers"]:
            towers.load(meta["tower_version"], meta["tower_archs"], tensors["towers"])
    except (ValueError, RuntimeError) as err:  # an architecture this build's zoo lacks, or mismatched weights
        raise ExportError(f"{path} does not load into this build's model zoo: {str(err).splitlines()[0]}") from None
    config_path = Path(state_dir) / STATE_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return LoadedClient(model.eval(), towers, meta, config)


def client_test_split(kind: str, config: dict[str, Any], backbones: tuple[str, ...] = ()) -> ModalData:
    """The client's test split as its device evaluates it (the same cap and seed as `join`), with the
    cached features of `backbones` attached."""
    from fedafd.runtime.data.modal import load_task_data
    from fedafd.runtime.data.partition import cap_indices

    test = load_task_data(kind, "test", backbones)
    rows = cap_indices(np.arange(len(test)), int(config.get("max_test", 1000)), int(config.get("seed", 0)))
    return test.select(rows)


def sample_inputs(data: ModalData, modality: str, count: int, reads: str = "") -> tuple[np.ndarray, ...]:
    """The graph's raw inputs for the first `count` rows: images float32 in [0, 1], token ids int64 (those of
    the user tower the graph `reads`, prepared as its feature cache prepares them)."""
    rows = np.arange(min(count, len(data))) if count > 0 else np.arange(len(data))
    if reads:
        return tuple(t.numpy() for t in tower_batch(reads, data, rows))
    return tuple(t.numpy() for t in data.batch(modality, rows, torch.device("cpu")))


def client_graphs(client: LoadedClient, fusion: bool = True,
                  backbones: BackboneCache | None = None) -> dict[str, ClientGraph]:
    """Modality -> the deployable graph module of that modality (eval mode); `fusion` as LoadedClient.fusion."""
    backbones = backbones or BackboneCache()
    graphs = {}
    for modality in client.model.modalities:
        local = client.model.encoders[modality]
        tower = client.towers.encoders[modality] if fusion else None
        graphs[modality] = ClientGraph(client.model, modality, tower, backbones(local, tower)).eval()
    return graphs


def training_outputs(client: LoadedClient, modality: str, fusion: bool, data: ModalData,
                     rows: np.ndarray) -> list[np.ndarray]:
    """What training and evaluation compute for `rows` (the backbones' features read from the cache),
    in the graph's output order: the reference the graph, which runs the backbones itself, must match."""
    cpu = torch.device("cpu")
    with torch.no_grad():
        local = client.model.encode(modality, data, rows, cpu)  # (B, d)
        global_ = client.towers.encode(modality, data, rows, cpu) if fusion else None
        fused, output = client.model.head_outputs(modality, local, global_)
    if client.model.head is not None:
        return [torch.softmax(output, dim=-1).numpy(), fused.numpy()]
    return [output.numpy()]


def encoder_outputs(encoder: nn.Module, modality: str, data: ModalData, rows: np.ndarray) -> list[np.ndarray]:
    """A tower's features of `rows` as `GlobalTowers.encode` (and the server) compute them, from the cache."""
    with torch.no_grad():
        return [encode_rows(encoder, modality, data, rows, torch.device("cpu")).numpy()]


# -- the model folder ----------------------------------------------------------------------------

@dataclass
class _Plan:
    """One graph: the module, its outputs, the real test samples that verify it, and what the training
    code path computes on the first `parity_samples` of them."""

    name: str
    """The file's stem: the modality (a device's graph) or tower_<modality>."""
    modality: str
    module: nn.Module
    outputs: list[dict[str, Any]]
    inputs: tuple[np.ndarray, ...]
    expected: list[np.ndarray]
    labels: np.ndarray | None = None
    quantize: bool = True
    info: dict[str, Any] | None = None
    """Extra manifest fields of the graph (arch, backbone)."""
    reads: str = ""
    """The user tower whose inputs the graph takes ("": the project's own; graphs.graph_input)."""


def _write_folder(out: Path, plans: list[_Plan], manifest: dict[str, Any], options: ExportOptions) -> dict[str, Any]:
    """Export, verify and quantise every graph into a staging folder, then move it to `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ExportError(f"{out} exists and is not an exported model folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        graphs, tower_entries = {}, {}
        for plan in plans:
            path = stage / f"{plan.name}.onnx"
            started = time.perf_counter()
            export_graph(plan.module, plan.modality, plan.outputs, path, options.exporter, plan.reads)
            entry = {"file": path.name, "sha256": file_sha256(path), "size_bytes": path.stat().st_size,
                     "inputs": input_specs(plan.modality, plan.reads), "outputs": plan.outputs, **(plan.info or {})}
            parity_inputs = tuple(a[:options.parity_samples] for a in plan.inputs)
            entry["parity"] = check_parity(plan.module, path, plan.outputs, parity_inputs, options.atol,
                                           plan.expected, options.training_atol)
            if options.quantize and plan.quantize:
                int8_path = stage / f"{plan.name}.int8.onnx"
                try:
                    kept = quantize_graph(path, int8_path, tuple((plan.info or {}).get("backbones", ())))
                except ValueError as err:
                    raise ExportError(str(err)) from None
                entry["int8"] = int8_entry(path, int8_path, plan.outputs, plan.inputs, plan.labels)
                method = "dynamic, QUInt8 weights" + (", per channel" if kept["per_channel"] else "")
                entry["int8"].update(method=method, **kept)
                q = entry["int8"]
                print(f"  int8 {int8_path.name}: {q['size_bytes'] / 1e6:.2f} MB ({100 * q['size_ratio']:.0f}% of fp32), "
                      + (f"top-1 agreement {100 * q['top1_agreement']:.1f}%, " if "top1_agreement" in q else "")
                      + f"mean cosine to fp32 {q['mean_cosine']:.4f}"
                      + f", batch-1 {q['latency_b1_ms']:.2f} ms vs fp32 {q['fp32_latency_b1_ms']:.2f} ms")
            log.info("%s: %.1f s", path.name, time.perf_counter() - started)
            (graphs if plan.name == plan.modality else tower_entries)[plan.modality] = entry
        text_reads = {p.reads for p in plans if p.modality == "text"}
        if text_reads == {""}:
            source = tokenizer_path()
            shutil.copyfile(source / TOKENIZER_FILE, stage / TOKENIZER_FILE)
            if (source / "vocab.txt").is_file():
                shutil.copyfile(source / "vocab.txt", stage / "vocab.txt")
        elif text_reads:
            _save_tower_tokenizer(user_tower(text_reads.pop()), stage)
        manifest = dict(manifest, graphs=graphs, towers=tower_entries)
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        stage.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _save_tower_tokenizer(tower: Any, stage: Path) -> None:
    """A user text tower's tokenizer as the one tokenizer.json torch-free `infer` reads (a fast tokenizer's file)."""
    from fedafd.runtime.data.features import tower_tokenizer

    tokenizer = tower_tokenizer(tower)
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"the tokenizer in {tower.tokenizer or tower.path} has no fast (tokenizer.json) form, which "
                          "torch-free infer reads; save it with AutoTokenizer.from_pretrained(..., use_fast=True)")
    tokenizer.backend_tokenizer.save(str(stage / TOKENIZER_FILE))


def _tower_preprocessing(modality: str, name: str) -> dict[str, Any]:
    """How a user tower's graph takes its inputs, as torch-free infer prepares them."""
    tower = user_tower(name)
    if modality == "image":
        return {"size": tower.image_size, "layout": "NCHW", "channels": "RGB", "dtype": "float32", "scale": 1 / 255.0,
                "range": [0.0, 1.0], "background": "white (transparent pixels composited on white)",
                "fit": tower.resize, "pad_colour": list(tower.mean), "tower": name,
                "normalisation": f"inside the graph (mean {list(tower.mean)}, std {list(tower.std)})",
                "reference": "fedafd.runtime.data.images.fit_picture"}
    from fedafd.runtime.data.features import tower_tokenizer

    return {"tokenizer": TOKENIZER_FILE, "max_len": tower.max_tokens, "pad_id": int(tower_tokenizer(tower).pad_token_id or 0),
            "padding": "longest", "truncation": True, "tower": name,
            "reference": "fedafd.runtime.data.features.tower_batch"}


def _preprocessing(modalities: tuple[str, ...], reads: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {m: _tower_preprocessing(m, name) for m, name in (reads or {}).items() if name}
    if "image" in modalities and "image" not in spec:
        spec["image"] = {"size": 32, "layout": "NCHW", "channels": "RGB", "dtype": "float32", "scale": 1 / 255.0,
                         "range": [0.0, 1.0], "background": "white (transparent pixels composited on white)",
                         "fit": "longest side to 32 px (Lanczos), centred",
                         "normalisation": "inside the graph (and the backbone's upsampling, when it has one)",
                         "reference": "fedafd.runtime.data.images.from_pil"}
    if "text" in modalities and "text" not in spec:
        spec["text"] = {"tokenizer": TOKENIZER_FILE, "max_len": MAX_TEXT_LEN, "pad_id": PAD_ID, "padding": "max_length",
                        "truncation": True, "lowercase": True, "special_tokens": "[CLS] ... [SEP]",
                        "reference": "fedafd.runtime.data.text.tokenize"}
    return spec


def _backbones_entry(names: tuple[str, ...]) -> dict[str, Any]:
    """The frozen backbones inside the graphs, named by the sha256 of their shipped weights."""
    entry = {}
    for name in names:
        spec = backbone_spec(name)
        entry[name] = {"modality": spec.modality, "dim": spec.dim, "sha256": backbone_digest(name),
                       "int8": "fp32" if name in FP32_BACKBONES else "quantised"}
        tower = user_tower(name)
        if tower is not None:  # a user's tower: its preprocessing, and int8 as quantize_graph decided
            entry[name].update(source=tower.source, path=tower.path, preprocessing=tower.preprocessing(),
                               int8="quantised, per channel")
        elif spec.modality == "image":
            entry[name]["image_size"] = BACKBONE_IMAGE_SIZE
    return entry


def _reads(encoder: nn.Module | None) -> str | None:
    return None if encoder is None else input_view(encoder)


def export_client(state_dir: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export a client's inference path(s); returns the manifest written to OUT/manifest.json."""
    client = load_client(state_dir)
    meta, model, towers = client.meta, client.model, client.towers
    kind = meta["kind"]
    modalities = MODALITIES_OF_KIND[kind]
    fusion = client.fusion(options.fusion)
    backbone_names = client.backbone_names(fusion)
    data = client_test_split(kind, client.config, backbone_names)
    count = max(options.eval_samples, options.parity_samples) if options.eval_samples else 0
    parity_rows = np.arange(min(options.parity_samples, len(data)))
    backbones = BackboneCache()
    modules = client_graphs(client, fusion, backbones)
    reads = {m: graph_input(m, model.encoders[m], towers.encoders[m] if fusion else None) for m in modalities}
    plans = []
    for modality in modalities:
        inputs = sample_inputs(data, modality, count, reads[modality])
        classifier = model.head is not None
        outputs = output_specs(classifier, meta["feature_dim"], model.head.out_features if classifier else 0)
        labels = data.labels[:len(inputs[0])] if classifier and data.labels is not None else None
        tower = towers.encoders[modality] if fusion else None
        info = {"arch": meta[f"{modality}_arch"], "tower_arch": meta["tower_archs"][modality] if fusion else None,
                "reads": {"local": model.view(modality), "tower": _reads(tower)},
                "backbones": sorted(modules[modality].views.backbones)}
        plans.append(_Plan(modality, modality, modules[modality], outputs, inputs,
                           training_outputs(client, modality, fusion, data, parity_rows), labels, info=info,
                           reads=reads[modality]))
    if fusion:  # the global towers on their own, so a device can compute f_g with ONNX Runtime alone
        for modality in modalities:
            tower = towers.encoders[modality]
            module = TowerGraph(tower, backbones(tower)).eval()
            plans.append(_Plan(f"tower_{modality}", modality, module, output_specs(False, meta["feature_dim"]),
                               sample_inputs(data, modality, options.parity_samples, reads[modality]),
                               encoder_outputs(tower, modality, data, parity_rows), quantize=False,
                               info={"arch": meta["tower_archs"][modality], "reads": _reads(tower),
                                     "backbones": sorted(module.views.backbones)}, reads=reads[modality]))
    manifest = {
        "format": MANIFEST_FORMAT, "kind": kind, "client_id": meta["client_id"], "round": meta["last_round"],
        "model_version": f"{meta['client_id']}@r{meta['last_round']}/tower-v{meta['tower_version']}",
        "state_sha256": file_sha256(Path(state_dir) / STATE_FILE), "tower_version": meta["tower_version"],
        "feature_dim": meta["feature_dim"], "archs": {m: meta[f"{m}_arch"] for m in modalities},
        "tower_archs": meta["tower_archs"] if fusion else {}, "fusion": fusion,
        "backbones": _backbones_entry(backbone_names), "opset": OPSET,
        "exporter": options.exporter, "labels": list(data.class_names) if model.head is not None else [],
        "preprocessing": _preprocessing(modalities, reads), "torch_version": torch.__version__,
    }
    print(f"exporting {meta['client_id']} ({kind}, round {meta['last_round']}, fusion {'on' if fusion else 'off'}"
          + (f", backbones {', '.join(backbone_names)} inside the graphs" if backbone_names else "") + ")")
    return _write_folder(out, plans, manifest, options)


def export_server(checkpoint: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export the server's global image and text towers (RUN_DIR/checkpoint/server.safetensors), each with its
    backbone, as a retrieval model: `image.onnx` and `text.onnx` -> L2-normalised global features,
    verified on the public test split."""
    from fedafd.runtime.data.modal import load_public_data

    checkpoint = checkpoint_path(checkpoint)
    try:
        tensors, meta = load_server_checkpoint(checkpoint, what="export")
    except FedafdError as err:
        raise ExportError(str(err)) from None
    config = meta["config"]
    try:  # the server's model as it trained (the towers and the stage-1 loss's a, b, which are not exported)
        archs = encoder_archs(build_config(ServerConfig, config))  # registers the server's own towers
        model = GlobalModel(archs["image"], archs["text"], config["feature_dim"], config["contrastive_loss"])
        model.load_state_dict(tensors["model"])
    except (ValueError, RuntimeError, FedafdError) as err:
        raise ExportError(f"{checkpoint}: the towers do not load: {str(err).splitlines()[0]}") from None
    archs = model.archs
    encoders = {m: encoder.eval() for m, encoder in model.encoders.items()}
    backbone_names = tuple(sorted({encoder_backbone(e) for e in encoders.values()} - {None}))
    data = load_public_data("test", backbone_names)
    count = max(options.eval_samples, options.parity_samples) if options.eval_samples else 0
    parity_rows = np.arange(min(options.parity_samples, len(data)))
    backbones = BackboneCache()
    plans = []
    reads = {m: graph_input(m, encoder) for m, encoder in encoders.items()}
    for modality, encoder in encoders.items():
        module = TowerGraph(encoder, backbones(encoder)).eval()
        plans.append(_Plan(modality, modality, module, output_specs(False, config["feature_dim"]),
                           sample_inputs(data, modality, count, reads[modality]),
                           encoder_outputs(encoder, modality, data, parity_rows),
                           info={"arch": archs[modality], "reads": input_view(encoder),
                                 "backbones": sorted(module.views.backbones)}, reads=reads[modality]))
    manifest = {
        "format": MANIFEST_FORMAT, "kind": "server", "client_id": "server", "round": meta["round"],
        "model_version": f"server@r{meta['round']}", "state_sha256": file_sha256(checkpoint),
        "feature_dim": config["feature_dim"], "archs": archs, "tower_archs": {}, "fusion": False,
        "backbones": _backbones_entry(backbone_names), "opset": OPSET,
        "exporter": options.exporter, "labels": [], "preprocessing": _preprocessing(("image", "text"), reads),
        "torch_version": torch.__version__,
    }
    print(f"exporting the server's global towers (round {meta['round']}"
          + (f", backbones {', '.join(backbone_names)} inside the graphs" if backbone_names else "") + ")")
    return _write_folder(out, plans, manifest, options)


def export_any(source: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """A client state folder, a server run folder or a server.safetensors checkpoint."""
    source = Path(source)
    if any((source / name).is_file() for name in (STATE_FILE, LEGACY_STATE_FILE)):
        return export_client(source, out, options)
    if source.is_file() or any((source / name).is_file() for name in (SERVER_CHECKPOINT, LEGACY_CHECKPOINT_FILE)):
        return export_server(source, out, options)
    if not source.exists():
        raise ExportError(f"{source} does not exist")
    raise ExportError(f"{source} holds neither a client state ({STATE_FILE}) nor a server checkpoint "
                      f"({SERVER_CHECKPOINT})")


__all__ = ["ExportError", "ExportOptions", "ModelError", "export_any", "export_client", "export_server",
           "load_client", "client_test_split", "client_graphs", "training_outputs"]
