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


@pytest.mark.parametrize("saved_fusion_lr", [3e-2, None])
def test_real_devices_reads_back_a_device_as_it_was_saved_with_or_before_gffs_own_rate(tmp_path, saved_fusion_lr) -> None:
    import json

    from fedafd.benchmarks.privacy import PROBE_ROWS, probe_rows, real_devices
    from fedafd.edge_client.model import GlobalTowers, LocalModel
    from fedafd.edge_client.state import STATE_CONFIG_FILE, ClientState, save_state
    from fedafd.edge_client.training import Optimizers
    from fedafd.runtime.config import ClientConfig, config_to_dict

    # Prepare: a small image device of a finished run, its optimiser with GFF's own Adam group (today's default),
    # or a state and config.json from before fusion_lr existed (one group, no key in the file).
    config = ClientConfig(kind="image", client_id="image-0", image_arch="cnn_small", text_arch="gru", max_private=32,
                          max_test=32, num_partitions=3)
    folder = tmp_path / "clients" / "image-0"
    folder.mkdir(parents=True)
    model = LocalModel("image", "cnn_small", "gru", 32, 10, head=config.head)
    optimizers = Optimizers.create(model, config.lr, config.disc_lr, saved_fusion_lr or 0.0)
    save_state(folder, ClientState(model, optimizers, GlobalTowers(32, torch.device("cpu")), last_round=2),
               {"client_id": "image-0", "feature_dim": 32})
    values = config_to_dict(config)
    if saved_fusion_lr is None:
        del values["fusion_lr"]
    (folder / STATE_CONFIG_FILE).write_text(json.dumps(values))
    # Execute
    (device,) = real_devices(tmp_path, probe_rows(1496))
    # Assert: the device is read back (an optimiser of the other shape is refused by load_state) with its last upload
    assert device.kind == "image" and device.arch == "cnn_small"
    assert device.fingerprint.shape == (PROBE_ROWS * (PROBE_ROWS - 1) // 2,)
