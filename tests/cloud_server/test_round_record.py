"""The round record from a hand-built outcome: the quorum rule, link times, every field metrics.jsonl gets."""

from __future__ import annotations

import json
import time

import pytest

from fedafd.cloud_server.admission import ClientRecord
from fedafd.cloud_server.round_record import (
    Drop, DropReason, RoundFacts, RoundOutcome, link_times, quorum_met, round_record, timed,
)
from fedafd.runtime.accounting import ByteCounter
from fedafd.runtime.wire import FeatureUpload


def _upload(client_id: str, train_seconds: float, **metrics: float) -> FeatureUpload:
    return FeatureUpload(round=2, client_id=client_id, features={}, metrics=metrics, losses={"task": 0.5},
                         train_seconds=train_seconds)


def _client(client_id: str, kind: str, sent_at: float) -> ClientRecord:
    return ClientRecord(client_id, kind, {}, 10, 0, round_start_sent_at=sent_at)


@pytest.mark.parametrize("uploads, selected, quorum, met", [
    (0, 0, 0.0, False),  # no upload never makes a round, whatever the quorum
    (0, 3, 0.0, False),
    (1, 2, 0.5, True),
    (1, 3, 0.5, False),  # ceil(1.5) = 2
    (2, 3, 0.5, True),
    (2, 3, 1.0, False),
    (3, 3, 1.0, True),
])
def test_quorum_is_the_ceiling_of_its_share_and_at_least_one(uploads, selected, quorum, met) -> None:
    assert quorum_met(uploads, selected, quorum) is met


def test_link_times_split_the_round_trip_into_the_devices_compute_and_the_rest() -> None:
    # Prepare: RoundStart handed over at t=10 to both; uploads at t=12.5 and t=13.
    outcome = RoundOutcome(uploads={"a": _upload("a", 9.0, compute_seconds=2.0, num_params=7.0),
                                    "b": _upload("b", 4.0), "gone": _upload("gone", 1.0)},
                           arrived_at={"a": 12.5, "b": 13.0, "gone": 11.0})
    clients = {"a": _client("a", "image", 10.0), "b": _client("b", "text", 10.0)}
    # Execute
    times = link_times(outcome, clients)
    # Assert: compute is the device's own count (else its training time); comm never negative; a device no
    # longer joined is left out.
    assert times == {"a": {"round_trip": 2.5, "compute": 2.0, "comm": 0.5, "num_params": 7.0},
                     "b": {"round_trip": 3.0, "compute": 4.0, "comm": 0.0, "num_params": 0.0}}


def test_the_record_holds_every_field_of_the_round_and_only_its_bytes() -> None:
    # Prepare: two uploads (one from a device gone since), a straggler, bytes of rounds 1 and 2.
    # Device a's diagnostics ride in its metrics under diag_ keys.
    outcome = RoundOutcome(uploads={"a": _upload("a", 1.0, top1=80.0, **{"diag_disc_acc_intra": 0.75,
                                                                          "diag_image.gate1_mean": 0.25}),
                                    "gone": _upload("gone", 1.0)},
                           dropped={"c": Drop(DropReason.DEADLINE, "no upload by the round deadline (round_deadline_s=9)")},
                           arrived_at={"a": 11.0}, duplicates=1)
    counter = ByteCounter()
    counter.add(2, "a", "up", "feature_upload", 100)
    counter.add_parts(2, "a", "up", {"public_features": 90, "control": 10})
    counter.add(1, "a", "up", "feature_upload", 55)
    rejected = [{"peer": "x", "code": "unknown_client", "reason": "..."}]
    # Execute
    record = round_record(RoundFacts(
        round=2, strategy="fedafd", outcome=outcome, clients={"a": _client("a", "image", 10.0)}, selected=["a", "c"],
        server={"r1_sum": 3.0, "stage1_loss": 1.5, "distill_loss": 0.25}, sed_mean_weights={"image": {"a": 1.0}},
        rejected=rejected, quorum=True, public_size=64, counter=counter, codecs={"features": "fp16", "tower": "fp32"},
        timings={"stage1": 0.5}, server_diagnostics={"image": {"sed_entropy": 0.5}, "r1_sum_before_stage3": 2.0}))
    # Assert
    assert record == {
        "round": 2, "strategy": "fedafd",
        "clients": {"a": {"kind": "image", "metrics": {"top1": 80.0}, "losses": {"task": 0.5},
                          "diagnostics": {"disc_acc_intra": 0.75, "image": {"gate1_mean": 0.25}, "task_loss": 0.5},
                          "train_seconds": 1.0},
                    "gone": {"kind": "?", "metrics": {}, "losses": {"task": 0.5}, "diagnostics": {"task_loss": 0.5},
                             "train_seconds": 1.0}},
        "server": {"r1_sum": 3.0, "stage1_loss": 1.5, "distill_loss": 0.25},
        "diagnostics": {"server": {"image": {"sed_entropy": 0.5}, "r1_sum_before_stage3": 2.0}},
        "sed_mean_weights": {"image": {"a": 1.0}},
        "selected": ["a", "c"],
        "dropped": {"c": "no upload by the round deadline (round_deadline_s=9)"},
        "rejected": rejected, "quorum_met": True, "duplicates": 1, "public_size": 64,
        "bytes": {"a": {"up": {"feature_upload": 100}, "down": {}}},
        "bytes_by_part": {"a": {"up": {"public_features": 90, "control": 10}, "down": {}}},
        "codecs": {"features": "fp16", "tower": "fp32"},
        "link": {"a": {"round_trip": 1.0, "compute": 1.0, "comm": 0.0, "num_params": 0.0}},
        "timings": {"stage1": 0.5},
    }
    assert json.loads(json.dumps(record)) == record  # what metrics.jsonl holds


def test_timed_records_the_seconds_of_its_block() -> None:
    timings: dict[str, float] = {}
    with timed(timings, "stage3"):
        time.sleep(0.05)
    assert 0.05 <= timings["stage3"] < 5
    with timed(timings, "stage3"):  # a stage timed in two blocks (stage 3 around the diagnostics) adds up
        time.sleep(0.05)
    assert 0.1 <= timings["stage3"] < 10
