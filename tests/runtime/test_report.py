"""The per-round summary the CLI line and the accuracy benchmark read: means per kind, personalised beside full-test."""

from __future__ import annotations

import pytest

from fedafd.runtime.report import progress_line, summarize_round


def _record() -> dict:
    return {
        "round": 2,
        "clients": {
            "image-0": {"kind": "image", "metrics": {"top1": 30.0, "pers_top1": 90.0, "top1_bound": 40.0}},
            "image-1": {"kind": "image", "metrics": {"top1": 10.0, "pers_top1": 70.0, "top1_bound": 20.0}},
            "multimodal-0": {"kind": "multimodal", "metrics": {"i2t_r1": 5.0, "t2i_r1": 6.0, "pers_i2t_r1": 9.0}},
        },
        "server": {"r1_sum": 44.0, "rsum": 250.0},
        "bytes": {"image-0": {"up": {"feature_upload": 100}, "down": {"round_start": 300}},
                  "image-1": {"up": {"feature_upload": 300}, "down": {"round_start": 500}}},
        "timings": {"stage1": 1.0, "collect": 2.5},
        "dropped": {},
    }


def test_summary_means_per_kind_with_personalised_metrics_and_bounds() -> None:
    s = summarize_round(_record())
    assert (s["image_top1"], s["image_pers_top1"], s["image_top1_bound"]) == (20.0, 80.0, 30.0)
    assert (s["mm_i2t_r1"], s["mm_pers_i2t_r1"]) == (5.0, 9.0) and "mm_pers_t2i_r1" not in s
    assert "text_top1" not in s
    assert (s["up_bytes_per_client"], s["down_bytes_per_client"]) == (200, 400)
    assert s["seconds"] == pytest.approx(3.5)


def test_progress_line_shows_personalised_beside_full_test() -> None:
    line = progress_line(_record(), rounds=3)
    assert line.startswith("round 3/3 | server R@1 sum 44.0 rsum 250.0")
    assert "image top-1 20.0 (pers. 80.0)" in line and "multimodal i2t R@1 5.0 (pers. 9.0)" in line
