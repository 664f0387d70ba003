"""Differentially private devices: DP-SGD through Opacus on the production training loop (train_round with
FedAFD's objective), its accounting against Opacus's own accountant, the clipping a silent fallback to plain
Adam would lose, public passes that spend nothing, and the upload noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn

from fedafd.edge_client.model import LocalModel, saved_model_options
from fedafd.edge_client.objectives.fedafd import FedAfdObjective
from fedafd.edge_client.privacy import (
    PrivacyBudget, PrivateSteps, noisy_upload, sample_rate, steps_per_epoch,
)
from fedafd.edge_client.training import DeviceRound, Optimizers, train_round, train_step
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.methods import MethodSettings

D = 16
WIDTH = 1280  # EfficientNet-Lite0's pooled width, which the effnet adapters read
CPU = torch.device("cpu")


def _image_data(rows: int, seed: int) -> ModalData:
    rng = np.random.default_rng(seed)
    return ModalData(inputs={"image": (rng.integers(0, 256, (rows, 3, 32, 32), dtype=np.uint8),)},
                     labels=np.arange(rows) % 3, class_names=("a", "b", "c"),
                     features={"efficientnet_lite0": rng.normal(size=(rows, WIDTH)).astype(np.float32)})


def _round(settings: MethodSettings, private: ModalData, public: ModalData | None = None, epochs: int = 1,
           batch_size: int = 8) -> DeviceRound:
    torch.manual_seed(0)
    model = LocalModel("image", "effnet_linear", "minilm_linear", D, num_classes=3, adapter_dropout=0.0,
                       head="cosine", fusion_norm="layer")
    G = {}
    if public is not None:
        gen = torch.Generator().manual_seed(1)
        G = {m: nn.functional.normalize(torch.randn(len(public), D, generator=gen), dim=-1) for m in ("image", "text")}
    return DeviceRound(round=0, local_epochs=epochs, settings=settings, model=model,
                       optimizers=Optimizers.create(model, 1e-3, 1e-4), private=private, batch_size=batch_size,
                       generator=torch.Generator().manual_seed(2), device=CPU, public=public,
                       public_rows=None if public is None else torch.arange(len(public)), G=G)


def _private_steps(r: DeviceRound, noise: float, clip: float, epsilon: float = 100.0) -> PrivateSteps:
    budget = PrivacyBudget(epsilon, 1e-5, noise, clip)
    return PrivateSteps(r.model.private_modules(fuses=False), budget, len(r.private), r.batch_size, 1e-3, seed=7)


def test_sampling_rate_and_steps_follow_opacus_poisson_loader() -> None:
    # 100 rows in batches of 64: 2 steps an epoch, each row in each batch with probability 1/2.
    assert (steps_per_epoch(100, 64), sample_rate(100, 64)) == (2, 0.5)
    assert (steps_per_epoch(1000, 64), sample_rate(1000, 64)) == (16, 1 / 16)


def test_a_round_spends_what_opacus_accountant_says_for_the_same_steps_rate_and_noise() -> None:
    # Prepare: 40 private rows in batches of 8 (5 steps an epoch, q = 1/5), 3 epochs, sigma 1.1.
    r = _round(MethodSettings("local", uplink=False), _image_data(40, seed=0), epochs=3)
    r.privacy = _private_steps(r, noise=1.1, clip=1.0)
    # Execute
    train_round(FedAfdObjective(r))
    r.privacy.close()
    # Assert: 15 steps at (1.1, 0.2), and the same epsilon as Opacus's accountant stepped by hand.
    assert r.privacy.budget.history == [(1.1, 0.2, 15)]
    reference = RDPAccountant()
    for _ in range(15):
        reference.step(noise_multiplier=1.1, sample_rate=0.2)
    assert r.privacy.budget.spent() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert 1.0 < r.privacy.budget.spent() < 20.0
    # The hooks and per-sample gradients are off the model afterwards (evaluation and export see a plain model).
    assert not any(hasattr(p, "grad_sample") for p in r.model.parameters())


def test_a_dp_step_clips_each_sample_gradient_and_adds_noise() -> None:
    # Prepare: one private step over all 16 rows (batch 16, q = 1: every row in), clip C = 1e-3.
    private = _image_data(16, seed=1)
    grads = {}
    for noise in (0.0, 2.0):
        r = _round(MethodSettings("local", uplink=False), private, batch_size=16)
        r.privacy = _private_steps(r, noise=noise, clip=1e-3)
        # Execute: the production step (the task loss through the DP optimizer)
        train_step(FedAfdObjective(r), torch.arange(16), None)
        grads[noise] = torch.cat([p.grad.flatten() for p in r.model.private_modules(fuses=False).parameters()])
        r.privacy.close()
    # Assert: without noise the summed gradient is at most 16 clipped samples over the expected batch of 16,
    # i.e. norm <= C; the plain gradient of the same loss is orders of magnitude larger.
    assert grads[0.0].norm() <= 1e-3 * (1 + 1e-5)
    r = _round(MethodSettings("local", uplink=False), private, batch_size=16)
    train_step(FedAfdObjective(r), torch.arange(16), None)
    plain = torch.cat([p.grad.flatten() for p in r.model.private_modules(fuses=False).parameters()])
    assert plain.norm() > 100 * 1e-3
    # With sigma = 2: noise of std sigma * C / 16 on each of the coordinates.
    noise = grads[2.0] - grads[0.0]
    assert noise.std().item() == pytest.approx(2.0 * 1e-3 / 16, rel=0.1)


def test_a_public_adversarial_pass_spends_nothing_and_leaves_no_per_sample_gradients() -> None:
    # Prepare: FedAFD with BAA's pass schedule (public passes between private epochs), GFF off, DP on.
    settings = MethodSettings("fedafd", baa=True, beta=0.5, baa_schedule="pass", baa_batches=2)
    r = _round(settings, _image_data(24, seed=2), public=_image_data(32, seed=3), epochs=2)
    r.privacy = _private_steps(r, noise=1.0, clip=1.0)
    before = {n: p.detach().clone() for n, p in r.model.discriminators.named_parameters()}
    # Execute
    losses = train_round(FedAfdObjective(r))
    r.privacy.close()
    # Assert: the pass ran (the discriminators moved, L_D reported) and only the 2 x 3 private steps were counted.
    assert losses["disc"] > 0
    assert any(not torch.equal(before[n], p) for n, p in r.model.discriminators.named_parameters())
    assert r.privacy.budget.history == [(1.0, 1 / 3, 6)]


def test_settings_that_mix_public_rows_into_private_steps_are_refused_on_a_dp_device() -> None:
    settings = MethodSettings("fedafd", baa=True, beta=0.5, baa_schedule="paired")
    r = _round(settings, _image_data(24, seed=2), public=_image_data(32, seed=3))
    r.privacy = _private_steps(r, noise=1.0, clip=1.0)
    with pytest.raises(ValueError, match="baa_schedule=pass"):
        train_round(FedAfdObjective(r))
    assert MethodSettings("fedafd", baa=True, beta=0.5, baa_schedule="pass").dp_conflict() == ""
    assert "infiltration_weight" in MethodSettings("fedcmi", infiltration_weight=1.0).dp_conflict()


def test_the_budget_refuses_steps_that_would_pass_epsilon() -> None:
    budget = PrivacyBudget(epsilon=5.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0)
    steps = 0
    while budget.affords(steps + 1, 0.1):
        steps += 1
    assert steps > 10
    budget.record(steps, 0.1)
    assert budget.spent() <= 5.0 < budget.epsilon_after(1, 0.1)
    assert not budget.affords(1, 0.1)


def test_upload_noise_clips_each_row_then_adds_noise_of_the_given_std() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(400, 64) * 3  # norms around 24
    clipped = noisy_upload({"image": rows}, clip=1.0, std=0.0, generator=gen)["image"]
    assert torch.allclose(clipped.norm(dim=1), torch.ones(400), atol=1e-5)
    assert torch.allclose(clipped, rows / rows.norm(dim=1, keepdim=True), atol=1e-6)
    small = rows / 100  # norms around 0.24: under the bound, unchanged
    assert torch.allclose(noisy_upload({"t": small}, 1.0, 0.0, gen)["t"], small)
    noisy = noisy_upload({"image": rows}, clip=1.0, std=0.2, generator=gen)["image"]
    assert (noisy - clipped).std().item() == pytest.approx(0.2, rel=0.03)


def test_a_saved_dp_model_says_it_fuses_with_layer_norm() -> None:
    for norm, head in (("layer", "cosine"), ("batch", "linear")):
        model = LocalModel("image", "effnet_linear", "minilm_linear", D, 3, head=head, fusion_norm=norm)
        assert saved_model_options(model.state_dict()) == {"head": head, "fusion_norm": norm}
    assert math.isfinite(sample_rate(1, 64))
