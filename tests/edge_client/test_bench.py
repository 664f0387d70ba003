"""`fedafd-edge bench` measures this device and writes a profile that loads back as a device profile."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedafd.edge_client.cli import app
from fedafd.runtime.shaping import load_profile


def test_bench_writes_a_loadable_profile_with_what_it_measured(tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "me.toml"
    result = CliRunner().invoke(app, ["bench", "--kind", "image", "--out", str(out), "--name", "me",
                                      "--link", "phone_lte", "--reference-ms", "1000", "--format", "json",
                                      "-c", "batch_size=8"])
    # Assert: the measurements are real numbers, and the file keeps the phone's link values.
    assert result.exit_code == 0, result.output
    measured = json.loads(result.output)
    assert measured["train_ms_per_sample"] > 0 and measured["extract_ms_per_sample"] > 0
    assert measured["infer_ms_per_sample"] == 0 and measured["onnx"].startswith("skipped")
    profile, phone = load_profile(str(out)), load_profile("phone_lte")
    assert profile.name == "me"
    assert profile.train_ms_per_sample == measured["train_ms_per_sample"]
    assert profile.compute_factor == measured["train_ms_per_sample"] / 1000
    assert (profile.uplink_mbps, profile.downlink_mbps, profile.rtt_ms) == (phone.uplink_mbps, phone.downlink_mbps,
                                                                            phone.rtt_ms)
