"""Export of every client kind and of the server's towers: checker, parity with PyTorch, manifest, int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedafd.export.infer import MANIFEST_FILE, OnnxModel, file_sha256
from fedafd.export.onnx_export import (ExportError, ExportOptions, export_client, export_server, load_client,
                                       sample_inputs, client_test_split)
from fedafd.runtime.models import build_image_encoder, build_text_encoder
from fedafd.runtime.torch_utils import save_checkpoint

KINDS = ("image", "text", "multimodal")


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_is_complete_and_files_match(exported, kind: str) -> None:
    # Prepare
    _, folder = exported[kind]

    # Execute
    manifest = json.loads((folder / MANIFEST_FILE).read_text())

    # Assert
    for key in ("format", "kind", "client_id", "round", "model_version", "feature_dim", "archs", "tower_archs",
                "fusion", "opset", "labels", "preprocessing", "graphs", "towers"):
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
    for entry in list(manifest["graphs"].values()) + list(manifest["towers"].values()):
        path = folder / entry["file"]
        assert file_sha256(path) == entry["sha256"]
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        assert entry["inputs"][0]["shape"][0] == "batch"
        assert entry["parity"]["samples"] == 32


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_pytorch_is_recorded_and_tight(exported, kind: str) -> None:
    _, folder = exported[kind]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for entry in list(manifest["graphs"].values()) + list(manifest["towers"].values()):
        parity = entry["parity"]
        assert max(parity["max_abs_diff"].values()) <= 1e-4
        assert max(parity["max_abs_diff_batch1"].values()) <= 1e-4
        assert parity["top1_agreement"] >= 0.95


@pytest.mark.parametrize("kind", ("image", "text"))
def test_onnx_matches_the_training_code_path(exported, kind: str) -> None:
    """Independent of the export wrappers: LocalModel.fuse + head as `evaluate` computes them."""
    # Prepare
    state, folder = exported[kind]
    client = load_client(state)
    data = client_test_split(kind, {"seed": 0, "max_test": 200})
    inputs = sample_inputs(data, kind, 200)

    # Execute
    with torch.no_grad():
        tensors = tuple(torch.from_numpy(a) for a in inputs)
        local = client.model.encode(kind, tensors)
        fused = client.model.fuse(kind, local, client.towers.encode(kind, tensors))
        reference = torch.softmax(client.model.head(fused), dim=-1).numpy()
    probs = OnnxModel(folder).run(kind, *inputs)["probs"]

    # Assert
    assert np.abs(probs - reference).max() < 1e-4
    assert (probs.argmax(1) == reference.argmax(1)).mean() == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_int8_is_smaller_and_agrees(exported, kind: str) -> None:
    # Prepare
    _, folder = exported[kind]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for modality, entry in manifest["graphs"].items():
        q = entry["int8"]
        # Assert: the stored report, and the graph itself loads and agrees with fp32.
        assert q["size_bytes"] < 0.35 * entry["size_bytes"]
        data = client_test_split(kind, {"seed": 0, "max_test": 200})
        assert q["eval_samples"] == min(200, len(data))  # the multimodal test split has 190 pairs
        inputs = sample_inputs(data, modality, 200)
        fp32 = OnnxModel(folder).run(modality, *inputs)
        int8 = OnnxModel(folder, precision="int8").run(modality, *inputs)
        if "probs" in fp32:
            agreement = float((fp32["probs"].argmax(1) == int8["probs"].argmax(1)).mean())
            assert agreement == pytest.approx(q["top1_agreement"])
            assert agreement >= 0.9
            assert abs(q["top1_delta"]) <= 5.0
        else:
            cosine = float(np.mean(np.sum(fp32["feature"] * int8["feature"], axis=1)))
            assert cosine >= 0.98


def test_parity_failure_is_loud_and_writes_nothing(exported, tmp_path: Path) -> None:
    state, _ = exported["image"]
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_client(state, out, ExportOptions(parity_samples=8, eval_samples=8, atol=0.0, quantize=False))
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no staging folder left behind


def test_missing_state_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no client state"):
        export_client(tmp_path, tmp_path / "out")


def test_server_towers_export_as_a_retrieval_model(tmp_path: Path) -> None:
    # Prepare: a server checkpoint as cloud_server writes it (GlobalModel state under "model").
    torch.manual_seed(0)
    encoders = {"image": build_image_encoder("cnn_small", 32), "text": build_text_encoder("gru", 32)}
    state = {f"encoders.{m}.{k}": v for m, enc in encoders.items() for k, v in enc.state_dict().items()}
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint" / "server.pt", {"model": state, "optimizer": {}},
                    {"round": 4, "format": 1, "config": {"image_arch": "cnn_small", "text_arch": "gru", "feature_dim": 32}})

    # Execute
    manifest = export_server(run, tmp_path / "server_model", ExportOptions(parity_samples=16, eval_samples=64))

    # Assert
    assert manifest["kind"] == "server" and manifest["round"] == 4
    model = OnnxModel(tmp_path / "server_model")
    images = sample_inputs(public_test_split(), "image", 5)[0]
    with torch.no_grad():
        reference = encoders["image"].eval()(torch.from_numpy(images)).numpy()
    assert np.abs(model.run("image", images)["feature"] - reference).max() < 1e-4
    assert manifest["graphs"]["text"]["int8"]["mean_cosine"] > 0.98


def public_test_split():
    from fedafd.runtime.data.modal import load_public_data

    return load_public_data("test")
