"""A trained client (or the server's global towers) -> verified ONNX graphs, a manifest and the tokenizer.

Graph layout (method.md "Inference on a device"): one graph per input modality, holding the whole
inference path of that modality (local encoder + frozen global tower + GFF + head), rather than two
graphs chained by the manifest. One ONNX Runtime call per input costs less at batch 1 than two, ORT
optimises across the tower/fusion boundary, and there is one file per modality to verify. The global
tower is *also* exported on its own (`tower_<modality>.onnx`) so a device can compute the server's
global features with ONNX Runtime alone.

- image / text clients: `<modality>.onnx` -> `probs` (B, classes) and `feature` (B, d), the fused feature.
- multimodal clients: `image.onnx` and `text.onnx` -> `feature` (B, d), the fused feature L2-normalised
  (retrieval ranks by dot product of normalised features, as `runtime.retrieval` does).
- the server (`export_server`): its two global towers as a retrieval model, `feature` (B, d).

Inputs: `image` float32 (B, 3, 32, 32) in [0, 1]; `input_ids`, `attention_mask` int64 (B, L), L <= 32.
Batch (and sequence) axes are dynamic. Tokenisation stays outside the graph (`tokenizer.json` beside it).

Exporter: the TorchScript-based `torch.onnx.export(dynamo=False)`. Both exporters give the same
outputs here (checked to 1e-7), but the TorchScript one takes about a second per graph where the dynamo
one takes 5-15 s (the GRU), emits the GRU as ONNX's native `GRU` op, and leaves no stale `value_info`
for the quantiser to trip on. `exporter="dynamo"` is kept as an option.

Every graph is verified before the folder is written as done: `onnx.checker.check_model(full_check=True)`
and ONNX Runtime vs PyTorch on real test samples (max abs difference, top-1 agreement; beyond `atol`
the export fails). The result is staged in a temporary folder and renamed into place only when all passed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedafd.edge_client.model import MODALITIES_OF_KIND, GlobalTowers, LocalModel
from fedafd.edge_client.state import STATE_FILE, STATE_VERSION
from fedafd.export.infer import (MANIFEST_FILE, MANIFEST_FORMAT, TOKENIZER_FILE, ModelError, file_sha256,
                                 open_session)
from fedafd.export.quantize import quantize_graph
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.models import build_image_encoder, build_text_encoder, l2_normalise
from fedafd.runtime.data.text import MAX_TEXT_LEN, PAD_ID, tokenizer_path
from fedafd.runtime.torch_utils import load_checkpoint

log = logging.getLogger("fedafd.export")

OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
SERVER_CHECKPOINT = "checkpoint/server.pt"


class ExportError(FedafdError):
    """The state cannot be exported, or the exported graph does not match PyTorch."""


@dataclass(frozen=True)
class ExportOptions:
    parity_samples: int = 64
    """Test samples on which ONNX Runtime must match PyTorch."""
    eval_samples: int = 1000
    """Test samples for the fp32 vs int8 accuracy comparison (0: all of the capped test split)."""
    atol: float = 1e-4
    """Largest allowed |ORT - PyTorch| on any output (probabilities and features are O(1))."""
    quantize: bool = True
    """Also write an int8 graph per modality."""
    fusion: bool = True
    """Fuse with the global tower (GFF) when the state holds one; False exports the local path only
    (for a client trained with gff off or strategy=local)."""
    exporter: str = "torchscript"
    """torchscript (torch.onnx.export dynamo=False) or dynamo."""


# -- the graphs ----------------------------------------------------------------------------------

class ClassifierGraph(nn.Module):
    """Local encoder + frozen global tower + GFF + head: inputs -> (probs (B, C), fused feature (B, d))."""

    def __init__(self, encoder: nn.Module, tower: nn.Module | None, fusion: nn.Module | None, head: nn.Module):
        super().__init__()
        self.encoder, self.tower, self.fusion, self.head = encoder, tower, fusion, head

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = _fused(self.encoder, self.tower, self.fusion, inputs)  # (B, d)
        return torch.softmax(self.head(fused), dim=-1), fused


class FeatureGraph(nn.Module):
    """Local encoder + frozen global tower + GFF: inputs -> L2-normalised fused feature (B, d)."""

    def __init__(self, encoder: nn.Module, tower: nn.Module | None, fusion: nn.Module | None):
        super().__init__()
        self.encoder, self.tower, self.fusion = encoder, tower, fusion

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return l2_normalise(_fused(self.encoder, self.tower, self.fusion, inputs))


def _fused(encoder: nn.Module, tower: nn.Module | None, fusion: nn.Module | None,
           inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    local = encoder(*inputs)  # (B, d)
    if tower is None or fusion is None:
        return local
    return fusion(local, tower(*inputs))  # (B, d)


def input_specs(modality: str) -> list[dict[str, Any]]:
    if modality == "image":
        return [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    return [{"name": name, "dtype": "int64", "shape": ["batch", "seq"], "max_len": MAX_TEXT_LEN}
            for name in ("input_ids", "attention_mask")]


def output_specs(classifier: bool, feature_dim: int, num_classes: int = 0) -> list[dict[str, Any]]:
    feature = {"name": "feature", "dtype": "float32", "shape": ["batch", feature_dim]}
    if classifier:
        return [{"name": "probs", "dtype": "float32", "shape": ["batch", num_classes]}, feature]
    return [feature]


# -- loading what to export ----------------------------------------------------------------------

@dataclass
class LoadedClient:
    model: LocalModel
    towers: GlobalTowers
    meta: dict[str, Any]
    config: dict[str, Any]


def load_client(state_dir: Path) -> LoadedClient:
    """The client's model and towers from STATE_DIR/client_state.pt (+ .json, + config.json when `join`
    wrote one), in eval mode on the CPU."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        raise ExportError(f"no client state at {path}: point at the --state-dir a `fedafd-edge join` used "
                          f"(default edge_state/<client id>) after at least one round")
    try:
        tensors, meta = load_checkpoint(path)
    except Exception as err:
        raise ExportError(f"cannot read the client state {path}: {err}") from None
    if meta.get("state_version") != STATE_VERSION:
        raise ExportError(f"{path} has state version {meta.get('state_version')}, this build reads {STATE_VERSION}")
    weights = tensors["model"]
    num_classes = int(weights["head.weight"].shape[0]) if "head.weight" in weights else 0
    model = LocalModel(meta["kind"], meta["image_arch"], meta["text_arch"], meta["feature_dim"], max(num_classes, 1))
    model.load_state_dict(weights)
    towers = GlobalTowers(meta["feature_dim"], torch.device("cpu"))
    if tensors["towers"]:
        towers.load(meta["tower_version"], meta["tower_archs"], tensors["towers"])
    config_path = Path(state_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return LoadedClient(model.eval(), towers, meta, config)


def client_test_split(kind: str, config: dict[str, Any]) -> ModalData:
    """The client's test split as its device evaluates it (the same cap and seed as `join`)."""
    from fedafd.runtime.data.modal import load_task_data
    from fedafd.runtime.data.partition import cap_indices

    test = load_task_data(kind, "test")
    rows = cap_indices(np.arange(len(test)), int(config.get("max_test", 1000)), int(config.get("seed", 0)))
    return test.select(rows)


def sample_inputs(data: ModalData, modality: str, count: int) -> tuple[np.ndarray, ...]:
    """The graph's raw inputs for the first `count` rows: images float32 in [0, 1], token ids int64."""
    rows = np.arange(min(count, len(data))) if count > 0 else np.arange(len(data))
    return tuple(t.numpy() for t in data.batch(modality, rows, torch.device("cpu")))


# -- export and verification ---------------------------------------------------------------------

def export_graph(module: nn.Module, modality: str, outputs: list[dict[str, Any]], path: Path,
                 example: tuple[np.ndarray, ...], exporter: str) -> None:
    """torch -> ONNX with a dynamic batch axis (and sequence axis for text), then the full checker."""
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    module = module.eval()
    inputs = input_specs(modality)
    names = [s["name"] for s in inputs]
    out_names = [o["name"] for o in outputs]
    args = tuple(torch.from_numpy(np.ascontiguousarray(a[:2])) for a in example)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "seq"} if modality == "text" else {0: "batch"} for n in names}
            axes.update({n: {0: "batch"} for n in out_names})
            torch.onnx.export(module, args, str(path), input_names=names, output_names=out_names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        else:
            from torch.export import Dim

            batch, seq = Dim("batch"), Dim("seq", min=2, max=MAX_TEXT_LEN)
            shapes = tuple({0: batch, 1: seq} if modality == "text" else {0: batch} for _ in names)
            program = torch.onnx.export(module, args, input_names=names, output_names=out_names,
                                        dynamic_shapes=shapes, opset_version=18, dynamo=True, verbose=False)
            program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ExportError(f"onnx.checker rejects {path.name}: {err}") from None


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


def check_parity(module: nn.Module, path: Path, outputs: list[dict[str, Any]], inputs: tuple[np.ndarray, ...],
                 atol: float) -> dict[str, Any]:
    """ORT vs PyTorch on the same real samples, as one batch and row by row (the dynamic batch axis)."""
    names = [o["name"] for o in outputs]
    reference = _run_torch(module, inputs)
    session = open_session(path)
    batched = run_onnx(session, names, inputs)
    single = run_onnx(session, names, tuple(a[:4] for a in inputs), batch_size=1)
    diffs = {n: float(np.abs(b - r).max()) for n, b, r in zip(names, batched, reference)}
    diffs_b1 = {n: float(np.abs(s - r[:4]).max()) for n, s, r in zip(names, single, reference)}
    report: dict[str, Any] = {"samples": int(len(inputs[0])), "max_abs_diff": diffs, "max_abs_diff_batch1": diffs_b1,
                              "atol": atol}
    scores_ort, scores_ref = batched[0], reference[0]
    if names[0] == "feature":  # retrieval: the top-1 neighbour of each row among the batch's rows
        scores_ort, scores_ref = scores_ort @ scores_ort.T, scores_ref @ scores_ref.T
    report["top1_agreement"] = float((scores_ort.argmax(1) == scores_ref.argmax(1)).mean())
    worst = max(list(diffs.values()) + list(diffs_b1.values()))
    print(f"  parity {path.name}: {report['samples']} samples, max |ORT - PyTorch| {worst:.2e}, "
          f"top-1 agreement {100 * report['top1_agreement']:.1f}%")
    if not np.isfinite(worst) or worst > atol:
        raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch by {worst:.3g} (> atol {atol:g}) "
                          f"on real test samples; not exported")
    return report


def quick_latency_ms(path: Path, inputs: tuple[np.ndarray, ...], runs: int = 30) -> float:
    """Median batch-1 latency of one session (the full benchmark is benchmarks/latency.py)."""
    session = open_session(path)
    feeds = {i.name: np.ascontiguousarray(a[:1]) for i, a in zip(session.get_inputs(), inputs)}
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _graph_entry(path: Path, modality: str, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"file": path.name, "sha256": file_sha256(path), "size_bytes": path.stat().st_size,
            "inputs": input_specs(modality), "outputs": outputs}


def _int8_entry(fp32_path: Path, int8_path: Path, module: nn.Module, outputs: list[dict[str, Any]],
                inputs: tuple[np.ndarray, ...], labels: np.ndarray | None) -> dict[str, Any]:
    """Size, batch-1 latency and accuracy of the int8 graph against the fp32 one on the same test rows."""
    names = [o["name"] for o in outputs]
    fp32 = run_onnx(open_session(fp32_path), names, inputs)[0]
    int8 = run_onnx(open_session(int8_path), names, inputs)[0]
    entry: dict[str, Any] = {
        "file": int8_path.name, "sha256": file_sha256(int8_path), "size_bytes": int8_path.stat().st_size,
        "size_ratio": int8_path.stat().st_size / fp32_path.stat().st_size, "eval_samples": int(len(fp32)),
        "latency_b1_ms": quick_latency_ms(int8_path, inputs), "fp32_latency_b1_ms": quick_latency_ms(fp32_path, inputs),
        "max_abs_diff": float(np.abs(int8 - fp32).max()),
    }
    if names[0] == "probs":
        entry["top1_agreement"] = float((int8.argmax(1) == fp32.argmax(1)).mean())
        if labels is not None:
            entry["fp32_top1"] = 100.0 * float((fp32.argmax(1) == labels).mean())
            entry["int8_top1"] = 100.0 * float((int8.argmax(1) == labels).mean())
            entry["top1_delta"] = entry["int8_top1"] - entry["fp32_top1"]
    else:
        entry["mean_cosine"] = float(np.mean(np.sum(int8 * fp32, axis=1)))
    return entry


@dataclass
class _Plan:
    """One modality's graph: the module, its outputs and the real samples that verify it."""

    modality: str
    module: nn.Module
    outputs: list[dict[str, Any]]
    inputs: tuple[np.ndarray, ...]
    labels: np.ndarray | None


def _write_folder(out: Path, plans: list[_Plan], towers: dict[str, nn.Module], manifest: dict[str, Any],
                  options: ExportOptions) -> dict[str, Any]:
    """Export, verify and quantise every graph into a staging folder, then move it to `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ExportError(f"{out} exists and is not an exported model folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        graphs, tower_entries = {}, {}
        for plan in plans:
            path = stage / f"{plan.modality}.onnx"
            export_graph(plan.module, plan.modality, plan.outputs, path, plan.inputs, options.exporter)
            parity_inputs = tuple(a[:options.parity_samples] for a in plan.inputs)
            entry = _graph_entry(path, plan.modality, plan.outputs)
            entry["parity"] = check_parity(plan.module, path, plan.outputs, parity_inputs, options.atol)
            if options.quantize:
                int8_path = stage / f"{plan.modality}.int8.onnx"
                kept = quantize_graph(path, int8_path, plan.modality)
                entry["int8"] = _int8_entry(path, int8_path, plan.module, plan.outputs, plan.inputs, plan.labels)
                entry["int8"].update(method="dynamic, QUInt8 weights", kept_fp32=kept)
                q = entry["int8"]
                print(f"  int8 {int8_path.name}: {q['size_bytes'] / 1e6:.2f} MB ({100 * q['size_ratio']:.0f}% of fp32), "
                      + (f"top-1 agreement {100 * q['top1_agreement']:.1f}%" if "top1_agreement" in q
                         else f"mean cosine to fp32 {q['mean_cosine']:.4f}")
                      + f", batch-1 {q['latency_b1_ms']:.2f} ms vs fp32 {q['fp32_latency_b1_ms']:.2f} ms")
            graphs[plan.modality] = entry
        for modality, tower in towers.items():
            plan = next(p for p in plans if p.modality == modality)
            outputs = output_specs(False, manifest["feature_dim"])
            path = stage / f"tower_{modality}.onnx"
            export_graph(tower, modality, outputs, path, plan.inputs, options.exporter)
            entry = _graph_entry(path, modality, outputs)
            entry["parity"] = check_parity(tower, path, outputs, tuple(a[:options.parity_samples] for a in plan.inputs),
                                           options.atol)
            entry["arch"] = manifest["tower_archs"][modality]
            tower_entries[modality] = entry
        if any(p.modality == "text" for p in plans):
            source = tokenizer_path()
            shutil.copyfile(source / TOKENIZER_FILE, stage / TOKENIZER_FILE)
            if (source / "vocab.txt").is_file():
                shutil.copyfile(source / "vocab.txt", stage / "vocab.txt")
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


def _preprocessing(modalities: tuple[str, ...]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if "image" in modalities:
        spec["image"] = {"size": 32, "layout": "NCHW", "channels": "RGB", "dtype": "float32", "scale": 1 / 255.0,
                         "range": [0.0, 1.0], "background": "white (transparent pixels composited on white)",
                         "fit": "longest side to 32 px (Lanczos), centred", "normalisation": "inside the graph",
                         "reference": "fedafd.runtime.data.images.from_pil"}
    if "text" in modalities:
        spec["text"] = {"tokenizer": TOKENIZER_FILE, "max_len": MAX_TEXT_LEN, "pad_id": PAD_ID, "padding": "max_length",
                        "truncation": True, "lowercase": True, "special_tokens": "[CLS] ... [SEP]",
                        "reference": "fedafd.runtime.data.text.tokenize"}
    return spec


def export_client(state_dir: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export a client's inference path(s); returns the manifest written to OUT/manifest.json."""
    client = load_client(state_dir)
    meta, model, towers = client.meta, client.model, client.towers
    kind = meta["kind"]
    modalities = MODALITIES_OF_KIND[kind]
    fusion = options.fusion and all(towers.has(m) for m in modalities)
    data = client_test_split(kind, client.config)
    count = max(options.eval_samples, options.parity_samples) if options.eval_samples else 0
    plans = []
    for modality in modalities:
        tower = towers.encoders[modality] if fusion else None
        fuse = model.fusions[modality] if fusion else None
        inputs = sample_inputs(data, modality, count)
        if model.head is not None:
            module: nn.Module = ClassifierGraph(model.encoders[modality], tower, fuse, model.head)
            outputs = output_specs(True, meta["feature_dim"], model.head.out_features)
            labels = data.labels[:len(inputs[0])] if data.labels is not None else None
        else:
            module, outputs, labels = FeatureGraph(model.encoders[modality], tower, fuse), output_specs(False, meta["feature_dim"]), None
        plans.append(_Plan(modality, module.eval(), outputs, inputs, labels))
    manifest = {
        "format": MANIFEST_FORMAT, "kind": kind, "client_id": meta["client_id"], "round": meta["last_round"],
        "model_version": f"{meta['client_id']}@r{meta['last_round']}/tower-v{meta['tower_version']}",
        "state_sha256": file_sha256(Path(state_dir) / STATE_FILE), "tower_version": meta["tower_version"],
        "feature_dim": meta["feature_dim"], "archs": {m: meta[f"{m}_arch"] for m in modalities},
        "tower_archs": meta["tower_archs"] if fusion else {}, "fusion": fusion, "opset": OPSET,
        "exporter": options.exporter, "labels": list(data.class_names) if model.head is not None else [],
        "preprocessing": _preprocessing(modalities), "torch_version": torch.__version__,
    }
    print(f"exporting {meta['client_id']} ({kind}, round {meta['last_round']}, fusion {'on' if fusion else 'off'})")
    exported_towers = {m: towers.encoders[m].eval() for m in modalities} if fusion else {}
    return _write_folder(out, plans, exported_towers, manifest, options)


def export_server(checkpoint: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Export the server's global image and text towers (RUN_DIR/checkpoint/server.pt) as a retrieval
    model: `image.onnx` and `text.onnx` -> L2-normalised global features, verified on the public test split."""
    from fedafd.runtime.data.modal import load_public_data

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / SERVER_CHECKPOINT
    if not checkpoint.is_file():
        raise ExportError(f"no server checkpoint at {checkpoint}")
    tensors, meta = load_checkpoint(checkpoint)
    config = meta["config"]
    archs = {"image": config["image_arch"], "text": config["text_arch"]}
    builders = {"image": build_image_encoder, "text": build_text_encoder}
    data = load_public_data("test")
    plans = []
    for modality in ("image", "text"):
        encoder = builders[modality](archs[modality], config["feature_dim"])
        prefix = f"encoders.{modality}."
        encoder.load_state_dict({k[len(prefix):]: v for k, v in tensors["model"].items() if k.startswith(prefix)})
        inputs = sample_inputs(data, modality, options.eval_samples)
        plans.append(_Plan(modality, FeatureGraph(encoder, None, None).eval(), output_specs(False, config["feature_dim"]),
                           inputs, None))
    manifest = {
        "format": MANIFEST_FORMAT, "kind": "server", "client_id": "server", "round": meta["round"],
        "model_version": f"server@r{meta['round']}", "state_sha256": file_sha256(checkpoint),
        "feature_dim": config["feature_dim"], "archs": archs, "tower_archs": {}, "fusion": False, "opset": OPSET,
        "exporter": options.exporter, "labels": [], "preprocessing": _preprocessing(("image", "text")),
        "torch_version": torch.__version__,
    }
    print(f"exporting the server's global towers (round {meta['round']})")
    return _write_folder(out, plans, {}, manifest, options)


def export_any(source: Path, out: Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """A client state folder, a server run folder or a server.pt checkpoint."""
    source = Path(source)
    if (source / STATE_FILE).is_file():
        return export_client(source, out, options)
    if source.suffix == ".pt" or (source / SERVER_CHECKPOINT).is_file():
        return export_server(source, out, options)
    if not source.exists():
        raise ExportError(f"{source} does not exist")
    raise ExportError(f"{source} holds neither a client state ({STATE_FILE}) nor a server checkpoint "
                      f"({SERVER_CHECKPOINT})")


__all__ = ["ExportError", "ExportOptions", "ModelError", "export_any", "export_client", "export_server",
           "load_client", "client_test_split", "ClassifierGraph", "FeatureGraph"]
