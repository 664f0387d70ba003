"""The per-round summary the CLI line and the accuracy benchmark read: means per kind, personalised beside full-test."""

from __future__ import annotations

import pytest

from fedafd.cloud_server.reporting.report import progress_line, summarize_round


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


def test_report_against_puts_the_last_rounds_side_by_side_with_their_differences(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from fedafd.cloud_server.cli import app as cloud_cli

    # Prepare: two run folders whose last rounds differ by hand-chosen numbers, and whose configs differ in the
    # strategy alone.
    first, last = _record(), dict(_record(), round=3, server={"r1_sum": 47.5, "rsum": 251.0})
    other = dict(_record(), round=3, server={"r1_sum": 45.0, "rsum": 240.0},
                 clients={"image-0": {"kind": "image", "metrics": {"top1": 20.0, "pers_top1": 75.0, "top1_bound": 40.0}}})
    for name, records, strategy in (("fedafd", [first, last], "fedafd"), ("local", [other], "local")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / name / "config.json").write_text(json.dumps({"strategy": strategy, "seed": 0}))
    # Execute
    result = CliRunner().invoke(cloud_cli, ["report", str(tmp_path / "fedafd"), "--against", str(tmp_path / "local"),
                                            "--format", "json"])
    text = CliRunner().invoke(cloud_cli, ["report", str(tmp_path / "fedafd"), "--against", str(tmp_path / "local")])
    # Assert: the last round of each (round 4 of both), the image means (20 and 80 personalised against 20 and 75),
    # the server's R@1 sum 47.5 against 45, and the one config key that differs.
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.output)
    assert comparison["rounds"] == [4, 4] and comparison["config_differs"] == ["strategy"]
    assert comparison["metrics"]["image_pers_top1"] == {"run": 80.0, "against": 75.0, "difference": 5.0}
    assert comparison["metrics"]["server_r1_sum"]["difference"] == pytest.approx(2.5)
    assert "mm_i2t_r1" not in comparison["metrics"]  # the other run has no retrieval device: nothing to compare
    assert text.exit_code == 0 and "differ in: strategy" in text.output and "+5.00" in text.output
    missing = CliRunner().invoke(cloud_cli, ["report", str(tmp_path / "fedafd"), "--against", str(tmp_path)])
    assert missing.exit_code != 0 and "no metrics.jsonl" in missing.output


def test_report_against_with_html_writes_the_runs_page_too() -> None:
    # A real run (the committed fixture) against itself: the comparison prints and the page is written, where
    # --html once went silently unheeded beside --against.
    import shutil
    import tempfile
    from pathlib import Path

    from typer.testing import CliRunner

    from fedafd.cloud_server.cli import app as cloud_cli

    fixture = Path(__file__).parents[1] / "benchmarks" / "fixtures" / "paper-quick-seed0-LOCAL"
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(fixture, run)
        result = CliRunner().invoke(cloud_cli, ["report", str(run), "--against", str(fixture), "--html"])
        assert result.exit_code == 0, result.output
        assert "difference" in result.output and (run / "report.html").is_file()
        assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
