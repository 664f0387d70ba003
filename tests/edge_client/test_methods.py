"""The baselines' device losses (docs/strategies.md) by hand, through the production functions their objectives
(edge_client/objectives) call: CreamFL's regularisers, FedCMI's infiltration distillation and class-wise
temperatures, and the digest pass of FedMD, FedGEMS and FedET."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.objectives import objective_for
from fedafd.edge_client.objectives.creamfl import creamfl_regularisers
from fedafd.edge_client.objectives.fedcmi import class_temperatures, infiltration_loss
from fedafd.edge_client.training import Optimizers, prepare_round, public_pass, train_round, uplink_features
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.losses import distillation_loss
from fedafd.runtime.methods import MethodSettings

D = 4
CPU = torch.device("cpu")


def _data(rows: int, seed: int) -> ModalData:
    rng = np.random.default_rng(seed)
    return ModalData(inputs={"image": (rng.integers(0, 256, (rows, 3, 32, 32), dtype=np.uint8),)},
                     labels=np.arange(rows) % 3, class_names=("a", "b", "c"),
                     features={"efficientnet_lite0": rng.normal(size=(rows, 1280)).astype(np.float32)})


def _model() -> LocalModel:
    torch.manual_seed(0)
    return LocalModel("image", "effnet_linear", "minilm_linear", D, num_classes=3, adapter_dropout=0.0)


def test_creamfl_regularisers_by_hand() -> None:
    # Prepare: one public image feature e1 at position 0 of P = 2, its round-start feature e2, tau = 0.5.
    local, old = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    g = {"image": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "text": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    # Execute
    loss = creamfl_regularisers(local, old, torch.tensor([0]), "image", g, temperature=0.5)
    # Assert: inter: CE over P of [<e1, t0>, <e1, t1>] / 0.5 = [2, 0] -> log(1 + e^-2);
    # intra (MOON): [<e1, g0>, <e1, old>] / 0.5 = [2, 0] -> log(1 + e^-2) again.
    assert float(loss) == pytest.approx(2 * math.log(1 + math.exp(-2)), abs=1e-6)
    # The inter term reads the OTHER modality: swap the text features and only it changes.
    swapped = {"image": g["image"], "text": g["text"].flip(0)}
    assert float(creamfl_regularisers(local, old, torch.tensor([0]), "image", swapped, 0.5)) == pytest.approx(
        math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)), abs=1e-6)


def test_infiltration_loss_uses_the_temperature_of_the_class_the_head_gives() -> None:
    # Prepare: identity projector; the head gives class 1 to e1; dominant global features e1, e2 (P = 2).
    model = _model()
    with torch.no_grad():
        model.infiltration.weight.copy_(torch.eye(D))
        model.infiltration.bias.zero_()
        model.head.weight.zero_()
        model.head.weight[1, 0] = 1.0
        model.head.bias.zero_()
    local = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    dominant = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    # Execute
    loss = infiltration_loss(model, local, torch.tensor([0]), dominant, torch.tensor([1.0, 0.5, 1.0])).detach()
    # Assert: logits [1, 0] / T_1 = [2, 0] -> log(1 + e^-2); at T = 1 it would be log(1 + e^-1).
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_class_temperatures_sharpen_the_classes_where_the_infiltration_path_is_relatively_stronger() -> None:
    # Prepare: six private samples (labels 0, 1, 2, 0, 1, 2) with fixed local features; a projector that
    # permutes the feature's axes, so the two paths give different true-class probabilities.
    model, private = _model(), _data(6, seed=1)
    features = nn.functional.normalize(torch.tensor(
        [[1.0, 0.2, 0.0, 0.1], [0.1, 1.0, 0.3, 0.0], [0.0, 0.4, 1.0, 0.2],
         [0.9, 0.0, 0.3, 0.0], [0.5, 0.5, 0.0, 0.1], [0.2, 0.1, 0.3, 1.0]]), dim=-1)
    model.encode = lambda modality, data, rows, device: features[torch.as_tensor(rows)]
    with torch.no_grad():
        model.infiltration.weight.copy_(torch.eye(D)[[1, 0, 2, 3]])
        model.infiltration.bias.zero_()
        model.head.weight.copy_(torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]))
        model.head.bias.zero_()
    # Execute
    temperatures = class_temperatures(model, private, CPU)
    # Assert: the formula written out: r_c = mean p(y | infiltrated) / mean p(y | own) per class;
    # T_c = 1 / (1 + 2 log(r_c / mean r)) where r_c > mean r, else 1.
    labels = torch.from_numpy(private.labels)
    own = torch.softmax(features @ model.head.weight.T, 1)[torch.arange(6), labels].detach()
    infiltrated_features = nn.functional.normalize(features[:, [1, 0, 2, 3]], dim=-1)
    infiltrated = torch.softmax(infiltrated_features @ model.head.weight.T, 1)[torch.arange(6), labels].detach()
    ratio = torch.tensor([float(infiltrated[labels == c].mean() / own[labels == c].mean()) for c in range(3)])
    expected = torch.where(ratio > ratio.mean(), 1.0 / (1.0 + 2.0 * torch.log(ratio / ratio.mean())), torch.ones(3))
    torch.testing.assert_close(temperatures, expected.float())
    assert (temperatures < 1).any() and (temperatures == 1).any()


def test_the_digest_pass_regresses_the_uploaded_public_features_toward_the_targets() -> None:
    # Prepare: a public set of 8 rows, a target per row, one batch holding them all.
    model, public = _model(), _data(8, seed=2)
    rows = torch.arange(8)
    targets = nn.functional.normalize(torch.randn(8, D, generator=torch.Generator().manual_seed(3)), dim=-1)
    loss_of = lambda positions, locals_: distillation_loss(locals_["image"], targets[positions], 1.0)  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    before = distillation_loss(model.encode("image", public, rows, CPU), targets, 1.0).detach()
    # Execute: a frozen pass reports the loss; learning passes lower it.
    reported = public_pass(model, Optimizers.create(model, 0.0, 0.0), public, rows, 8, generator, CPU, loss_of)
    optimizers = Optimizers.create(model, 1e-2, 0.0)
    for _ in range(20):
        public_pass(model, optimizers, public, rows, 8, generator, CPU, loss_of)
    after = distillation_loss(model.encode("image", public, rows, CPU), targets, 1.0).detach()
    # Assert
    assert reported == pytest.approx(float(before), rel=1e-5)
    assert float(after) < 0.5 * float(before)


def test_a_creamfl_round_reports_the_regularisers_of_its_public_features_by_hand() -> None:
    # Prepare: a frozen device (learning rate 0), so the round-start features, the negatives of the
    # intra-modal term, are the features every batch sees; one batch holds the whole public set.
    model, private, public = _model(), _data(8, seed=4), _data(10, seed=5)
    rows = torch.arange(10)
    gen = torch.Generator().manual_seed(6)
    g = {m: nn.functional.normalize(torch.randn(10, D, generator=gen), dim=-1) for m in ("image", "text")}
    settings = MethodSettings("creamfl", contrast_weight=0.5, contrast_temperature=0.5)
    # Execute
    losses = train_round(objective_for(prepare_round(model, Optimizers.create(model, 0.0, 0.0), GlobalTowers(D, CPU),
                                                     private, settings, 0, 1, 16, 0, CPU, public, rows, g)))
    # Assert: 0.5 x (CE over P of <z_k, g_j^text> / 0.5 + CE of [<z_k, g_k^image>, <z_k, z_k>] / 0.5), z unit-norm.
    z = uplink_features(model, public, rows, CPU)["image"]
    inter = nn.functional.cross_entropy(z @ g["text"].T / 0.5, rows)
    pair = torch.stack([(z * g["image"]).sum(1), (z * z).sum(1)], dim=1) / 0.5
    intra = nn.functional.cross_entropy(pair, torch.zeros(10, dtype=torch.long))
    assert set(losses) == {"task", "contrast"}
    assert losses["contrast"] == pytest.approx(float(0.5 * (inter + intra)), rel=1e-5)
