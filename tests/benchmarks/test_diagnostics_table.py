"""The diagnostics table's arithmetic: means over a kind's devices (a multimodal device's modalities pooled),
the server's values, and the side-by-side rows."""

from __future__ import annotations

import pytest

from fedafd.benchmarks.diagnostics import device_means, server_values, side_by_side


def _record(round_: int, acc: float) -> dict:
    return {"round": round_, "clients": {
        "image-0": {"kind": "image", "diagnostics": {"disc_acc_intra": acc, "image": {"gate1_mean": 0.2}}},
        "image-1": {"kind": "image", "diagnostics": {"disc_acc_intra": 0.5, "image": {"gate1_mean": 0.4}}},
        "multimodal-0": {"kind": "multimodal", "diagnostics": {"image": {"upload_cos": 0.1}, "text": {"upload_cos": 0.3}}},
        "text-0": {"kind": "text", "diagnostics": {}},
    }, "diagnostics": {"server": {"image": {"sed_entropy": 0.9, "teacher_cos": 0.2}, "stage3_r1_sum_delta": -1.5}}}


def test_device_means_pool_devices_of_a_kind_and_a_devices_modalities() -> None:
    means = device_means(_record(0, 0.7))
    assert means["image"] == {"disc_acc_intra": pytest.approx(0.6), "gate1_mean": pytest.approx(0.3)}
    assert means["multimodal"] == {"upload_cos": pytest.approx(0.2)}
    assert means["text"] == {}


def test_server_values_and_the_side_by_side_rows() -> None:
    assert server_values(_record(0, 0.5)) == {"image_sed_entropy": 0.9, "image_teacher_cos": 0.2, "stage3_r1_sum_delta": -1.5}
    markdown, result = side_by_side({"a": [_record(0, 0.5), _record(1, 0.7), _record(2, 0.9)], "b": [_record(0, 0.5)]})
    assert result["rounds"] == {"a": [1, 2, 3], "b": [1, 1, 1]}
    assert result["table"]["disc_acc_intra (image)"]["a"] == [pytest.approx(0.5), pytest.approx(0.6), pytest.approx(0.7)]
    assert "| disc_acc_intra (image) | 0.50 / 0.60 / 0.70 | 0.50 / 0.50 / 0.50 |" in markdown
