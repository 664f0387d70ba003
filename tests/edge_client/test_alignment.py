"""Bi-level adversarial alignment: discriminators, losses and the discriminator step (the encoder side is
tested through the device's train_step in test_training.py)."""

import math

import pytest
import torch

from fedafd.edge_client.alignment import Discriminator, discriminator_loss, discriminator_step, generator_loss

D = 8
LOG2 = math.log(2.0)


def _constant_discriminator(logit: float) -> Discriminator:
    """A discriminator whose output layer is zeroed except its bias: every logit equals `logit`."""
    disc = Discriminator(D)
    with torch.no_grad():
        disc.last.weight.zero_()
        disc.last.bias.fill_(logit)
    return disc


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def _toy_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    global_same = torch.randn(16, D, generator=gen) + 1.0
    global_other = torch.randn(16, D, generator=gen) + 0.5
    local = torch.randn(16, D, generator=gen) - 1.0
    return local, global_same, global_other


def test_discriminator_output_shape_and_architecture():
    # Prepare
    disc = Discriminator(D)
    # Execute
    out = disc(torch.randn(5, D))
    # Assert
    assert out.shape == (5,)
    linears = [m for m in disc.modules() if isinstance(m, torch.nn.Linear)]
    widths = [(m.in_features, m.out_features) for m in linears]
    assert widths == [(D, 128), (128, 64), (64, 1)]
    slopes = [m.negative_slope for m in disc.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.2, 0.2]


def test_losses_with_zero_logits_are_log2_each():
    # Prepare: zeroed output layer -> every logit 0 -> every BCE = log 2
    d_in, d_cr = _constant_discriminator(0.0), _constant_discriminator(0.0)
    local, g_same, g_other = _toy_batch()
    # Execute
    l_d = discriminator_loss(d_in, d_cr, local, g_same, g_other, beta=0.5)
    l_g = generator_loss(d_in, d_cr, local, beta=0.5)
    # Assert: L_D = 0.5 * 4 * log 2 = 1.386294; L_G = 0.5 * 2 * log 2 = 0.693147
    assert l_d.item() == pytest.approx(0.5 * 4 * LOG2, abs=1e-6)
    assert l_g.item() == pytest.approx(0.5 * 2 * LOG2, abs=1e-6)


def test_losses_sign_with_constant_logit_log3():
    # Prepare: every logit = log 3, i.e. D says "real" with probability 0.75
    d_in, d_cr = _constant_discriminator(math.log(3.0)), _constant_discriminator(math.log(3.0))
    local, g_same, g_other = _toy_batch()
    # Execute
    l_d = discriminator_loss(d_in, d_cr, local, g_same, g_other, beta=0.5)
    l_g = generator_loss(d_in, d_cr, local, beta=0.5)
    # Assert
    # BCE(real, 1) = -log 0.75 = log(4/3) = 0.287682; BCE(fake, 0) = -log 0.25 = log 4 = 1.386294
    # L_D = 0.5 * 2 * (log(4/3) + log 4) = log(16/3) = 1.673976
    # L_G = 0.5 * 2 * log(4/3) = 0.287682 (the encoder is rewarded when D calls it real)
    assert l_d.item() == pytest.approx(math.log(16 / 3), abs=1e-6)
    assert l_g.item() == pytest.approx(math.log(4 / 3), abs=1e-6)


def test_discriminator_loss_does_not_reach_the_local_feature():
    # Prepare
    d_in, d_cr = Discriminator(D), Discriminator(D)
    local, g_same, g_other = _toy_batch()
    local.requires_grad_(True)
    # Execute
    discriminator_loss(d_in, d_cr, local, g_same, g_other, beta=0.5).backward()
    # Assert
    assert local.grad is None
    assert all(p.grad is not None for p in [*d_in.parameters(), *d_cr.parameters()])


def test_training_only_discriminators_lowers_discriminator_loss():
    # Prepare
    torch.manual_seed(0)
    d_in, d_cr = Discriminator(D), Discriminator(D)
    local, g_same, g_other = _toy_batch()
    opt = torch.optim.Adam([*d_in.parameters(), *d_cr.parameters()], lr=1e-2)
    before = discriminator_loss(d_in, d_cr, local, g_same, g_other, 0.5).item()
    # Execute
    for _ in range(20):
        discriminator_step(d_in, d_cr, opt, {"image": local}, {"image": g_same, "text": g_other}, 0.5)
    after = discriminator_loss(d_in, d_cr, local, g_same, g_other, 0.5).item()
    # Assert
    assert after < 0.5 * before


def test_discriminator_step_leaves_encoder_gradients_untouched():
    # Prepare
    torch.manual_seed(0)
    d_in, d_cr = Discriminator(D), Discriminator(D)
    encoder = torch.nn.Linear(D, D)
    _, g_same, g_other = _toy_batch()
    d_opt = torch.optim.SGD([*d_in.parameters(), *d_cr.parameters()], lr=0.1)
    enc_0 = _snapshot(encoder)
    # Execute
    discriminator_step(d_in, d_cr, d_opt, {"text": encoder(torch.randn(4, D))}, {"text": g_same[:4], "image": g_other[:4]},
                       0.5)
    # Assert
    assert all(p.grad is None for p in encoder.parameters())
    assert not _changed(enc_0, encoder)


def test_discriminator_step_sums_both_modalities_of_a_multimodal_device_and_smooths_real_labels():
    # Prepare: constant logit 0 everywhere, so every BCE is log 2 whatever the target (at target t the
    # BCE of logit 0 is log 2 too); then logit 0 again with real target 0.9 -- still log 2 per term.
    d_in, d_cr = _constant_discriminator(0.0), _constant_discriminator(0.0)
    local, g_same, g_other = _toy_batch()
    opt = torch.optim.SGD([*d_in.parameters(), *d_cr.parameters()], lr=0.0)
    # Execute
    one = discriminator_step(d_in, d_cr, opt, {"image": local}, {"image": g_same, "text": g_other}, 0.5)
    two = discriminator_step(d_in, d_cr, opt, {"image": local, "text": local}, {"image": g_same, "text": g_other}, 0.5)
    # Assert: 4 BCE terms of log 2 times beta per modality
    assert one == pytest.approx(0.5 * 4 * LOG2, rel=1e-6)
    assert two == pytest.approx(2 * one, rel=1e-6)
    # Label smoothing: with logit L for reals, BCE(L, 0.9) = softplus(L) - 0.9 L; at L = 2 it is below BCE(L, 1).
    real = _constant_discriminator(2.0)
    smooth = discriminator_loss(real, real, local, g_same, g_other, 1.0, real_label=0.9)
    plain = discriminator_loss(real, real, local, g_same, g_other, 1.0)
    softplus = math.log1p(math.exp(2.0))
    assert float(plain.detach()) == pytest.approx(2 * (softplus - 2.0) + 2 * softplus, rel=1e-5)
    assert float(smooth.detach()) == pytest.approx(2 * (softplus - 1.8) + 2 * softplus, rel=1e-5)
