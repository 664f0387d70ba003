"""The server's stages on two CPU ranks (gloo, a real loopback TCP store, separate processes) against one
process, and a rank that dies or freezes mid-stage failing with a clear error in bounded time."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedafd.cloud_server.app import ServerApp
from fedafd.cloud_server.distributed import RankFailed, Ranks
from fedafd.cloud_server.stages import GlobalModel, train_contrastive_epoch
from fedafd.runtime.config import ServerConfig, load_config
from fedafd.cloud_server.reporting.report import read_metrics
from fedafd.runtime.torch_utils import seeded_generator
from fedafd.runtime.transport import InprocHub

HELPER = Path(__file__).with_name("ddp_rank.py")


def _helper():
    spec = importlib.util.spec_from_file_location("ddp_rank", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_ranks(scenario: str, out: Path) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(HELPER), str(rank), "2", str(port), scenario, str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]


def test_two_ranks_train_as_one_process_and_a_dead_rank_fails_the_stage(tmp_path: Path) -> None:
    # Prepare: two ranks run one round of the stages; this process runs the same round alone meanwhile.
    ranks = _start_ranks("same", tmp_path)
    expected = _helper().reference()

    # Execute
    outputs = [p.communicate(timeout=90)[0] for p in ranks]

    # Assert: rank 0 reports the same losses, features and metrics as one process, and both ranks end with
    # its weights (rank 1 began from another initialisation and got rank 0's model and Adam moments).
    assert ranks[0].returncode == 0, outputs[0]
    assert ranks[1].returncode == 3, outputs[1]  # its os._exit in the second epoch
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["stage1"] == pytest.approx(expected["stage1"], rel=1e-5)
    assert got[1]["stage1"] == pytest.approx(expected["stage1"], rel=1e-5)  # the loss of the whole batch on each rank
    assert got[0]["stage3"] == pytest.approx(expected["stage3"], rel=1e-5)
    assert expected["stage3"] > 0 and got[1]["teachers_received"] == ["image", "text"]
    torch.testing.assert_close(torch.tensor(got[0]["features"]), torch.tensor(expected["features"]), atol=1e-5, rtol=0)
    assert got[0]["metrics"] == pytest.approx(expected["metrics"], abs=1e-4) and got[1]["metrics"] == {}
    for rank in (0, 1):
        for name, value in expected["weights"].items():
            torch.testing.assert_close(torch.tensor(got[rank]["weights"][name]), torch.tensor(value), atol=2e-5, rtol=1e-4,
                                       msg=lambda m, name=name, rank=rank: f"rank {rank} {name}: {m}")
    # Rank 1 exited mid stage 1: rank 0 names it, long before worker_timeout_s (60 s).
    failure = json.loads((tmp_path / "failure0.json").read_text())
    assert failure["error"] and "server rank 1 of 2 stopped" in failure["error"], failure
    assert "round 0" in failure["error"]
    assert failure["seconds"] < 15, failure


def test_frozen_rank_fails_the_stage_within_worker_timeout(tmp_path: Path) -> None:
    # Prepare / Execute: rank 1 freezes at its second step of stage 1; worker_timeout_s is 3.
    ranks = _start_ranks("hang", tmp_path)
    try:
        output = ranks[0].communicate(timeout=60)[0]
        deadline = time.monotonic() + 10
        while not (tmp_path / "failure0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        failure = json.loads((tmp_path / "failure0.json").read_text())
    finally:
        ranks[1].kill()
        ranks[1].communicate(timeout=30)

    # Assert: not a hang; the error says every rank is alive and which setting bounded the wait.
    assert ranks[0].returncode == 0, output
    assert failure["error"] and "did not answer within worker_timeout_s=3s" in failure["error"], failure
    assert 3 <= failure["seconds"] < 15, failure


@pytest.mark.slow
def test_serve_with_two_workers_under_torchrun(tmp_path: Path) -> None:
    # Prepare: `serve --workers 2` (re-run under torchrun) with one real device, no dropout.
    run_dir = tmp_path / "run"
    settings = ["rounds=2", "public_size=64", "feature_dim=32", "max_private=64", "max_test=32", "local_epochs=1",
                "server_epochs=1", "adapter_dropout=0", "threads=1", "worker_timeout_s=60"]
    command = [sys.executable, "-m", "fedafd.cloud_server.cli", "serve", "--workers", "2", "--local", "image=1",
               "--out", str(run_dir), *[arg for s in settings for arg in ("-c", s)]]

    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)

    # Assert: both rounds recorded by rank 0 alone; round 0's stage-1 loss (before any upload) is the one a
    # single process computes from the same seed.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count("serving on") == 1  # one rank bound the device socket
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1] and all(r["clients"] for r in records)
    config = load_config(ServerConfig, None, settings)
    alone = ServerApp(config, InprocHub().server(), tmp_path / "alone")
    try:
        loss = train_contrastive_epoch(alone.model, alone.optimizer, alone.public, config.batch_size,
                                       seeded_generator(config.seed * 1_000_003), alone.device)
    finally:
        alone.close()
    assert records[0]["server"]["stage1_loss"] == pytest.approx(loss, rel=1e-5)


def test_batchnorm_tower_on_cpu_ranks_is_refused_naming_it() -> None:
    # Prepare: a BatchNorm image tower, two CPU ranks (refused before any collective, so no group is needed).
    model = GlobalModel("cnn_small", "gru", 16, "infonce")
    # Execute / Assert
    with pytest.raises(RankFailed, match="server tower cnn_small has BatchNorm.*device=cuda"):
        Ranks(rank=0, world_size=2).replicate(model)


def test_workers_must_be_positive() -> None:
    from typer.testing import CliRunner

    from fedafd.cloud_server.cli import app

    result = CliRunner().invoke(app, ["serve", "--workers", "0", "--insecure"])
    assert result.exit_code == 2 and "--workers must be >= 1" in result.output
