"""The refactor check's comparison: timings do not count, anything else does, and it says where."""

from __future__ import annotations

from fedafd.benchmarks.refactor_check import first_difference, without_timings


def test_only_timings_are_left_out_and_the_first_difference_is_named() -> None:
    a = {"round": 0, "timings": {"stage1": 1.0}, "clients": {"x": {"metrics": {"top1": 50.0, "compute_seconds": 2.0},
                                                                    "train_seconds": 3.0}}}
    b = {"round": 0, "timings": {"stage1": 9.0}, "clients": {"x": {"metrics": {"top1": 50.0, "compute_seconds": 7.0},
                                                                    "train_seconds": 1.0}}}
    assert first_difference(without_timings([a]), without_timings([b])) == ""
    b["clients"]["x"]["metrics"]["top1"] = 50.5
    assert first_difference(without_timings([a]), without_timings([b])) == "[0]/clients/x/metrics/top1: 50.0 != 50.5"
    assert first_difference([1], [1, 2]) == ": 1 != 2 items"
