"""What a run folder keeps of the rounds: each finished round's line in metrics.jsonl (then its tracking
sinks), then the checkpoint (cloud_server/checkpoint.py's file); and what `serve --resume` reads back.

Metrics first, then the checkpoint: a crash between the two re-runs the round on resume, and `restore_run`
drops the orphan line, so every round appears exactly once."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fedafd.cloud_server.checkpoint import check_resume, load_server_checkpoint, save_server_checkpoint
from fedafd.runtime.config import ServerConfig
from fedafd.cloud_server.reporting.report import METRICS_FILE
from fedafd.runtime.files import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from fedafd.cloud_server.tracking import RoundSink

log = logging.getLogger("fedafd.cloud")


def server_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, distill_optimizer: torch.optim.Optimizer,
                   consensus: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The checkpoint's tree: the global model, stage 1's and stage 3's Adam states, FedMD's consensus."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "distill_optimizer": distill_optimizer.state_dict(), "consensus": consensus}


def append_record(run_dir: Path, record: dict, sinks: Sequence[RoundSink] = ()) -> None:
    """One line of metrics.jsonl (keys sorted), then the same record to each sink (TensorBoard, MLflow)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    for sink in sinks:
        sink.log_round(record)


def save_round(run_dir: Path, record: dict, tensors: dict[str, Any], config: ServerConfig, run_id: str,
               sinks: Sequence[RoundSink] = ()) -> None:
    """Round record["round"] finished: its metrics line and sinks, then its checkpoint (`tensors` as
    server_tensors builds them)."""
    append_record(run_dir, record, sinks)
    save_server_checkpoint(run_dir, tensors, record["round"], config, run_id)


def restore_run(run_dir: Path, config: ServerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's tensors (server_tensors' tree) and metadata (round, run id), refused when `config`
    changed where it may not; metrics.jsonl keeps exactly the records of the checkpointed rounds."""
    check_resume(run_dir, config)
    tensors, meta = load_server_checkpoint(run_dir)
    keep_finished_records(run_dir, meta["round"])
    log.info("resumed run %s from %s after round %d", meta["run_id"], run_dir, meta["round"])
    return tensors, meta


def keep_finished_records(run_dir: Path, last_round: int) -> None:
    """Rewrite metrics.jsonl (atomically) with only the complete records of rounds up to `last_round`: a crash
    may have left the line of a round whose checkpoint did not land, or half a line."""
    metrics = Path(run_dir) / METRICS_FILE
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines() if _finished_record(line, last_round)]
        atomic_write_bytes(metrics, "".join(line + "\n" for line in kept).encode())


def _finished_record(line: str, last_round: int) -> bool:
    try:
        return json.loads(line)["round"] <= last_round
    except (ValueError, KeyError, TypeError):
        return False
