"""`fedafd-cloud simulate` as a user runs it: one process writes the run folder `serve` writes, which
`report`, `profile` and TensorBoard read unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedafd.cloud_server.reporting.report import METRICS_FILE, read_metrics

TINY = ["-c", "rounds=2", "-c", "public_size=48", "-c", "feature_dim=16", "-c", "batch_size=16", "-c", "max_private=40",
        "-c", "max_test=32", "-c", "local_epochs=1", "-c", "alpha=1.0"]


def _cloud(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedafd.simulation.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_simulate_writes_a_run_folder_that_report_profile_and_tensorboard_read(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = _cloud("simulate", "--fleet", "image=1,text=1,multimodal=1", "--out", str(run_dir),
                  "--tensorboard", str(tmp_path / "tb"), "--local-set", "batch_size=16", *TINY)
    assert done.returncode == 0, done.stderr
    assert "round 2/2 | server R@1 sum" in done.stdout
    records = read_metrics(run_dir / METRICS_FILE)
    assert [r["round"] for r in records] == [0, 1]
    assert set(records[-1]["clients"]) == {"image-0", "text-0", "multimodal-0"}
    assert json.loads((run_dir / "config.json").read_text())["expected_clients"] == 3

    report = _cloud("report", str(run_dir), "--format", "json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)[-1]["server_r1_sum"] == records[-1]["server"]["r1_sum"]
    profile = _cloud("profile", str(run_dir), "--format", "json")
    assert profile.returncode == 0, profile.stderr
    events = EventAccumulator(str(tmp_path / "tb" / "run"))
    events.Reload()
    assert [e.value for e in events.Scalars("server/r1_sum")] == \
        pytest.approx([r["server"]["r1_sum"] for r in records], rel=1e-6)  # TensorBoard keeps float32


def test_simulate_refuses_bad_input_before_writing_anything(tmp_path: Path) -> None:
    for args, says in ((["--fleet", "image=1,phone=2"], "KIND=N"), (["--fleet", "image=1", "--local-set", "nope=1"], "nope"),
                       (["--fleet", "image=1", "-c", "rounds=-1"], "rounds"), (["--fleet", "image=1", "--workers", "0"], "workers"),
                       (["--fleet", "image=2", "--local-set", "dp=true"], "image-1: dp: image_arch=cnn_small")):
        done = _cloud("simulate", *args, "--out", str(tmp_path / "run"))
        assert done.returncode != 0 and says in done.stderr + done.stdout, (args, done.stderr)
        assert not (tmp_path / "run").exists()
