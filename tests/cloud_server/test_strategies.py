"""The strategy boundary: which teachers each strategy builds from the devices' public features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedafd.cloud_server.strategies import FedAfd, Local


def unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows), dim=-1)


def test_a_modality_nobody_sent_is_skipped_and_weights_sum_to_one_per_sample() -> None:
    # Prepare: two image devices, no text device; the server's image features equal device a's.
    server = {"image": unit([[1.0, 0.0], [0.0, 1.0]]), "text": unit([[1.0, 0.0], [0.0, 1.0]])}
    uploads = {"a": {"image": server["image"].clone()}, "b": {"image": unit([[0.0, 1.0], [1.0, 0.0]])}}
    # Execute
    teachers, mean_weights = FedAfd(baa=True, gff=True, sed=True, beta=0.5, sed_chunk=1).teachers(uploads, server)
    # Assert: by hand, s_a = 1 - log(e + 1), s_b = 0 - log(1 + e) for both samples, so
    # w_a = e / (e + 1) = 0.7311 and the teacher leans toward a.
    assert set(teachers) == {"image"}
    w_a = torch.e / (torch.e + 1)
    assert mean_weights["image"]["a"] == pytest.approx(0.7311, abs=1e-4)
    expected = w_a * uploads["a"]["image"] + (1 - w_a) * uploads["b"]["image"]
    torch.testing.assert_close(teachers["image"], expected)


def test_without_sed_the_teacher_is_the_plain_mean() -> None:
    server = {"image": unit([[1.0, 0.0]]), "text": unit([[1.0, 0.0]])}
    uploads = {"a": {"text": unit([[1.0, 0.0]])}, "b": {"text": unit([[0.0, 1.0]])}}
    teachers, mean_weights = FedAfd(baa=True, gff=True, sed=False, beta=0.5, sed_chunk=8).teachers(uploads, server)
    torch.testing.assert_close(teachers["text"], torch.tensor([[0.5, 0.5]]))
    assert mean_weights == {}


def test_local_shares_nothing_and_builds_no_teacher() -> None:
    local = Local()
    assert not local.shares_global_model()
    assert local.device_settings()["baa"] is False and local.device_settings()["gff"] is False
    assert local.teachers({"a": {"image": torch.ones(1, 2)}}, {}) == ({}, {})
