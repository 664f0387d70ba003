"""The model zoo: every encoder ends in an L2-normalised (B, d) feature, towers survive a state-dict trip,
padding is ignored where attention masks it, and adapters read their backbone's cached features (the
backbones themselves are tested in test_backbones.py)."""

from __future__ import annotations

import pytest
import torch

from fedafd.runtime.data.text import tokenize
from fedafd.runtime.data.modal import RAW
from fedafd.runtime.backbones import modality_backbones
from fedafd.runtime.models import (
    ADAPTERS, IMAGE_ARCHS, TEXT_ARCHS, backbone_of, build_encoder, count_parameters, encode_rows, input_view,
)


def build_image_encoder(arch: str, d: int) -> torch.nn.Module:
    return build_encoder("image", arch, d)


def build_text_encoder(arch: str, d: int) -> torch.nn.Module:
    return build_encoder("text", arch, d)

SMALL_IMAGE = ("cnn_small", "resnet_tiny")
SMALL_TEXT = ("gru", "transformer_tiny")


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokenize(["a red dress", "a dog barking at the mailman", "sneaker"])
    return torch.from_numpy(ids), torch.from_numpy(mask)


@pytest.mark.parametrize("arch", SMALL_IMAGE)
def test_image_encoders_give_unit_features_and_learn(arch: str) -> None:
    # Prepare
    torch.manual_seed(0)
    encoder = build_image_encoder(arch, 24)
    images = torch.rand(5, 3, 32, 32)
    # Execute
    features = encoder(images)
    features[:, 0].sum().backward()
    # Assert
    assert features.shape == (5, 24)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    assert all(p.grad is not None for p in encoder.parameters())


@pytest.mark.parametrize("arch", SMALL_TEXT)
def test_text_encoders_give_unit_features(arch: str) -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder(arch, 24).eval()
    features = encoder(*text_batch())
    assert features.shape == (3, 24)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    # Different texts, different features.
    assert (features[0] - features[1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", SMALL_IMAGE + SMALL_TEXT)
def test_a_tower_sent_as_its_state_dict_computes_the_same_features(arch: str) -> None:
    # Prepare: the server's encoder, and a client's fresh one of the same architecture.
    build = build_image_encoder if arch in IMAGE_ARCHS else build_text_encoder
    torch.manual_seed(1)
    server = build(arch, 16).eval()
    torch.manual_seed(2)
    client = build(arch, 16).eval()
    inputs = (torch.rand(4, 3, 32, 32),) if arch in IMAGE_ARCHS else text_batch()
    assert not torch.allclose(server(*inputs), client(*inputs))
    # Execute
    client.load_state_dict(server.state_dict(), strict=True)
    # Assert
    torch.testing.assert_close(client(*inputs), server(*inputs))


def test_transformer_ignores_what_stands_in_the_padding() -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder("transformer_tiny", 16).eval()
    ids, mask = text_batch()
    scrambled = ids.clone()
    scrambled[mask == 0] = 1234  # any token where the mask is 0
    torch.testing.assert_close(encoder(scrambled, mask), encoder(ids, mask))


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="cnn_small.*effnet_linear"):
        build_image_encoder("vgg", 8)
    with pytest.raises(ValueError, match="transformer_tiny.*minilm_mlp"):
        build_text_encoder("lstm", 8)


def test_count_parameters_by_hand() -> None:
    assert count_parameters(torch.nn.Linear(3, 2)) == 3 * 2 + 2


@pytest.mark.parametrize("arch,width", [("effnet_linear", 1280), ("effnet_mlp", 1280), ("minilm_linear", 384),
                                        ("minilm_mlp", 384)])
def test_adapters_read_backbone_features_drop_out_only_in_training_and_are_small(arch: str, width: int) -> None:
    # Prepare
    modality = "image" if arch in IMAGE_ARCHS else "text"
    torch.manual_seed(0)
    adapter = build_encoder(modality, arch, 32, dropout=0.5)
    features = torch.randn(6, width)
    # Execute
    train_a, train_b = adapter.train()(features), adapter(features)
    eval_a, eval_b = adapter.eval()(features), adapter(features)
    # Assert: unit features; dropout only in train mode; the backbone is not inside (it never travels).
    assert eval_a.shape == (6, 32)
    torch.testing.assert_close(eval_a.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(eval_a, eval_b)
    assert not torch.allclose(train_a, train_b)
    assert input_view(adapter) == backbone_of(arch) == ADAPTERS[arch][0]
    hidden = 512 if arch.endswith("_mlp") else 0
    expected = width * 32 + 32 if not hidden else width * hidden + hidden + hidden * 32 + 32
    assert count_parameters(adapter) == expected


def test_small_nets_read_raw_inputs_and_backbones_follow_the_modalities() -> None:
    assert all(input_view(build_encoder(m, a, 8)) == RAW for m, a in (("image", "cnn_small"), ("text", "gru")))
    assert backbone_of("cnn_small") is None
    assert set(IMAGE_ARCHS) >= {"effnet_linear", "cnn_small"} and set(TEXT_ARCHS) >= {"minilm_linear", "gru"}
    assert modality_backbones(("image",)) == ("efficientnet_lite0",)
    assert modality_backbones(("image", "text")) == ("efficientnet_lite0", "minilm")


def test_encode_rows_feeds_adapters_cached_features_and_small_nets_raw_inputs() -> None:
    import numpy as np

    from fedafd.runtime.data.modal import ModalData

    # Prepare: rows whose cached "backbone features" are known, and their pixels.
    rng = np.random.default_rng(0)
    data = ModalData(inputs={"image": (rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8),)},
                     features={"efficientnet_lite0": rng.normal(size=(4, 1280)).astype(np.float32)})
    adapter, small = build_image_encoder("effnet_linear", 8).eval(), build_image_encoder("cnn_small", 8).eval()
    rows = np.array([2, 0])
    # Execute / Assert
    torch.testing.assert_close(encode_rows(adapter, "image", data, rows, torch.device("cpu")),
                               adapter(torch.from_numpy(data.features["efficientnet_lite0"][rows])))
    pixels = torch.from_numpy(data.inputs["image"][0][rows]).float() / 255.0
    torch.testing.assert_close(encode_rows(small, "image", data, rows, torch.device("cpu")), small(pixels))
