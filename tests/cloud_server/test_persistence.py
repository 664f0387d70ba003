"""The run folder round by round: the metrics line before the checkpoint, and what --resume reads back
(metrics.jsonl cut to the checkpointed rounds, a changed config refused before anything is touched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedafd.cloud_server.checkpoint import CHECKPOINT_FILE, CHECKPOINT_FORMAT, CheckpointRefused
from fedafd.cloud_server.persistence import keep_finished_records, restore_run, save_round, server_tensors
from fedafd.runtime.checkpoint import read_meta
from fedafd.runtime.config import ServerConfig, config_to_dict
from fedafd.cloud_server.reporting.report import METRICS_FILE


class Sink:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log_round(self, record: dict) -> None:
        self.records.append(record)


def _tensors(seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer, distill = torch.optim.Adam(model.parameters()), torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return server_tensors(model, optimizer, distill, {"image": torch.full((4, 2), 0.5)})


def test_a_round_is_saved_metrics_line_and_sinks_first_then_the_checkpoint(tmp_path: Path) -> None:
    # Prepare
    config, sink = ServerConfig(rounds=5), Sink()
    tensors = _tensors(0)
    # Execute: rounds 0 and 1
    for round_ in (0, 1):
        save_round(tmp_path, {"round": round_, "b": 2, "a": 1}, tensors, config, "run-7", [sink])
    # Assert: one sorted-key line per round, the sink saw the same records, the checkpoint is round 1's.
    assert (tmp_path / METRICS_FILE).read_text() == '{"a": 1, "b": 2, "round": 0}\n{"a": 1, "b": 2, "round": 1}\n'
    assert [r["round"] for r in sink.records] == [0, 1]
    meta = read_meta(tmp_path / CHECKPOINT_FILE)
    assert meta == {"round": 1, "config": config_to_dict(config), "format": CHECKPOINT_FORMAT, "run_id": "run-7"}
    restored, meta = restore_run(tmp_path, config)
    assert torch.equal(restored["model"]["weight"], tensors["model"]["weight"])
    assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], tensors["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(restored["consensus"]["image"], tensors["consensus"]["image"])
    assert (meta["round"], meta["run_id"]) == (1, "run-7")


def test_resume_keeps_exactly_the_records_of_checkpointed_rounds(tmp_path: Path) -> None:
    # Prepare: the checkpoint is round 1's; round 2's line landed, then the crash left half a line.
    config = ServerConfig()
    save_round(tmp_path, {"round": 0}, _tensors(0), config, "run-7")
    save_round(tmp_path, {"round": 1}, _tensors(1), config, "run-7")
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write(json.dumps({"round": 2}) + "\n" + '{"round": 3, "cli')
    # Execute
    restore_run(tmp_path, config)
    # Assert
    assert (tmp_path / METRICS_FILE).read_text() == '{"round": 0}\n{"round": 1}\n'


def test_only_complete_records_up_to_the_round_are_kept(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"round": 0}\nnot json\n{"no_round": 1}\n[1]\n{"round": 1}\n{"round": 2}\n')
    keep_finished_records(tmp_path, 1)
    assert (tmp_path / METRICS_FILE).read_text() == '{"round": 0}\n{"round": 1}\n'
    keep_finished_records(tmp_path / "none", 1)  # no metrics yet: nothing to do
    assert not (tmp_path / "none").exists()


def test_a_changed_config_is_refused_before_the_metrics_are_touched(tmp_path: Path) -> None:
    save_round(tmp_path, {"round": 0}, _tensors(0), ServerConfig(gamma=0.4), "run-7")
    with open(tmp_path / METRICS_FILE, "a") as handle:
        handle.write('{"round": 1}\n')
    with pytest.raises(CheckpointRefused, match=r"gamma: 0.4 -> 0.9"):
        restore_run(tmp_path, ServerConfig(gamma=0.9))
    assert (tmp_path / METRICS_FILE).read_text() == '{"round": 0}\n{"round": 1}\n'
