"""The cosine head's logits and learnable scale, and BAA's adversarial pass over the public pairs (one
discriminator step and one encoder step per public batch, then the private pass), against hand-computed
numbers and counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedafd.edge_client.model import CosineClassifier, GlobalTowers, LocalModel, build_head
from fedafd.edge_client.objectives import objective_for
from fedafd.edge_client.training import Optimizers, prepare_round, train_round
from fedafd.runtime.config import ClientConfig
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.methods import MethodSettings

D = 4
CPU = torch.device("cpu")


def _data(rows: int, seed: int) -> ModalData:
    rng = np.random.default_rng(seed)
    return ModalData(inputs={"image": (rng.integers(0, 256, (rows, 3, 32, 32), dtype=np.uint8),)},
                     labels=np.arange(rows) % 3, class_names=("a", "b", "c"),
                     features={"efficientnet_lite0": rng.normal(size=(rows, 1280)).astype(np.float32)})


def test_cosine_head_logits_are_the_scale_times_the_cosines_by_hand() -> None:
    # Prepare: class directions w_0 = [2, 0, 0, 0] (norm 2: only its direction counts), w_1 = [0, 1, 0, 0],
    # w_2 = [1, 1, 0, 0]; z = [3, 4, 0, 0] (norm 5: only its direction counts); scale 16.
    head = CosineClassifier(D, 3, scale=16.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0]]))
    z = torch.tensor([[3.0, 4.0, 0.0, 0.0]])
    # Execute
    logits = head(z)
    # Assert: cosines 3/5, 4/5, 7/(5 sqrt 2); times 16. A plain linear layer (the paper's head) would give
    # [6, 4, 7] here, and the same layer without the scale would give logits in [-1, 1].
    expected = 16.0 * torch.tensor([[0.6, 0.8, 7.0 / (5.0 * math.sqrt(2.0))]])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_the_cosine_heads_scale_learns_and_is_capped() -> None:
    # Prepare: one sample of class 0 whose feature points exactly at w_0: the cross-entropy falls as s grows.
    head = CosineClassifier(2, 2, scale=2.0)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    # Execute
    loss = nn.functional.cross_entropy(head(torch.tensor([[1.0, 0.0]])), torch.tensor([0]))
    loss.backward()
    # Assert: logits [s, 0]; loss = log(1 + e^-s); d/dlog s = s * d/ds = -s e^-s / (1 + e^-s).
    s = 2.0
    assert float(head.log_scale.grad) == pytest.approx(-s * math.exp(-s) / (1 + math.exp(-s)), rel=1e-4)
    with torch.no_grad():
        head.log_scale.fill_(math.log(1e4))
    assert float(head(torch.tensor([[1.0, 0.0]]))[0, 0].detach()) == pytest.approx(100.0, rel=1e-5)  # capped at 100


def test_the_device_builds_the_configured_head() -> None:
    # The default device config builds the cosine head at scale 16; head=linear gives the paper's nn.Linear.
    config = ClientConfig()
    assert (config.head, config.head_scale) == ("cosine", 16.0)
    model = LocalModel("image", "effnet_linear", "minilm_linear", D, 3, head=config.head, head_scale=config.head_scale)
    assert isinstance(model.head, CosineClassifier)
    assert float(model.head.log_scale.detach().exp()) == pytest.approx(16.0)
    assert type(build_head("linear", D, 3)) is nn.Linear
    assert LocalModel("multimodal", "effnet_linear", "minilm_linear", D, 1, head="cosine").head is None


def _round(schedule: str, baa_batches: int = 0, disc_steps: int = 1, epochs: int = 2):
    """One round of BAA on an adapter device: 12 private rows, 24 public pairs, batch 8."""
    torch.manual_seed(0)
    model = LocalModel("image", "effnet_linear", "minilm_linear", D, 3, adapter_dropout=0.0, head="cosine")
    optimizers = Optimizers.create(model, lr=1e-3, disc_lr=1e-3)
    public = _data(24, seed=1)
    gen = torch.Generator().manual_seed(2)
    g = {m: nn.functional.normalize(torch.randn(24, D, generator=gen), dim=-1) for m in ("image", "text")}
    settings = MethodSettings("fedafd", baa=True, beta=0.5, baa_schedule=schedule, baa_batches=baa_batches,
                              disc_steps=disc_steps)
    losses = train_round(objective_for(prepare_round(model, optimizers, GlobalTowers(D, CPU), _data(12, seed=0), settings,
                                                     0, epochs, 8, 0, CPU, public, torch.arange(24), g)))
    return model, optimizers, losses


def _steps(optimizer: torch.optim.Optimizer, parameter: nn.Parameter) -> int:
    return int(optimizer.state[parameter]["step"]) if parameter in optimizer.state else 0


@pytest.mark.parametrize("baa_batches, disc_steps, public_steps", [(0, 1, 3), (1, 1, 1), (0, 2, 3)])
def test_the_adversarial_pass_steps_d_and_the_encoder_once_per_public_batch(baa_batches, disc_steps,
                                                                           public_steps) -> None:
    # Execute: 2 epochs; the public set is 24 pairs in batches of 8 (3 batches; baa_batches=1 caps it at 1),
    # the private set 12 rows in batches of 8 (2 steps: 8 and 4 rows).
    model, optimizers, losses = _round("pass", baa_batches, disc_steps)
    # Assert: D steps disc_steps times per public batch; the encoder steps once per public batch (L_G) and
    # once per private batch (L_task); the head only on the private batches. Without the pass, the encoder's
    # count would equal the head's.
    d_param = next(model.discriminators.parameters())
    encoder_param = next(model.encoders["image"].parameters())
    assert _steps(optimizers.discriminator, d_param) == 2 * public_steps * disc_steps
    assert _steps(optimizers.task, encoder_param) == 2 * (public_steps + 2)
    assert _steps(optimizers.task, model.head.weight) == 2 * 2
    assert losses["disc"] > 0 and losses["adv_gen"] > 0


def test_the_paired_schedule_pairs_one_public_batch_with_each_private_step() -> None:
    # The earlier schedule, still reachable: one D step per private step (2 per epoch), no separate pass.
    model, optimizers, _ = _round("paired")
    d_param = next(model.discriminators.parameters())
    assert _steps(optimizers.discriminator, d_param) == 2 * 2
    assert _steps(optimizers.task, next(model.encoders["image"].parameters())) == 2 * 2
