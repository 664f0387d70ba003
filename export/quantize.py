"""fp32 ONNX graph -> int8 with onnxruntime.quantization (no torch here).

Choice, measured on the 2-core AMD EPYC (AVX-512 VNNI) this project is developed on: *dynamic*
quantisation, uint8 weights (QUInt8; per-channel + reduce_range agreed less here, 97.1%),
of every MatMul, Gemm, Gather (the token embeddings, most of a text graph's bytes), GRU and Conv,
except the stem convolutions that read the three colour channels and the classification head: keeping
those few kB in fp32 lifted the image classifier's top-1 agreement with fp32 from 98.5% to 99.5% at the
same size. Static QDQ quantisation (calibrated on training images) was no faster for these small CNNs
and agreed less (96.5-97%), so one dynamic recipe serves every graph (per-channel where MiniLM is in it).

The frozen backbones inside a deployable graph (export/onnx_export.py), measured on 1,000 test rows
of adapter classifiers (effnet_linear / minilm_linear local encoder and tower, d=32, 2 epochs on 256
samples), int8 against the fp32 graph:
- EfficientNet-Lite0 stays fp32 (FP32_BACKBONES). Quantised with the same recipe (ConvInteger for its
  49 convolutions, depthwise ones included) top-1 agreement fell to 68.6%, accuracy by 4.6 pp (63.9 ->
  59.3%), the mean cosine of the fused features to 0.74, and the graph ran 5x slower at batch 1
  (33 vs 6 ms) and 4x at batch 32: ORT's ConvInteger kernels are slower than its fp32 convolutions.
  Kept fp32, the image graph's int8 copy agrees 99.8% but is 99% of the fp32 size (the backbone's
  13.5 MB are the bytes); only the adapter, the tower and GFF shrink.
- MiniLM is quantised, with per-channel weight scales (PER_CHANNEL_BACKBONES): 23.1 MB instead of
  90.6 MB (26%), top-1 agreement 97.5%, mean cosine 0.995, accuracy unchanged (64.1%), batch 1 faster.
  Per-tensor scales agreed 95.7% (cosine 0.988) at the same size; keeping the six FFN down-projections
  fp32 as well gave 97.9% for 34 MB; QInt8 weights 93.4%; the Gather of the token embeddings in fp32
  changed nothing but the size (59 MB). Kept fully fp32 it agrees 99.9% at 100% of the size.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import onnx

QUANTIZED_OPS = ["MatMul", "Gemm", "Gather", "GRU", "Conv"]
FP32_BACKBONES: frozenset[str] = frozenset({"efficientnet_lite0"})
"""Backbones whose nodes all stay fp32 in the int8 graph (measured above)."""
PER_CHANNEL_BACKBONES: frozenset[str] = frozenset({"minilm"})
"""Quantised backbones that need per-channel weight scales; a graph holding one is quantised per channel."""


def _scopes(node: onnx.NodeProto) -> list[str]:
    """The module paths a node was exported from. TorchScript names the node by them
    (/views/efficientnet_lite0/_conv_stem/Conv: the modules whose forward ran, ModuleDicts elided); the
    dynamo exporter names it node_Conv_12 and keeps the paths in its metadata
    (['', 'views', 'views.backbones.efficientnet_lite0', ...])."""
    scopes = [part for part in node.name.split("/")[1:-1]]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes += [str(s).rsplit(".", 1)[-1] for s in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                pass
    return scopes


def backbone_of_node(node: onnx.NodeProto, backbones: tuple[str, ...]) -> str | None:
    """The backbone (of `backbones`) a node belongs to, None for the trainable part of the graph: in a
    deployable graph a backbone runs as the module `views.backbones[name]` (export/onnx_export.py)."""
    scopes = _scopes(node)
    for backbone in backbones:
        if backbone in scopes:
            return backbone
    return None


def kept_in_fp32(model: onnx.ModelProto, backbones: tuple[str, ...] = (),
                 fp32_backbones: frozenset[str] | set[str] = FP32_BACKBONES) -> list[str]:
    """Nodes left in fp32: convolutions over the 3 input colour channels, the head's Gemm, and every
    node of a backbone in `fp32_backbones`."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        backbone = backbone_of_node(node, backbones)
        if backbone is not None and backbone in fp32_backbones:
            kept.append(node.name)
        elif node.op_type == "Conv" and len(node.input) > 1 and shapes.get(node.input[1], [0, 0])[1:2] == [3]:
            kept.append(node.name)
        elif node.op_type in ("Gemm", "MatMul") and "head" in _scopes(node):
            kept.append(node.name)
    return kept


def quantize_graph(fp32: Path, int8: Path, backbones: tuple[str, ...] = (),
                   fp32_backbones: frozenset[str] | set[str] = FP32_BACKBONES) -> dict[str, Any]:
    """Write the int8 graph of a graph that contains `backbones`; returns {"kept_fp32": the nodes of the
    trainable part kept in fp32, "fp32_backbones": the backbones left in fp32, "int8_backbones": those
    quantised, "per_channel": whether weight scales are per channel}. A backbone none of whose nodes can
    be found is an error (it would be quantised unseen)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    # A dynamo-exported graph carries stale value_info the quantiser's shape inference trips on; it is a hint only.
    del model.graph.value_info[:]
    kept = kept_in_fp32(model, backbones, fp32_backbones)
    found = {backbone_of_node(n, backbones) for n in model.graph.node} - {None}
    if found != set(backbones):
        raise ValueError(f"{fp32.name}: no nodes of the backbone(s) {', '.join(sorted(set(backbones) - found))} found "
                         f"by module path; cannot tell which nodes to quantise")
    quantised = found - set(fp32_backbones)
    # A user's tower (any name but the shipped two) is quantised per channel, as MiniLM needs: per-tensor scales
    # are what broke MiniLM, and nothing is known ahead of a tower the user brings (the manifest reports its cosine).
    per_channel = bool(quantised & PER_CHANNEL_BACKBONES or quantised - FP32_BACKBONES - PER_CHANNEL_BACKBONES)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a "consider pre-processing" warning on every call
    try:
        quantize_dynamic(model, str(int8), op_types_to_quantize=QUANTIZED_OPS, weight_type=QuantType.QUInt8,
                         nodes_to_exclude=kept, per_channel=per_channel)
    finally:
        root.setLevel(level)
    in_backbones = {n.name for n in model.graph.node if backbone_of_node(n, backbones) is not None}
    return {"kept_fp32": [n for n in kept if n not in in_backbones],
            "fp32_backbones": sorted(found & set(fp32_backbones)), "int8_backbones": sorted(quantised),
            "per_channel": per_channel}
