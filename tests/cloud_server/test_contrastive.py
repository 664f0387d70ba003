"""Stage-1 contrastive losses against hand-computed numbers."""

import math

import pytest
import torch

from fedafd.cloud_server.contrastive import (
    InfoNceLoss,
    PcmeSoftContrastive,
    build_contrastive_loss,
)

SQRT2 = math.sqrt(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _orthonormal_pairs():
    # u_0 = t_0 = [1, 0], u_1 = t_1 = [0, 1]: matched distance 0, unmatched distance sqrt(2).
    eye = torch.eye(2)
    return eye.clone(), eye.clone()


def test_pcme_hand_value_with_a2_b1():
    # Prepare
    loss_fn = PcmeSoftContrastive()
    with torch.no_grad():
        loss_fn.a.fill_(2.0)
        loss_fn.b.fill_(1.0)
    u, t = _orthonormal_pairs()
    # Execute
    loss = loss_fn(u, t)
    # Assert
    # positives: l = -2 * 0 + 1 = 1,                   BCE(l, 1) = softplus(-1)       = 0.313262
    # negatives: l = -2 * sqrt(2) + 1 = -1.828427,     BCE(l, 0) = softplus(-1.828427) = 0.148994
    # loss = mean over positives + mean over negatives = 0.313262 + 0.148994 = 0.462256
    expected = softplus(-1.0) + softplus(1.0 - 2.0 * SQRT2)
    assert expected == pytest.approx(0.462256, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_pcme_hand_value_at_init_a15_b15():
    # Prepare
    loss_fn = PcmeSoftContrastive()
    u, t = _orthonormal_pairs()
    # Execute
    loss = loss_fn(3.0 * u, t)  # scaling does not matter: features are L2-normalised
    # Assert
    # positives: l = 15 -> softplus(-15) = 3.06e-7; negatives: l = 15 - 15 sqrt(2) = -6.2132 ->
    # softplus(-6.2132) = log(1 + 0.0020028) = 0.0020008
    expected = softplus(-15.0) + softplus(15.0 - 15.0 * SQRT2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_pcme_a_and_b_receive_gradients():
    # Prepare
    loss_fn = PcmeSoftContrastive()
    gen = torch.Generator().manual_seed(0)
    u, t = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    # Execute
    loss_fn(u, t).backward()
    # Assert
    assert loss_fn.a.grad is not None and loss_fn.a.grad.abs().item() > 0
    assert loss_fn.b.grad is not None and loss_fn.b.grad.abs().item() > 0


def test_pcme_loss_decreases_on_a_toy_batch():
    # Prepare: two linear "encoders" learning to align 8 random pairs
    torch.manual_seed(0)
    x_img, x_txt = torch.randn(8, 6), torch.randn(8, 5)
    img_enc, txt_enc = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    loss_fn = PcmeSoftContrastive()
    params = [*img_enc.parameters(), *txt_enc.parameters(), *loss_fn.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    before = loss_fn(img_enc(x_img), txt_enc(x_txt)).item()
    # Execute
    for _ in range(30):
        opt.zero_grad()
        loss_fn(img_enc(x_img), txt_enc(x_txt)).backward()
        opt.step()
    after = loss_fn(img_enc(x_img), txt_enc(x_txt)).item()
    # Assert
    assert after < 0.5 * before


def test_infonce_hand_value():
    # Prepare: scale exp(0) = 1; u_0 = [1, 0], u_1 = [0, 1]; t_0 = [0.6, 0.8], t_1 = [0, 1]
    loss_fn = InfoNceLoss()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(0.0)
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # Execute
    loss = loss_fn(u, t)
    # Assert: logits u @ t.T = [[0.6, 0], [0.8, 1]]
    # image->text rows: row 0 (target 0): log(1 + e^-0.6) = 0.437488
    #                   row 1 (target 1): log(1 + e^-0.2) = 0.598139  -> mean 0.517813
    # text->image cols: col 0 [0.6, 0.8] (target 0): log(1 + e^0.2) = 0.798139
    #                   col 1 [0, 1]     (target 1): log(1 + e^-1)  = 0.313262 -> mean 0.555700
    # loss = (0.517813 + 0.555700) / 2 = 0.536757
    assert loss.item() == pytest.approx(0.536757, abs=1e-5)


def test_infonce_init_and_clamp():
    # Prepare
    loss_fn = InfoNceLoss()
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        loss_fn.logit_scale.fill_(50.0)  # clamped to log(100) when used
    u, t = _orthonormal_pairs()
    # Execute
    loss = loss_fn(u, t)
    # Assert: logits 100 * I -> each CE = log(1 + e^-100) ~ 0
    assert loss.item() == pytest.approx(softplus(-100.0), abs=1e-7)


def test_build_contrastive_loss():
    assert isinstance(build_contrastive_loss("pcme"), PcmeSoftContrastive)
    assert isinstance(build_contrastive_loss("infonce"), InfoNceLoss)
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        build_contrastive_loss("triplet")
