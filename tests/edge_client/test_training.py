"""The device's training step: what a wrong implementation would get silently wrong. Every test runs the
production train_step (with FedAFD's objective) / task_loss / evaluate on a tiny LocalModel and tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedafd.edge_client.model import GlobalTowers, LocalModel
from fedafd.edge_client.objectives import objective_for
from fedafd.edge_client.objectives.fedafd import FedAfdObjective
from fedafd.edge_client.training import (
    DeviceRound, Optimizers, evaluation_mode, prepare_round, task_loss, train_step, uplink_features,
)
from fedafd.runtime.data.modal import ModalData
from fedafd.runtime.methods import MethodSettings

D = 16
WIDTH = 1280  # EfficientNet-Lite0's pooled width, which the effnet adapters read


def _image_data(rows: int, seed: int, classes: int = 3) -> ModalData:
    """Random pixels with random 'cached backbone features' (adapters read those), labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    return ModalData(inputs={"image": (rng.integers(0, 256, (rows, 3, 32, 32), dtype=np.uint8),)},
                     labels=np.arange(rows) % classes, class_names=tuple("abc"[:classes]),
                     features={"efficientnet_lite0": rng.normal(size=(rows, WIDTH)).astype(np.float32)})


def _model(arch: str = "effnet_linear", seed: int = 0) -> LocalModel:
    torch.manual_seed(seed)
    return LocalModel("image", arch, "minilm_linear", D, num_classes=3, adapter_dropout=0.0)


def _G(public: ModalData, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: nn.functional.normalize(torch.randn(len(public), D, generator=gen), dim=-1) for m in ("image", "text")}


def _baa_step(model: LocalModel, optimizers: Optimizers, private: ModalData, public: ModalData, beta: float) -> None:
    """One production step of FedAFD's objective (BAA on, GFF off) pairing all of `private` with all of `public`."""
    rows = torch.arange(len(public))
    round_ = DeviceRound(round=0, local_epochs=1, settings=MethodSettings("fedafd", baa=True, beta=beta),
                         model=model, optimizers=optimizers, private=private, batch_size=len(private),
                         generator=torch.Generator(), device=torch.device("cpu"), public=public, public_rows=rows,
                         G=_G(public))
    train_step(FedAfdObjective(round_), torch.arange(len(private)), rows)


def _intra_score(model: LocalModel, public: ModalData) -> float:
    """Mean D_in logit of the public features: how 'real' the intra-modal discriminator finds them."""
    with torch.no_grad():
        return float(model.discriminators["intra"](uplink_features(model, public, torch.arange(len(public)),
                                                                      torch.device("cpu"))["image"]).mean())


def test_evaluation_mode_uses_running_statistics_still_backpropagates_and_restores_flags() -> None:
    # Prepare: BatchNorm with running mean 0 / var 1; a batch whose mean is 10; dropout that would zero half.
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5)).train()
    model[2].eval()  # a submodule that was already in eval mode must stay so
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    batch = torch.tensor([[9.0, 9.0], [11.0, 11.0]])
    # Execute
    with evaluation_mode(model):
        out = model(batch)
        out.sum().backward()
    # Assert: normalised by the running statistics (x / sqrt(1 + eps), no dropout), statistics untouched,
    # gradients reached the weights, and every flag back to what it was.
    torch.testing.assert_close(out, batch / (1 + 1e-5) ** 0.5)
    torch.testing.assert_close(model[1].running_mean, torch.zeros(2))
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model.training and model[0].training and model[1].training and not model[2].training


@pytest.mark.parametrize("arch", ["effnet_linear", "cnn_small"])
def test_baa_moves_the_uploaded_public_features_toward_what_the_discriminator_scores_real(arch: str) -> None:
    # Prepare: two identical devices; the discriminators' learning rate is 0 so they stay the same judge.
    private, public = _image_data(32, seed=0), _image_data(24, seed=1)
    scores = {}
    for beta in (0.0, 1.0):
        model = _model(arch)
        optimizers = Optimizers.create(model, lr=1e-2, disc_lr=0.0)
        before = _intra_score(model, public)
        # Execute: the production step, 20 times, with and without the adversarial term.
        for _ in range(20):
            _baa_step(model, optimizers, private, public, beta)
        scores[beta] = _intra_score(model, public) - before
    # Assert: with BAA the *uploaded* (eval-mode) features score as more real; without it they do not
    # move that way nearly as much. Deleting L_G from the step's backward makes the two equal.
    assert scores[1.0] - scores[0.0] > max(0.03, 3 * abs(scores[0.0]))


def test_baa_judges_the_feature_the_device_uploads() -> None:
    # Prepare: a from-scratch encoder with BatchNorm and an adapter with dropout, both in train mode.
    public = _image_data(12, seed=2)
    for arch, dropout in (("cnn_small", 0.0), ("effnet_linear", 0.5)):
        torch.manual_seed(0)
        model = LocalModel("image", arch, "minilm_linear", D, num_classes=3, adapter_dropout=dropout).train()
        seen = {}
        real_forward = model.discriminators["intra"].forward

        def spy(x, seen=seen, real_forward=real_forward):
            seen.setdefault("inputs", []).append(x.detach().clone())
            return real_forward(x)

        model.discriminators["intra"].forward = spy
        # Execute: one step (D_in sees G, then the local public feature, in its own step, then the
        # local feature again in L_G).
        # (What would be uploaded now: the step's own private batch then moves BatchNorm's running statistics.)
        uploaded = uplink_features(model.train(), public, torch.arange(12), torch.device("cpu"))["image"]
        model.train()
        _baa_step(model, Optimizers.create(model, 0.0, 0.0), public, public, 0.5)
        # Assert: the discriminator judged exactly the uploaded feature (eval mode: running statistics, no dropout).
        fakes = [x for x in seen["inputs"] if x.shape == uploaded.shape and not torch.equal(x, _G(public)["image"])]
        assert len(fakes) == 2
        for fake in fakes:
            torch.testing.assert_close(fake, uploaded, atol=1e-6, rtol=0)


def test_task_loss_reads_the_global_feature_through_gff() -> None:
    # Prepare
    private = _image_data(16, seed=3)
    model = _model().eval()
    rows = torch.arange(16)
    gen = torch.Generator().manual_seed(4)
    cache_a = {"image": nn.functional.normalize(torch.randn(16, D, generator=gen), dim=-1)}
    cache_b = {"image": nn.functional.normalize(torch.randn(16, D, generator=gen), dim=-1)}
    # Execute
    with torch.no_grad():
        loss_a = task_loss(model, private, rows, cache_a, torch.device("cpu"))
        loss_b = task_loss(model, private, rows, cache_b, torch.device("cpu"))
        loss_local = task_loss(model, private, rows, {}, torch.device("cpu"))
    # Assert: f_g changes the loss (GFF is in the path), and without a global feature it is the local path.
    assert abs(float(loss_a) - float(loss_b)) > 1e-4
    logits = model.head(model.encode("image", private, rows, torch.device("cpu")))
    torch.testing.assert_close(loss_local, nn.functional.cross_entropy(logits, torch.from_numpy(private.labels)))


def test_retrieval_loss_in_training_uses_the_normalised_fused_features() -> None:
    # Prepare: a multimodal device; the fused features before normalisation are not unit length.
    rng = np.random.default_rng(5)
    data = ModalData(inputs={"image": (rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8),),
                             "text": (rng.integers(0, 100, (8, 6)), np.ones((8, 6), dtype=np.int64))},
                     labels=np.zeros(8, dtype=np.int64),
                     features={"efficientnet_lite0": rng.normal(size=(8, WIDTH)).astype(np.float32),
                               "minilm": rng.normal(size=(8, 384)).astype(np.float32)})
    torch.manual_seed(0)
    model = LocalModel("multimodal", "effnet_linear", "minilm_linear", D, 1, adapter_dropout=0.0).eval()
    rows = torch.arange(8)
    cache = {m: nn.functional.normalize(torch.randn(8, D), dim=-1) for m in ("image", "text")}
    # Execute
    with torch.no_grad():
        loss = task_loss(model, data, rows, cache, torch.device("cpu"))
        fused = {m: model.fuse(m, model.encode(m, data, rows, torch.device("cpu")), cache[m]) for m in ("image", "text")}
    # Assert: the loss is InfoNCE of the L2-normalised fused features, at the learnt temperature.
    image, text = (nn.functional.normalize(fused[m], dim=-1) for m in ("image", "text"))
    logits = model.logit_scale.exp() * image @ text.T
    expected = 0.5 * (nn.functional.cross_entropy(logits, rows) + nn.functional.cross_entropy(logits.T, rows))
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(fused["image"].norm(dim=-1), torch.ones(8), atol=1e-3)


def test_global_towers_encode_cached_features_of_an_adapter_tower() -> None:
    # Prepare: a server-side adapter's weights, as they arrive on the wire (flat 'image.*' keys).
    data = _image_data(6, seed=6)
    torch.manual_seed(1)
    sender = LocalModel("image", "effnet_linear", "minilm_linear", D, 3).encoders["image"].eval()
    towers = GlobalTowers(D, torch.device("cpu"))
    # Execute
    towers.load(3, {"image": "effnet_linear"}, {f"image.{k}": v for k, v in sender.state_dict().items()})
    # Assert: the tower reads the cached backbone features, frozen and in eval mode.
    expected = sender(torch.from_numpy(data.features["efficientnet_lite0"]))
    torch.testing.assert_close(towers.encode("image", data, np.arange(6), torch.device("cpu")), expected)
    assert not any(p.requires_grad for p in towers.encoders["image"].parameters())


@pytest.mark.parametrize("fusion_lr", [0.0, 0.1])
def test_fusion_lr_is_the_step_of_gffs_gates_and_nothing_else(fusion_lr: float) -> None:
    # Prepare: a device that fuses (f_g given), BAA off, the gates in their own Adam group at fusion_lr.
    private = _image_data(32, seed=0)
    model = _model()
    optimizers = Optimizers.create(model, lr=1e-3, disc_lr=0.0, fusion_lr=fusion_lr)
    f_g = {"image": nn.functional.normalize(torch.randn(len(private), D, generator=torch.Generator().manual_seed(2)),
                                            dim=-1)}
    round_ = DeviceRound(round=0, local_epochs=1, settings=MethodSettings("fedafd", baa=False), model=model,
                         optimizers=optimizers, private=private, batch_size=len(private), generator=torch.Generator(),
                         device=torch.device("cpu"), f_g=f_g)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Execute: one production step.
    train_step(FedAfdObjective(round_), torch.arange(len(private)), None)
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}
    # Assert: Adam's first step moves each parameter by its group's lr (m / sqrt(v) = sign(g)): the bias of the
    # gate's last BatchNorm, which alone sets the gate's mean, by fusion_lr (lr when 0); the encoder by lr.
    gate_bias = moved["fusions.image.gate1.t1.4.bias"]
    assert gate_bias == pytest.approx(fusion_lr or 1e-3, rel=0.01)
    assert max(v for name, v in moved.items() if not name.startswith("fusions.")) == pytest.approx(1e-3, rel=0.01)


def test_local_task_weight_adds_the_task_loss_on_f_l_alone_where_z_is_fused() -> None:
    # Prepare: an image device in eval mode (no dropout, running statistics), f_g given.
    private = _image_data(16, seed=3)
    model = _model().eval()
    rows = torch.arange(16)
    f_g = {"image": nn.functional.normalize(torch.randn(16, D, generator=torch.Generator().manual_seed(4)), dim=-1)}
    labels = torch.from_numpy(private.labels)
    # Execute
    with torch.no_grad():
        weighted = task_loss(model, private, rows, f_g, torch.device("cpu"), local_weight=0.3)
        local_alone = task_loss(model, private, rows, {}, torch.device("cpu"), local_weight=0.3)
        f_l = model.encode("image", private, rows, torch.device("cpu"))
        on_z = nn.functional.cross_entropy(model.head(model.fuse("image", f_l, f_g["image"])), labels)
        on_f_l = nn.functional.cross_entropy(model.head(f_l), labels)
    # Assert: CE(head(z)) + 0.3 CE(head(f_l)) where z is fused; without f_g (z is f_l) the loss is counted once.
    torch.testing.assert_close(weighted, on_z + 0.3 * on_f_l)
    torch.testing.assert_close(local_alone, on_f_l)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_local_task_weight_reaches_the_step_from_prepare_round(weight: float) -> None:
    # Prepare: the production round of a fusing device, through prepare_round as the device app builds it.
    private = _image_data(16, seed=3)
    model = _model()
    towers = GlobalTowers(D, torch.device("cpu"))
    torch.manual_seed(5)
    sender = LocalModel("image", "effnet_linear", "minilm_linear", D, 3).encoders["image"]
    towers.load(1, {"image": "effnet_linear"}, {f"image.{k}": v for k, v in sender.state_dict().items()})
    round_ = prepare_round(model, Optimizers.create(model, 0.0, 0.0), towers, private,
                           MethodSettings("fedafd", gff=True), 0, 1, 16, 0, torch.device("cpu"),
                           local_task_weight=weight)
    rows = torch.arange(16)
    # Execute: the objective's loss, and the loss on z alone and on f_l alone, on the same rows in eval mode.
    with evaluation_mode(model), torch.no_grad():
        loss, _ = objective_for(round_).loss_step(rows, None)
        on_z = task_loss(model, private, rows, round_.f_g, torch.device("cpu"))
        on_f_l = task_loss(model, private, rows, {}, torch.device("cpu"))
    # Assert: the device's loss is the one its weight names.
    torch.testing.assert_close(loss, on_z + weight * on_f_l)


def test_an_optimiser_state_saved_under_another_fusion_lr_is_refused_with_the_key_named() -> None:
    # Prepare: a device state saved with one Adam group (fusion_lr 0, the paper's single rate).
    model = _model()
    saved = Optimizers.create(model, lr=1e-3, disc_lr=1e-4, fusion_lr=0.0).state_dict()
    # Execute / Assert: a device at its own fusion_lr (two groups) says what to set; the same setting loads.
    with pytest.raises(ValueError, match="fusion_lr"):
        Optimizers.create(model, lr=1e-3, disc_lr=1e-4, fusion_lr=3e-2).load_state_dict(saved)
    Optimizers.create(model, lr=1e-3, disc_lr=1e-4, fusion_lr=0.0).load_state_dict(saved)
