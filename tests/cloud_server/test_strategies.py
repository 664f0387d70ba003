"""The strategy boundary, by hand: each method's per-sample scores as the server folds them into the
teacher (the same add/score calls app.py makes), and the recipe each method sends the devices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedafd.cloud_server.distill import TeacherFold
from fedafd.cloud_server.strategies import STRATEGY_CLASSES, build_strategy
from fedafd.runtime.config import ConfigError, ServerConfig, build_config
from fedafd.runtime.methods import STRATEGIES

E = math.e


def unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows), dim=-1)


def teacher_of(strategy_name: str, uploads: dict[str, dict[str, torch.Tensor]], server: dict[str, torch.Tensor],
               **config) -> dict[str, TeacherFold]:
    strategy = build_strategy(ServerConfig(strategy=strategy_name, sed_chunk=1, **config))
    folds = {m: TeacherFold() for m in ("image", "text")}
    for client_id, features in uploads.items():
        for modality, tensor in features.items():
            folds[modality].add(client_id, tensor, strategy.score(modality, tensor, server))
    return folds


def test_fedafd_weighs_by_sed_against_the_same_modality() -> None:
    # Prepare: two image devices; the server's image features equal device a's.
    server = {"image": unit([[1.0, 0.0], [0.0, 1.0]]), "text": unit([[0.0, 1.0], [1.0, 0.0]])}
    uploads = {"a": {"image": server["image"].clone()}, "b": {"image": unit([[0.0, 1.0], [1.0, 0.0]])}}
    # Execute: docs/method.md's form (temperature 1) and the default temperature 0.1.
    folds = teacher_of("fedafd", uploads, server, sed_temperature=1.0)
    sharp = teacher_of("fedafd", uploads, server)
    # Assert: by hand, s_a = 1 - log(e + 1), s_b = 0 - log(1 + e) for both samples, so
    # w_a = e / (e + 1) = 0.7311 and the teacher leans toward a; no text device, no text teacher.
    assert len(folds["text"]) == 0
    w_a = E / (E + 1)
    assert folds["image"].mean_weights()["a"] == pytest.approx(0.7311, abs=1e-4)
    torch.testing.assert_close(folds["image"].teacher(), w_a * uploads["a"]["image"] + (1 - w_a) * uploads["b"]["image"])
    # At T = 0.1 the similarities are divided by 0.1: s_a - s_b = 10, so w_a = e^10 / (e^10 + 1).
    assert ServerConfig().sed_temperature == 0.1
    assert sharp["image"].mean_weights()["a"] == pytest.approx(E ** 10 / (E ** 10 + 1), abs=1e-6)


def test_without_sed_and_in_fedmd_and_fedcmi_the_teacher_is_the_plain_mean() -> None:
    server = {"image": unit([[1.0, 0.0]]), "text": unit([[1.0, 0.0]])}
    uploads = {"a": {"text": unit([[1.0, 0.0]])}, "b": {"text": 3 * unit([[0.0, 1.0]])}}
    for name, config in (("fedafd", {"sed": False}), ("fedmd", {}), ("fedcmi", {})):
        folds = teacher_of(name, uploads, server, **config)
        torch.testing.assert_close(folds["text"].teacher(), torch.tensor([[0.5, 0.5]]))


def test_creamfl_scores_an_image_upload_against_the_servers_text_features() -> None:
    # Prepare: the server's text features are device a's image features; its image features are b's.
    # The same-modality score (FedAFD) would favour b, the cross-modal one (CreamFL) favours a.
    a, b = unit([[1.0, 0.0], [0.0, 1.0]]), unit([[0.0, 1.0], [1.0, 0.0]])
    server = {"image": b.clone(), "text": a.clone()}
    uploads = {"a": {"image": a}, "b": {"image": b}}
    # Execute
    creamfl = teacher_of("creamfl", uploads, server)["image"].mean_weights()
    fedafd = teacher_of("fedafd", uploads, server, sed_temperature=1.0)["image"].mean_weights()
    # Assert: w_a = e / (e + 1) for CreamFL, the mirror image for FedAFD
    assert creamfl["a"] == pytest.approx(E / (E + 1), abs=1e-5)
    assert fedafd["a"] == pytest.approx(1 / (E + 1), abs=1e-5)


def test_fedgems_fuses_only_the_devices_that_retrieve_the_pair_else_all_by_inverse_entropy() -> None:
    # Prepare: P = 2; server text features e1, e2. Device a's image features retrieve both pairs right;
    # device b's retrieve sample 0 wrongly (it points at text 1) and sample 1 right.
    server = {"text": unit([[1.0, 0.0], [0.0, 1.0]]), "image": unit([[1.0, 0.0], [0.0, 1.0]])}
    a = unit([[1.0, 0.0], [0.0, 1.0]])
    b = unit([[0.0, 1.0], [0.6, 0.8]])
    # Execute
    fold = teacher_of("fedgems", {"a": {"image": a}, "b": {"image": b}}, server)["image"]
    teacher = fold.teacher()
    # Assert: sample 0: only a is right -> the teacher is a's feature exactly.
    torch.testing.assert_close(teacher[0], a[0])
    # Sample 1: both right; weights softmax_c(1 / H_c) with H of softmax([<v, t_0>, <v, t_1>] / 0.07).
    def inverse_entropy(v):
        p = torch.softmax(v @ server["text"].T / 0.07, dim=0)
        return 1.0 / -(p * p.log()).sum()
    w = torch.softmax(torch.stack([inverse_entropy(a[1]), inverse_entropy(b[1])]), dim=0)
    torch.testing.assert_close(teacher[1], w[0] * a[1] + w[1] * b[1])
    # Nobody right anywhere: all devices fused by the same inverse-entropy weights (no sample left out).
    wrong = teacher_of("fedgems", {"c": {"image": unit([[0.0, 1.0], [1.0, 0.0]])}}, server)["image"]
    torch.testing.assert_close(wrong.teacher(), unit([[0.0, 1.0], [1.0, 0.0]]))


def test_fedet_weighs_each_device_by_the_variance_of_its_log_probabilities() -> None:
    server = {"text": unit([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), "image": unit([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])}
    a = unit([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # confident: log-probabilities spread far
    b = unit([[1.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])  # hedging between texts
    # Execute
    fold = teacher_of("fedet", {"a": {"image": a}, "b": {"image": b}}, server)["image"]
    # Assert: alpha_ck = sigma_ck / (sigma_ak + sigma_bk), sigma = unbiased variance over P of log softmax(<v, t_j> / 0.07)
    sigma = torch.stack([torch.log_softmax(v @ server["text"].T / 0.07, dim=1).var(dim=1) for v in (a, b)])
    alpha = sigma / sigma.sum(0)
    torch.testing.assert_close(fold.teacher(), alpha[0, :, None] * a + alpha[1, :, None] * b)
    assert fold.mean_weights()["a"] > 0.5


def test_each_strategy_sends_its_recipe_and_local_sends_nothing_federated() -> None:
    recipes = {name: build_strategy(ServerConfig(strategy=name)).settings() for name in STRATEGIES}
    assert not recipes["local"].uplink and not recipes["local"].needs().global_features
    assert not recipes["fedafd"].baa and recipes["fedafd"].gff and recipes["fedafd"].digest == "none"  # BAA: off (H7)
    assert build_strategy(ServerConfig(strategy="fedafd", baa=True)).settings().baa
    assert recipes["fedmd"].digest == "consensus" and not recipes["fedmd"].needs().global_features
    assert recipes["fedmd"].needs().consensus and not recipes["fedafd"].needs().consensus
    assert recipes["creamfl"].contrast_weight == 0.5 and recipes["creamfl"].contrast_temperature == 0.5
    assert recipes["fedgems"].digest == recipes["fedet"].digest == "global"
    assert recipes["fedcmi"].infiltration_weight > 0 and recipes["fedcmi"].dominant_modality == "text"
    for name, recipe in recipes.items():
        assert recipe.strategy == name
        assert not (recipe.baa or recipe.gff) or name == "fedafd"


def test_an_unknown_strategy_is_an_error_that_lists_the_known_ones() -> None:
    assert tuple(STRATEGY_CLASSES) == STRATEGIES
    with pytest.raises(ConfigError, match=f"strategy must be one of {', '.join(STRATEGIES)}"):
        build_config(ServerConfig, {"strategy": "fedavg"})
    with pytest.raises(ConfigError, match="public_resample"):
        build_config(ServerConfig, {"strategy": "fedmd", "public_resample": True})
