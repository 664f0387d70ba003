"""The chaos soak's checks, by hand on a made-up run folder, and its --short variant end to end (real
`serve` and `join` processes SIGKILLed and restarted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedafd.benchmarks.chaos import SERVER_SETTING, SHORT, Federation, check, run_federation
from fedafd.cloud_server.fleet import parse_fleet


def _record(round_: int, clients: list[str]) -> str:
    return json.dumps({"round": round_, "clients": {c: {"kind": c.split("-")[0], "metrics": {}} for c in clients},
                       "dropped": {}, "duplicates": 0, "server": {"r1_sum": 0.0, "rsum": 0.0},
                       "bytes": {}, "timings": {}})


def _made_up_run(tmp_path: Path, record_1: list[str]) -> Federation:
    """Two server processes: the first accepted rounds 0 and 1 but was killed after committing round 0;
    the second ran round 1 again and committed it."""
    fed = Federation(tmp_path, {"image": 1, "text": 1}, dict(SERVER_SETTING))
    fed.servers_started = 2
    fed.devices = {"image-0": None, "text-0": None}
    (tmp_path / "metrics.jsonl").write_text(_record(0, ["image-0", "text-0"]) + "\n" + _record(1, record_1) + "\n")
    fed.server_log(0).write_text("x fedafd.cloud INFO round 0: accepted upload a0 from image-0\n"
                                 "x fedafd.cloud INFO round 0: accepted upload t0 from text-0\n"
                                 "x fedafd.cloud INFO round 1: accepted upload a1 from image-0\n")
    fed.server_log(1).write_text("x fedafd.cloud INFO round 1: accepted upload a1b from image-0\n"
                                 "x fedafd.cloud INFO round 1: accepted upload t1 from text-0\n")
    for cid, uploads in (("image-0", [(0, "a0"), (1, "a1"), (1, "a1b")]), ("text-0", [(0, "t0"), (1, "t1")])):
        fed.device_log(cid).parent.mkdir(parents=True, exist_ok=True)
        fed.device_log(cid).write_text("".join(f"x fedafd.edge INFO {cid} round {r}: upload {u} acknowledged\n"
                                               for r, u in uploads))
    return fed


def test_check_voids_uploads_of_a_killed_server_and_finds_a_lost_one(tmp_path: Path) -> None:
    # Prepare: round 1's record holds what the second server accepted.
    fed = _made_up_run(tmp_path / "good", ["image-0", "text-0"])

    # Execute
    good = check(fed, rounds=2, committed_by=[0, 1])

    # Assert: the first server's round-1 upload is void (it died before committing), nothing is lost.
    assert good["exactly_once"] and good["no_upload_lost"], good
    assert good["accepted"] == 5 and good["acks_logged"] == 5
    assert good["voided"] == ["round 1: image-0 (a1, server process 0)"]

    # A record that misses an upload the committing server acknowledged is a loss.
    lossy = check(_made_up_run(tmp_path / "lossy", ["image-0"]), rounds=2, committed_by=[0, 1])
    assert not lossy["no_upload_lost"] and lossy["lost"] == ["round 1: text-0"]

    # A device's Ack that no server logged accepting is flagged too.
    fed = _made_up_run(tmp_path / "ghost", ["image-0", "text-0"])
    with open(fed.device_log("text-0"), "a") as log:
        log.write("x fedafd.edge INFO text-0 round 1: upload zz acknowledged\n")
    ghost = check(fed, rounds=2, committed_by=[0, 1])
    assert ghost["acks_unmatched"] == ["text-0 round 1: zz"] and not ghost["no_upload_lost"]

    # A round recorded twice is not exactly once.
    with open(fed.run_dir / "metrics.jsonl", "a") as handle:
        handle.write(_record(1, ["image-0", "text-0"]) + "\n")
    assert check(fed, rounds=2, committed_by=[0, 1])["exactly_once"] is False


@pytest.mark.slow
def test_short_chaos_soak_records_every_round_once_and_loses_no_upload(tmp_path: Path) -> None:
    # Execute: 4 devices, 5 rounds, one device in four killed every round, the server killed once.
    result = run_federation(tmp_path / "chaos", parse_fleet(SHORT["fleet"]), SHORT["rounds"], seed=0,
                            kill_fraction=0.3, server_kills=SHORT["server_kills"], timeout_s=400)

    # Assert: the kills happened, every round is recorded once, and every acknowledged upload of a
    # committed round is in its record (the server's kill voided the uploads of the round it was in).
    server_kills = [e for e in result["events"] if e["kill"] == "server"]
    device_kills = [e for e in result["events"] if e["kill"] != "server"]
    assert len(server_kills) == 1 and len(device_kills) >= 3, result["events"]
    assert result["exactly_once"], result["rounds_recorded"]
    assert result["no_upload_lost"], {k: result[k] for k in ("lost", "extra_in_record", "acks_unmatched")}
    assert result["accepted"] == result["uploads_recorded"] + len(result["voided"])
