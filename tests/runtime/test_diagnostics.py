"""The diagnostics both sides share: the row-wise mean cosine, and how a device's diagnostics ride in its
upload's metrics and come out apart on the server."""

import math

import pytest
import torch

from fedafd.runtime.diagnostics import diagnostics_to_metrics, mean_cosine, split_diagnostics


def test_mean_cosine_by_hand() -> None:
    # Prepare: row 0 parallel (cos 1, scale ignored), row 1 at 45 degrees (cos 1/sqrt 2), row 2 opposite (-1)
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 5.0], [0.0, -1.0]])
    # Execute / Assert
    assert mean_cosine(a, b) == pytest.approx((1 + 1 / math.sqrt(2) - 1) / 3)
    with pytest.raises(ValueError):
        mean_cosine(a, b[:2])


def test_diagnostics_round_trip_through_the_upload_metrics() -> None:
    # Prepare
    diagnostics = {"disc_acc_intra": 0.75, "logit_norm": float("nan"), "image": {"gate1_mean": 0.5, "upload_cos": 0.25}}
    # Execute
    metrics = diagnostics_to_metrics(diagnostics)
    plain, back = split_diagnostics({"top1": 40.0, **metrics})
    # Assert: NaN left out (JSON has none), the rest comes back apart from the task metrics
    assert metrics == {"diag_disc_acc_intra": 0.75, "diag_image.gate1_mean": 0.5, "diag_image.upload_cos": 0.25}
    assert plain == {"top1": 40.0}
    assert back == {"disc_acc_intra": 0.75, "image": {"gate1_mean": 0.5, "upload_cos": 0.25}}


def test_a_flat_diagnostic_named_like_a_modality_cannot_break_the_record() -> None:
    # Prepare / Execute: a foreign build's keys, in the order that would clash
    _, back = split_diagnostics({"diag_image": 1.0, "diag_image.gate1_mean": 0.5, "diag_odd.name": 2.0})
    # Assert
    assert back == {"image": {"gate1_mean": 0.5}, "odd.name": 2.0}
