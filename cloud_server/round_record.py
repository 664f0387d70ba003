"""What one round leaves behind: its outcome while the uploads are collected (who uploaded, who was dropped
and why), the quorum rule, the stage timings, and the record that metrics.jsonl, the tracking sinks and the
reports read."""

from __future__ import annotations

import contextlib
import enum
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.diagnostics import split_diagnostics
from fedafd.runtime.wire import FeatureUpload

if TYPE_CHECKING:
    from fedafd.cloud_server.admission import ClientRecord


class DropReason(enum.StrEnum):
    """Why a selected device has no upload in a round."""

    NOT_CONNECTED = "not_connected"
    """Its connection was gone when the round started."""
    DEADLINE = "deadline"
    """No upload by round_deadline_s: a straggler, the only drop that stays joined for the next round."""
    PROCESS_EXITED = "process_exited"
    """A --local device's process ended."""
    SILENT = "silent"
    """No heartbeat or upload for heartbeat_timeout_s."""
    LEFT = "left"
    """It said Bye."""


@dataclass(frozen=True)
class Drop:
    reason: DropReason
    text: str
    """The reason with its numbers, as the log and metrics.jsonl say it."""


@dataclass
class RoundOutcome:
    uploads: dict[str, FeatureUpload] = field(default_factory=dict)
    """Client id -> its accepted upload (the features already folded into the teachers, not kept)."""
    dropped: dict[str, Drop] = field(default_factory=dict)  # client id -> why
    arrived_at: dict[str, float] = field(default_factory=dict)  # client id -> time.monotonic() of its upload
    duplicates: int = 0
    """Uploads acknowledged but ignored: a resend of an accepted message id, or a second upload."""


def quorum_met(uploads: int, selected: int, quorum: float) -> bool:
    """At least ceil(quorum x selected) uploads, and at least one: only then does stage 3 distil."""
    return uploads >= math.ceil(quorum * selected) and uploads > 0


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """timings[stage] += the seconds the block took (a stage timed in two blocks gets their sum)."""
    started = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


def link_times(outcome: RoundOutcome, clients: dict[str, ClientRecord]) -> dict[str, dict[str, float]]:
    """Per client: seconds from handing it RoundStart to receiving its upload (`round_trip`), of which the
    device reports `compute` (training, evaluation, feature extraction); the rest is `comm` (the
    downlink and uplink transfers on its link, shaped or real, plus waiting)."""
    out = {}
    for cid, upload in outcome.uploads.items():
        if cid not in clients or cid not in outcome.arrived_at:
            continue
        round_trip = outcome.arrived_at[cid] - clients[cid].round_start_sent_at
        compute = float(upload.metrics.get("compute_seconds", upload.train_seconds))
        out[cid] = {"round_trip": round_trip, "compute": compute, "comm": max(round_trip - compute, 0.0),
                    "num_params": float(upload.metrics.get("num_params", 0.0))}
    return out


@dataclass
class RoundFacts:
    """What one round produced, gathered by the round loop for its record (one typed argument, not fourteen)."""

    round: int
    strategy: str
    outcome: RoundOutcome
    """The uploads, drops and duplicates the collect stage ended with."""
    clients: dict[str, ClientRecord]
    """The joined devices (their kinds and link times)."""
    selected: list[str]
    server: dict[str, float]
    """The server's retrieval metrics and losses."""
    sed_mean_weights: dict[str, dict[str, float]]
    rejected: list[dict]
    quorum: bool
    public_size: int
    counter: ByteCounter
    codecs: dict[str, str]
    timings: dict[str, float]
    server_diagnostics: dict = field(default_factory=dict)


def round_record(facts: RoundFacts) -> dict:
    """The round's line of metrics.jsonl: per uploading client its kind, metrics, losses and learning
    diagnostics (the upload's `diag_` metrics, filed apart so means of metrics by kind never see them, plus
    its task loss as `task_loss`); the server's retrieval and losses (`server`) and its learning diagnostics
    (`diagnostics.server`); stage 3's mean SED weight per modality and client; who was selected, dropped (with
    the reason's text) and refused; the bytes of the round by message type and by what they carried; each
    client's link times; the server's stage timings. docs/implementation.md "Learning diagnostics" lists the
    diagnostics."""
    f, round_, outcome, clients = facts, facts.round, facts.outcome, facts.clients
    return {
        "round": round_,
        "strategy": f.strategy,
        "clients": {cid: _client_entry(clients[cid].kind if cid in clients else "?", u)
                    for cid, u in outcome.uploads.items()},
        "server": f.server,
        "diagnostics": {"server": dict(f.server_diagnostics)},
        "sed_mean_weights": f.sed_mean_weights,
        "selected": f.selected,
        "dropped": {cid: drop.text for cid, drop in outcome.dropped.items()},
        "rejected": f.rejected,
        "quorum_met": f.quorum,
        "duplicates": outcome.duplicates,
        "public_size": f.public_size,
        "bytes": f.counter.for_round(round_),
        "bytes_by_part": f.counter.parts_for_round(round_),
        "codecs": f.codecs,
        "link": link_times(outcome, clients),
        "timings": f.timings,
    }


def _client_entry(kind: str, upload: FeatureUpload) -> dict:
    """One client's part of the record: its task metrics and its diagnostics apart."""
    metrics, diagnostics = split_diagnostics(dict(upload.metrics))
    if "task" in upload.losses:  # the task loss travels as a loss part; here it sits beside the diagnostics too
        diagnostics["task_loss"] = upload.losses["task"]
    return {"kind": kind, "metrics": metrics, "losses": dict(upload.losses), "diagnostics": diagnostics,
            "train_seconds": upload.train_seconds}
