"""The label-inference attack's parts by hand: the fingerprint ignores a rotation of the device's space, the
AUC and top-k recovery are what their definitions say, and ridge scores rank a class its fingerprint reveals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedafd.benchmarks.privacy import auc, fingerprint, holds_classes, ridge_scores, top_k_recovery


def test_the_fingerprint_is_the_same_for_any_rotation_of_the_features() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(10, 6, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    probe = torch.tensor([1, 4, 7])
    got = fingerprint(features, probe)
    assert got.shape == (3,)  # the 3 pairs of 3 rows
    np.testing.assert_allclose(got, fingerprint(features @ rotation, probe), atol=1e-6)
    f = torch.nn.functional.normalize(features[probe], dim=-1)
    assert got[0] == pytest.approx(float(f[0] @ f[1]), abs=1e-6)  # rows 1 and 4


def test_auc_and_top_k_recovery_by_hand() -> None:
    # Positives 0.9 and 0.4, negatives 0.5 and 0.1: of the 4 pairs, 3 are ordered right.
    assert auc(np.array([0.9, 0.5, 0.4, 0.1]), np.array([True, False, True, False])) == 0.75
    assert auc(np.array([0.3, 0.3]), np.array([True, False])) == 0.5
    assert auc(np.array([1.0]), np.array([True])) is None
    # Device 1 holds classes 0, 1 and its best two are 0, 2: half; device 2 holds class 2, its best: all.
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    holds = np.array([[True, True, False], [False, False, True]])
    assert top_k_recovery(scores, holds) == (pytest.approx(0.75), pytest.approx((2 / 3 + 1 / 3) / 2))
    assert list(holds_classes(np.array([0, 0, 0, 1] * 25 + [2]), 3)) == [True, True, False]


def test_ridge_scores_rank_the_class_the_fingerprint_reveals() -> None:
    # Shadows whose first fingerprint number is high exactly when they hold class 0.
    rng = np.random.default_rng(1)
    holds = rng.random((40, 2)) < 0.5
    x = rng.normal(size=(40, 5))
    x[:, 0] += 3.0 * holds[:, 0]
    scores = ridge_scores(x, holds, x)
    assert auc(scores[:, 0], holds[:, 0]) > 0.95


def test_held_out_shadows_are_predicted_when_the_fingerprint_reveals_the_class_and_not_otherwise() -> None:
    from fedafd.benchmarks.privacy import cross_validated_auc

    rng = np.random.default_rng(2)
    holds = rng.random((60, 1)) < 0.5
    noise = rng.normal(size=(60, 4))
    revealing = noise.copy()
    revealing[:, 0] += 3.0 * holds[:, 0]
    assert cross_validated_auc(revealing, holds) > 0.9
    assert abs(cross_validated_auc(noise, holds) - 0.5) < 0.2
