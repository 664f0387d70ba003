"""Export of every client kind and of the server's towers: raw inputs in, backbones inside, checker,
parity with PyTorch and with the training code path, manifest, int8."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedafd.export.infer import MANIFEST_FILE, OnnxModel, file_sha256
from fedafd.export.onnx_export import (ExportError, ExportOptions, client_graphs, client_test_split, export_any,
                                       export_client, export_server, load_client, sample_inputs, training_outputs)
from fedafd.cloud_server.checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT, save_server_checkpoint
from fedafd.cloud_server.stages import GlobalModel
from fedafd.runtime.checkpoint import load_checkpoint, save_checkpoint
from fedafd.runtime.config import ServerConfig

KINDS = ("image", "text", "multimodal")
BACKBONES_IN = {  # kind -> graph -> the backbones inside it (conftest.CLIENTS)
    "image": {"image": ["efficientnet_lite0"]},
    "text": {"text": []},
    "multimodal": {"image": ["efficientnet_lite0"], "text": ["minilm"]},
}
RAW_INPUTS = {"image": [("image", onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])],
              "text": [("input_ids", onnx.TensorProto.INT64, ["batch", "seq"]),
                       ("attention_mask", onnx.TensorProto.INT64, ["batch", "seq"])]}


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def graph_entries(manifest: dict) -> list[dict]:
    return list(manifest["graphs"].values()) + list(manifest["towers"].values())


def test_session_graphs_took_their_backbones(exported) -> None:
    """The fixture's exports are what the other tests assume: a raw-input local beside a backbone tower,
    and the multimodal adapter client with both backbones."""
    assert manifest_of(exported["image"][1])["backbones"].keys() == {"efficientnet_lite0"}
    assert manifest_of(exported["text"][1])["backbones"] == {}
    assert manifest_of(exported["multimodal"][1])["backbones"].keys() == {"efficientnet_lite0", "minilm"}


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_is_complete_and_files_match(exported, kind: str) -> None:
    # Prepare
    _, folder = exported[kind]

    # Execute
    manifest = manifest_of(folder)

    # Assert
    for key in ("format", "kind", "client_id", "round", "model_version", "feature_dim", "archs", "tower_archs",
                "fusion", "backbones", "opset", "labels", "preprocessing", "graphs", "towers"):
        assert key in manifest, key
    assert manifest["kind"] == kind and manifest["client_id"] == f"{kind}-0" and manifest["round"] == 0
    assert manifest["fusion"] is True
    expected = ("image", "text") if kind == "multimodal" else (kind,)
    assert tuple(manifest["graphs"]) == expected and tuple(manifest["towers"]) == expected
    if kind != "multimodal":
        assert len(manifest["labels"]) == manifest["graphs"][kind]["outputs"][0]["shape"][1] > 1
    if "text" in expected:
        assert manifest["preprocessing"]["text"]["max_len"] == 32
        assert (folder / manifest["preprocessing"]["text"]["tokenizer"]).is_file()
    for name, backbone in manifest["backbones"].items():
        assert len(backbone["sha256"]) == 64 and backbone["dim"] in (384, 1280), name
    for entry in graph_entries(manifest):
        path = folder / entry["file"]
        assert file_sha256(path) == entry["sha256"]
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        assert entry["inputs"][0]["shape"][0] == "batch"
        assert entry["parity"]["samples"] == 32


@pytest.mark.parametrize("kind", KINDS)
def test_graphs_take_raw_inputs_and_run_each_backbone_once(exported, kind: str) -> None:
    """Pixels or token ids in (never backbone features); a backbone read by both the local encoder and
    the tower appears once in the graph."""
    _, folder = exported[kind]
    manifest = manifest_of(folder)
    for modality, backbones in BACKBONES_IN[kind].items():
        for entry in (manifest["graphs"][modality], manifest["towers"][modality]):
            # Assert: the declared and the actual inputs are the raw ones
            model = onnx.load(str(folder / entry["file"]))
            actual = [(i.name, i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                      for i in model.graph.input]
            assert actual == RAW_INPUTS[modality]
            assert [s["name"] for s in entry["inputs"]] == [name for name, _, _ in RAW_INPUTS[modality]]
            ops = Counter(node.op_type for node in model.graph.node)
            if "efficientnet_lite0" in entry["backbones"]:  # one EfficientNet-Lite0: 32 -> 112 px, 49 convolutions
                assert ops["Resize"] == 1
                assert sum(n.op_type == "Conv" and "/efficientnet_lite0/" in n.name for n in model.graph.node) == 49
            if "minilm" in entry["backbones"]:  # one 6-layer BERT: its embeddings, 2 layer norms per layer
                assert sum("word_embeddings" in node.name for node in model.graph.node) == 1
                assert ops["LayerNormalization"] == 13
        assert manifest["graphs"][modality]["backbones"] == backbones
    if kind == "multimodal":  # both the local adapter and the tower read the backbone: one copy
        assert manifest["graphs"]["image"]["reads"] == {"local": "efficientnet_lite0", "tower": "efficientnet_lite0"}
    if kind == "image":  # a raw-input local encoder beside a backbone tower
        assert manifest["graphs"]["image"]["reads"] == {"local": "raw", "tower": "efficientnet_lite0"}


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_pytorch_and_training_is_recorded_and_tight(exported, kind: str) -> None:
    _, folder = exported[kind]
    for entry in graph_entries(manifest_of(folder)):
        parity = entry["parity"]
        assert max(parity["max_abs_diff"].values()) <= 1e-4
        assert max(parity["max_abs_diff_batch1"].values()) <= 1e-4
        assert max(parity["vs_training"]["max_abs_diff"].values()) <= 1e-4
        assert parity["top1_agreement"] >= 0.95


def test_a_dp_devices_model_with_layer_norm_gates_exports_with_parity(dp_image_state: Path, tmp_path: Path) -> None:
    # Execute: an image device trained with DP-SGD (an adapter, GFF's gates with LayerNorm)
    export_client(dp_image_state, tmp_path / "model", ExportOptions(parity_samples=32, eval_samples=64, quantize=False))
    # Assert: the exporter rebuilt the LayerNorm fusion (the weights load strictly) and ONNX Runtime agrees.
    (entry,) = graph_entries(manifest_of(tmp_path / "model"))[:1]
    assert max(entry["parity"]["max_abs_diff"].values()) <= 1e-4
    assert max(entry["parity"]["vs_training"]["max_abs_diff"].values()) <= 1e-4


@pytest.mark.parametrize("kind", ("image", "multimodal"))
def test_graph_on_raw_inputs_matches_the_training_code_path(exported, kind: str) -> None:
    """Independent of the recorded numbers: `head_outputs` on the cached (ONNX Runtime) backbone features,
    as training and evaluation compute it, against the PyTorch wrapper and the exported graph, which run
    the backbone themselves on the raw inputs."""
    # Prepare
    state, folder = exported[kind]
    client = load_client(state)
    data = client_test_split(kind, {"seed": 0, "max_test": 200}, client.backbone_names(True))
    rows = np.arange(48)
    graphs = client_graphs(client)
    model = OnnxModel(folder)
    for modality in client.model.modalities:
        inputs = sample_inputs(data, modality, len(rows))

        # Execute
        reference = training_outputs(client, modality, True, data, rows)
        with torch.no_grad():
            wrapped = graphs[modality](*(torch.from_numpy(a) for a in inputs))
        wrapped = [t.numpy() for t in (wrapped if isinstance(wrapped, tuple) else (wrapped,))]
        deployed = list(model.run(modality, *inputs).values())

        # Assert
        for want, got_torch, got_onnx in zip(reference, wrapped, deployed):
            assert np.abs(got_torch - want).max() < 1e-4
            assert np.abs(got_onnx - want).max() < 1e-4
        if client.model.head is not None:
            assert (deployed[0].argmax(1) == reference[0].argmax(1)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_int8_agrees_and_quantises_only_what_it_should(exported, kind: str) -> None:
    # Prepare
    _, folder = exported[kind]
    manifest = manifest_of(folder)
    data = client_test_split(kind, {"seed": 0, "max_test": 200})
    for modality, entry in manifest["graphs"].items():
        q = entry["int8"]
        # Assert: the stored report ...
        assert q["eval_samples"] == min(200, len(data))  # the multimodal test split has 190 pairs
        assert q["fp32_backbones"] == [b for b in entry["backbones"] if b == "efficientnet_lite0"]
        assert q["int8_backbones"] == [b for b in entry["backbones"] if b == "minilm"]
        assert q["per_channel"] == ("minilm" in entry["backbones"])
        if "efficientnet_lite0" in entry["backbones"]:  # the backbone's 13.5 MB stay fp32
            assert 0.5 < q["size_ratio"] < 1.0 and q["mean_cosine"] > 0.999
        else:  # the weights are the bytes, and they shrink to a quarter
            assert q["size_ratio"] < 0.3
        # ... and the graph itself loads and agrees with fp32 as reported.
        inputs = sample_inputs(data, modality, 200)
        fp32 = OnnxModel(folder).run(modality, *inputs)
        int8 = OnnxModel(folder, precision="int8").run(modality, *inputs)
        cosine = float(np.mean(np.sum(fp32["feature"] * int8["feature"], axis=1)))
        if "probs" in fp32:
            agreement = float((fp32["probs"].argmax(1) == int8["probs"].argmax(1)).mean())
            assert agreement == pytest.approx(q["top1_agreement"])
            assert agreement >= 0.9
            assert abs(q["top1_delta"]) <= 5.0
        else:
            assert cosine == pytest.approx(q["mean_cosine"], abs=1e-5)
        assert q["mean_cosine"] >= 0.98


def test_parity_failure_is_loud_and_writes_nothing(exported, tmp_path: Path) -> None:
    state, _ = exported["text"]
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_client(state, out, ExportOptions(parity_samples=8, eval_samples=8, atol=0.0, quantize=False))
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no staging folder left behind


def test_graph_that_departs_from_the_training_path_is_not_exported(exported, tmp_path: Path) -> None:
    # The backbone in the graph vs its features in the cache: ~1e-6 apart, not 0.
    state, _ = exported["image"]
    with pytest.raises(ExportError, match="differs from what training and evaluation compute"):
        export_client(state, tmp_path / "model", ExportOptions(parity_samples=8, eval_samples=8, training_atol=0.0,
                                                               quantize=False))
    assert not list(tmp_path.iterdir())


def test_missing_state_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no client state"):
        export_client(tmp_path, tmp_path / "out")


def test_state_of_an_architecture_this_zoo_lacks_is_a_clear_error(exported, tmp_path: Path) -> None:
    # Prepare: a text client whose encoder is the removed full MiniLM tower
    state, _ = exported["text"]
    tensors, meta = load_checkpoint(state / "client_state.safetensors")
    save_checkpoint(tmp_path / "old" / "client_state.safetensors", tensors, dict(meta, text_arch="minilm"))

    # Execute / Assert
    with pytest.raises(ExportError, match="does not load into this build's model zoo"):
        export_client(tmp_path / "old", tmp_path / "out")


def server_checkpoint(run: Path, archs: dict[str, str], fmt: int = CHECKPOINT_FORMAT) -> dict[str, torch.nn.Module]:
    """A server checkpoint after round 4 as cloud_server writes it (GlobalModel state under "model"), its
    format rewritten to `fmt`; returns the towers."""
    torch.manual_seed(0)
    config = ServerConfig(image_arch=archs["image"], text_arch=archs["text"], feature_dim=32)
    model = GlobalModel(config.image_arch, config.text_arch, config.feature_dim, config.contrastive_loss).eval()
    save_server_checkpoint(run, {"model": model.state_dict(), "optimizer": {}, "distill_optimizer": {}}, 4, config, "r1")
    if fmt != CHECKPOINT_FORMAT:
        tensors, meta = load_checkpoint(run / CHECKPOINT_FILE)
        save_checkpoint(run / CHECKPOINT_FILE, tensors, dict(meta, format=fmt))
    return dict(model.encoders)


def test_server_towers_export_with_their_backbones_as_a_retrieval_model(tmp_path: Path) -> None:
    # Prepare: the server's default image tower (an adapter over EfficientNet-Lite0) and a GRU
    from fedafd.runtime.data.modal import load_public_data

    encoders = server_checkpoint(tmp_path / "run", {"image": "effnet_linear", "text": "gru"})

    # Execute
    manifest = export_server(tmp_path / "run", tmp_path / "server_model", ExportOptions(parity_samples=16, eval_samples=64))

    # Assert: raw pictures in, the tower's feature on the cached backbone features out
    assert manifest["kind"] == "server" and manifest["round"] == 4
    assert manifest["graphs"]["image"]["backbones"] == ["efficientnet_lite0"] and manifest["graphs"]["text"]["backbones"] == []
    public = load_public_data("test", ("efficientnet_lite0",))
    rows = np.arange(5)
    with torch.no_grad():
        reference = encoders["image"](*public.batch("image", rows, torch.device("cpu"), "efficientnet_lite0")).numpy()
    feature = OnnxModel(tmp_path / "server_model").run("image", sample_inputs(public, "image", 5)[0])["feature"]
    assert np.abs(feature - reference).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(feature, axis=1), 1.0, atol=1e-5)
    assert max(manifest["graphs"]["image"]["parity"]["vs_training"]["max_abs_diff"].values()) < 1e-4
    assert manifest["graphs"]["text"]["int8"]["mean_cosine"] > 0.98


def test_old_server_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    server_checkpoint(tmp_path / "run", {"image": "cnn_small", "text": "gru"}, fmt=1)
    with pytest.raises(ExportError, match="checkpoint format 1"):
        export_server(tmp_path / "run", tmp_path / "out")


def test_old_torch_save_files_are_refused_with_the_command_that_converts_them(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "client_state.pt").write_bytes(b"old")
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "server.pt").write_bytes(b"old")

    with pytest.raises(ExportError, match="fedafd-edge convert-state"):
        export_any(tmp_path / "state", tmp_path / "out")
    for source in (tmp_path / "run", tmp_path / "run" / "checkpoint" / "server.pt"):
        with pytest.raises(ExportError, match="fedafd-cloud convert-checkpoint"):
            export_any(source, tmp_path / "out")


def test_dynamo_exporter_gives_the_same_graph_and_finds_the_backbone(exported, tmp_path: Path) -> None:
    # Prepare: the image classifier, whose tower reads EfficientNet-Lite0
    state, folder = exported["image"]

    # Execute
    manifest = export_client(state, tmp_path / "model", ExportOptions(parity_samples=8, eval_samples=16, exporter="dynamo"))

    # Assert: the same outputs as the TorchScript graph, and the quantiser still left the backbone in fp32
    inputs = sample_inputs(client_test_split("image", {"seed": 0, "max_test": 200}), "image", 8)
    dynamo, torchscript = OnnxModel(tmp_path / "model").run("image", *inputs), OnnxModel(folder).run("image", *inputs)
    assert np.abs(dynamo["probs"] - torchscript["probs"]).max() < 1e-4
    assert manifest["graphs"]["image"]["int8"]["fp32_backbones"] == ["efficientnet_lite0"]
    assert manifest["graphs"]["image"]["int8"]["kept_fp32"]  # the colour stem of cnn_small and the head


def test_export_json_on_stdout_is_the_manifest_and_progress_goes_to_stderr(text_state: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedafd.export.cli import fedafd_edge as app

    # Execute
    result = CliRunner().invoke(app, ["export", str(text_state), "--out", str(tmp_path / "model"), "--format", "json",
                                      "--no-quantize", "--parity-samples", "8", "--eval-samples", "16"])
    # Assert: stdout parses as JSON and is the manifest written; the progress lines went to stderr.
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == manifest_of(tmp_path / "model")
    assert "exporting text-0" in result.stderr and "parity text.onnx" in result.stderr
