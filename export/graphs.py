"""The deployable paths as torch modules, and their export to ONNX.

Graph layout (docs/method.md "Inference on a device"): one graph per input modality, holding the whole
deployable path of that modality from raw inputs: the frozen backbone(s) + local encoder + frozen global
tower + GFF + head, rather than graphs chained by the manifest. One ONNX Runtime call per input costs
less at batch 1, ORT optimises across the boundaries, and there is one file per modality to verify.

- `ClientGraph` is that path as a torch module: per modality it runs the backbone once (when the local
  encoder and/or the tower adapt it; `BackboneViews`), hands adapters the backbone's feature and encoders
  trained from scratch the raw inputs, then calls `LocalModel.head_outputs`, the encode -> fuse -> head
  path training and evaluation take. The export, the ORT parity check and the eager benchmark all run
  this one module; training reads the backbones' *cached* features instead, so every graph is also
  checked against the training code path on the same rows (`training_outputs`).
- image / text clients: `<modality>.onnx` -> `probs` (B, classes) = softmax of the logits, and `feature`
  (B, d), the fused feature z.
- multimodal clients: `image.onnx` and `text.onnx` -> `feature` (B, d), z L2-normalised (retrieval ranks
  by dot product of normalised features, as `runtime.retrieval` does).
- the global tower on its own, backbone included (`tower_<modality>.onnx`, `TowerGraph`), so a device
  can compute the server's global features with ONNX Runtime alone.
- the server (`export_server`): its two global towers, backbones included, as a retrieval model.

Inputs: `image` float32 (B, 3, 32, 32) in [0, 1]; `input_ids`, `attention_mask` int64 (B, L), L <= 32. A graph
holding a user tower takes that tower's inputs instead (`graph_input`): pictures at its image size, brought
there by `runtime.data.images.fit_picture`, or its own tokenizer's ids, at most its max_tokens.
Batch (and sequence) axes are dynamic. Tokenisation stays outside the graph (`tokenizer.json` beside it).
A graph that holds EfficientNet-Lite0 upsamples the 32 px image to 112 px inside; one that holds MiniLM
is ~90 MB (its int8 copy ~23 MB; `export/quantize.py` says which backbone is quantised and why).

Exporter: the TorchScript-based `torch.onnx.export(dynamo=False)`, traced on the feature cache's
example rows (`runtime.data.features`; its texts end in padding, so MiniLM's mask is traced as data).
It takes about a second per small graph and 5-10 s for one holding a backbone (EfficientNet-Lite0 and
MiniLM's BERT both export and match PyTorch to ~1e-6), emits the GRU as ONNX's native `GRU` op and
leaves no stale `value_info` for the quantiser to trip on. `exporter="dynamo"` is kept as an option
(checked with both backbones: the same parity, 10-15 s per backbone graph); both keep each node's
module path, by which the quantiser finds a backbone's nodes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedafd.edge_client.model import LocalModel
from fedafd.runtime.backbones import BackboneMissingError, build_backbone, user_tower
from fedafd.runtime.data.features import OPSET
from fedafd.runtime.data.features import example_inputs as trace_example
from fedafd.runtime.data.modal import RAW
from fedafd.runtime.data.views import INPUTS_PREFIX
from fedafd.runtime.data.text import MAX_TEXT_LEN
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.models import input_view

EXPORTERS = ("torchscript", "dynamo")


class ExportError(FedafdError):
    """The state cannot be exported, or the exported graph does not match PyTorch."""


class BackboneViews(nn.Module):
    """The frozen backbones one modality's graph needs, each run once on the raw inputs: forward(*inputs)
    -> {view: the inputs of an encoder that reads it}: RAW -> the inputs themselves, a backbone's name ->
    its pooled feature (B, D), the feature whose cached copy `ModalData.batch(..., view)` hands training."""

    def __init__(self, backbones: dict[str, nn.Module]):
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)

    def forward(self, *inputs: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        views = {RAW: inputs}
        for name, backbone in self.backbones.items():
            views[name] = (backbone(*inputs),)  # (B, D)
        return views


def view_inputs(views: dict[str, tuple[torch.Tensor, ...]], view: str) -> tuple[torch.Tensor, ...]:
    """The inputs of an encoder that reads `view`: a finetune tower (inputs:NAME) runs on the graph's own inputs."""
    return views[RAW] if view.startswith(INPUTS_PREFIX) else views[view]


class ClientGraph(nn.Module):
    """A device's whole deployable path of one modality from raw inputs: backbone (once, when the local
    encoder and/or the global tower read it) -> local encoder and frozen global tower -> GFF + head through
    `LocalModel.head_outputs`, the path training and evaluation take. Classifiers: (probs (B, C) = softmax
    of the logits, the fused feature z (B, d)); retrieval: the L2-normalised fused feature (B, d)."""

    def __init__(self, model: LocalModel, modality: str, tower: nn.Module | None, backbones: dict[str, nn.Module]):
        super().__init__()
        self.model, self.modality, self.tower = model, modality, tower
        self.views = BackboneViews(backbones)
        self.local_view = model.view(modality)
        self.tower_view = input_view(tower) if tower is not None else None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        views = self.views(*inputs)
        local = self.model.encoders[self.modality](*view_inputs(views, self.local_view))  # (B, d)
        global_ = self.tower(*view_inputs(views, self.tower_view)) if self.tower is not None else None  # (B, d)
        fused, output = self.model.head_outputs(self.modality, local, global_)
        if self.model.head is not None:
            return torch.softmax(output, dim=-1), fused
        return output


class TowerGraph(nn.Module):
    """An encoder of the zoo from raw inputs (its backbone first when it adapts one) -> its L2-normalised
    feature (B, d): a client's global tower (f_g, as `GlobalTowers.encode` computes it from the cache) or
    one of the server's towers."""

    def __init__(self, encoder: nn.Module, backbones: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.views = BackboneViews(backbones)
        self.view = input_view(encoder)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder(*view_inputs(self.views(*inputs), self.view))  # (B, d)


class BackboneCache:
    """Builds each frozen backbone once per export (MiniLM takes seconds to load) and shares the module
    between the graphs that contain it."""

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}

    def __call__(self, *encoders: nn.Module | None) -> dict[str, nn.Module]:
        """The backbones the given encoders read (none for encoders trained on raw inputs)."""
        names = sorted(v for v in {input_view(e) for e in encoders if e is not None} - {RAW}
                       if not v.startswith(INPUTS_PREFIX))  # a finetune tower is inside its encoder
        for name in names:
            if name not in self.modules:
                try:
                    self.modules[name] = build_backbone(name)
                except BackboneMissingError as err:
                    raise ExportError(f"cannot put the {name} backbone into the graph: {err}") from None
        return {name: self.modules[name] for name in names}


def graph_input(modality: str, *encoders: nn.Module | None) -> str:
    """What one graph of `modality` takes, given the encoders inside it: "" for the project's own inputs (32 px
    pictures, MiniLM's tokens: what encoders from scratch and the shipped backbones read), else the name of the
    user tower whose own preprocessing makes them. A graph cannot take two: a user tower beside another input
    is refused, naming both."""
    views = {input_view(e).removeprefix(INPUTS_PREFIX) for e in encoders if e is not None}
    users = sorted(v for v in views if user_tower(v) is not None)
    if not users:
        return ""
    if len(views) > 1:
        raise ExportError(f"the {modality} graph would take two inputs ({', '.join(sorted(views))}: the local encoder "
                          f"and the global tower read different towers); export with --no-fusion, or give the "
                          f"device the server's tower as its own")
    return users[0]


def input_specs(modality: str, reads: str = "") -> list[dict[str, Any]]:
    """The graph's inputs: the project's (32 px, MiniLM's 32 tokens), or those of the user tower it `reads`."""
    tower = user_tower(reads) if reads else None
    if modality == "image":
        size = tower.image_size if tower is not None else 32
        return [{"name": "image", "dtype": "float32", "shape": ["batch", 3, size, size]}]
    max_len = tower.max_tokens if tower is not None else MAX_TEXT_LEN
    return [{"name": name, "dtype": "int64", "shape": ["batch", "seq"], "max_len": max_len}
            for name in ("input_ids", "attention_mask")]


def output_specs(classifier: bool, feature_dim: int, num_classes: int = 0) -> list[dict[str, Any]]:
    feature = {"name": "feature", "dtype": "float32", "shape": ["batch", feature_dim]}
    if classifier:
        return [{"name": "probs", "dtype": "float32", "shape": ["batch", num_classes]}, feature]
    return [feature]


def export_graph(module: nn.Module, modality: str, outputs: list[dict[str, Any]], path: Path, exporter: str,
                 reads: str = "") -> None:
    """torch -> ONNX with a dynamic batch axis (and sequence axis for text), then the full checker. Traced
    on the backbone cache's example rows (texts end in padding, so the mask is traced as data)."""
    import onnx

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    module = module.eval()
    inputs = input_specs(modality, reads)
    names = [s["name"] for s in inputs]
    out_names = [o["name"] for o in outputs]
    args = trace_example(modality, reads)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "seq"} if modality == "text" else {0: "batch"} for n in names}
            axes.update({n: {0: "batch"} for n in out_names})
            torch.onnx.export(module, args, str(path), input_names=names, output_names=out_names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        else:
            from torch.export import Dim

            batch, seq = Dim("batch"), Dim("seq", min=2, max=inputs[0].get("max_len", MAX_TEXT_LEN))
            # forward(*inputs): torch.export sees one argument, the tuple of inputs
            shapes = (tuple({0: batch, 1: seq} if modality == "text" else {0: batch} for _ in names),)
            program = torch.onnx.export(module, args, input_names=names, output_names=out_names,
                                        dynamic_shapes=shapes, opset_version=18, dynamo=True, verbose=False)
            program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ExportError(f"onnx.checker rejects {path.name}: {err}") from None
