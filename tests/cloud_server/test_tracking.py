"""Tracking: a real two-round federation logs through ServerApp's sink to TensorBoard and MLflow (sqlite in
tmp_path), read back with each library's own reader and compared with metrics.jsonl; resume continues the
MLflow run and TensorBoard's steps; a missing extra stops `serve` before it writes anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedafd.cloud_server.tracking import MLFLOW_RUN_FILE, Tracking, flatten_record, open_tracking
from fedafd.runtime.config import ClientConfig, ServerConfig, build_config, config_to_dict
from fedafd.cloud_server.reporting.report import read_metrics

KINDS = ("image", "text", "multimodal")
ROUNDS = 2


def _offline_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from the test run
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture(scope="module")
def tracked(inproc_federation, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny FedAFD federation whose server logs every round to both sinks."""
    root = tmp_path_factory.mktemp("tracked")
    run_dir = root / "run-a"
    run_dir.mkdir()
    server_config = build_config(ServerConfig, dict(
        rounds=ROUNDS, baa=True, expected_clients=len(KINDS), min_clients=len(KINDS), public_size=48, feature_dim=16,
        image_arch="cnn_small", text_arch="gru", batch_size=16, device="cpu", join_timeout_s=60, round_deadline_s=120))
    clients = [build_config(ClientConfig, dict(kind=kind, max_private=48, max_test=32, batch_size=16,
                                               image_arch="cnn_small", text_arch="gru")) for kind in KINDS]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(server_config)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline_mlflow(monkeypatch)
        tracking = open_tracking(run_dir, config_to_dict(server_config), tensorboard=root / "tb", mlflow=uri)
        records, _, _ = inproc_federation(server_config, run_dir, clients, sinks=[tracking])
        tracking.close("FINISHED")
    return {"root": root, "run_dir": run_dir, "uri": uri, "records": records, "config": server_config}


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow_run(uri: str, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedafd")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


def test_tensorboard_has_every_rounds_numbers_from_metrics_jsonl(tracked) -> None:
    records = read_metrics(tracked["run_dir"] / "metrics.jsonl")
    assert records == tracked["records"]
    scalars = _scalars(tracked["root"] / "tb" / "run-a")
    first, second = records
    assert [step for step, _ in scalars["server/r1_sum"]] == [0, 1]  # step = round
    assert scalars["server/r1_sum"][0][1] == pytest.approx(first["server"]["r1_sum"], rel=1e-6)
    assert scalars["server/stage1_loss"][1][1] == pytest.approx(second["server"]["stage1_loss"], rel=1e-6)
    assert scalars["device/image-0/loss/task"][1][1] == pytest.approx(second["clients"]["image-0"]["losses"]["task"], rel=1e-6)
    assert scalars["device/text-0/top1"][0][1] == pytest.approx(first["clients"]["text-0"]["metrics"]["top1"], rel=1e-6)
    up = sum(sum(d["up"].values()) for d in first["bytes_by_part"].values())
    assert scalars["bytes/up/total"][0][1] == pytest.approx(up, rel=1e-6)
    assert scalars["device/multimodal-0/bytes/up/public_features"][0][1] == pytest.approx(
        first["bytes_by_part"]["multimodal-0"]["up"]["public_features"], rel=1e-6)
    assert scalars["device/multimodal-0/sed_weight/text"][1][1] == pytest.approx(
        second["sed_mean_weights"]["text"]["multimodal-0"], rel=1e-6)
    assert scalars["timings/stage3"][0][1] == pytest.approx(first["timings"]["stage3"], rel=1e-6)
    # The learning diagnostics: the server's under diagnostics/server/, each device's under device/<id>/diagnostics/.
    for tag, path in (("diagnostics/server/image/sed_entropy", ("diagnostics", "server", "image", "sed_entropy")),
                      ("diagnostics/server/text/teacher_cos", ("diagnostics", "server", "text", "teacher_cos")),
                      ("diagnostics/server/r1_sum_before_stage3", ("diagnostics", "server", "r1_sum_before_stage3")),
                      ("diagnostics/server/r1_sum_after_stage3", ("diagnostics", "server", "r1_sum_after_stage3")),
                      ("device/image-0/diagnostics/disc_acc_intra", ("clients", "image-0", "diagnostics", "disc_acc_intra")),
                      ("device/text-0/diagnostics/logit_norm", ("clients", "text-0", "diagnostics", "logit_norm")),
                      ("device/text-0/diagnostics/task_loss", ("clients", "text-0", "diagnostics", "task_loss")),
                      ("device/multimodal-0/diagnostics/text/gate2_mean",
                       ("clients", "multimodal-0", "diagnostics", "text", "gate2_mean")),
                      ("device/multimodal-0/diagnostics/image/upload_cos",
                       ("clients", "multimodal-0", "diagnostics", "image", "upload_cos"))):
        expected = []
        for record in records:
            for key in path:
                record = record[key]
            expected.append(record)
        assert [value for _, value in scalars[tag]] == pytest.approx(expected, rel=1e-6), tag
    assert scalars["diagnostics/server/r1_sum_after_stage3"][1][1] == pytest.approx(second["server"]["r1_sum"], rel=1e-6)
    assert not any(tag.startswith("device/image-0/diag_") for tag in scalars)  # never among the metrics
    assert sorted(scalars) == sorted(flatten_record(second))


def test_tensorboard_has_the_config_as_hparams_and_text(tracked) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(tracked["root"] / "tb" / "run-a"))
    events.Reload()
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["feature_dim"].number_value == 16 and hparams["strategy"].string_value == "fedafd"
    table = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| public_size | 48 |" in table


def test_mlflow_run_has_params_metrics_by_round_and_the_report(tracked, tmp_path: Path) -> None:
    records = tracked["records"]
    client, run = _mlflow_run(tracked["uri"], "run-a")
    assert run.info.status == "FINISHED"
    assert run.data.params["feature_dim"] == "16" and run.data.params["lr"] == "0.001"
    assert run.data.params["sed"] == "true" and run.data.params["strategy"] == "fedafd"
    history = client.get_metric_history(run.info.run_id, "server/r1_sum")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["server"]["r1_sum"]) for r in records]
    task = client.get_metric_history(run.info.run_id, "device/image-0/loss/task")
    assert [m.value for m in task] == [r["clients"]["image-0"]["losses"]["task"] for r in records]
    disc = client.get_metric_history(run.info.run_id, "device/text-0/diagnostics/disc_acc_cross")
    assert [m.value for m in disc] == [r["clients"]["text-0"]["diagnostics"]["disc_acc_cross"] for r in records]
    entropy = client.get_metric_history(run.info.run_id, "diagnostics/server/image/sed_entropy")
    assert [m.value for m in entropy] == [r["diagnostics"]["server"]["image"]["sed_entropy"] for r in records]
    up = client.get_metric_history(run.info.run_id, "bytes/up/public_features")
    assert [m.value for m in up] == [sum(d["up"]["public_features"] for d in r["bytes_by_part"].values()) for r in records]
    assert json.loads((tracked["run_dir"] / MLFLOW_RUN_FILE).read_text())["run_id"] == run.info.run_id

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"metrics.jsonl", "config.json", "report/report.json", "report/profile.png", "report/profile.md"} <= artifacts
    # Beside the database, not in the working directory.
    assert run.info.artifact_uri.startswith((tracked["root"] / "mlartifacts").as_uri())
    copy = Path(client.download_artifacts(run.info.run_id, "metrics.jsonl", str(tmp_path)))
    assert copy.read_text() == (tracked["run_dir"] / "metrics.jsonl").read_text()
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "report/report.json", str(tmp_path))).read_text())
    assert [row["server_rsum"] for row in report] == [r["server"]["rsum"] for r in records]


def test_resume_continues_the_mlflow_run_and_tensorboard_steps(tracked, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a run that logged both rounds and crashed (round 1 not checkpointed), resumed from round 1.
    _offline_mlflow(monkeypatch)
    run_dir, uri, tb = tmp_path / "run-b", tracked["uri"], tmp_path / "tb"  # the same store, another run
    run_dir.mkdir()
    first, second = tracked["records"]
    params = config_to_dict(tracked["config"])
    crashed = open_tracking(run_dir, params, tb, uri)
    crashed.log_round(first)
    crashed.log_round(second)
    crashed.close("FAILED")
    rerun = json.loads(json.dumps(second))
    rerun["server"]["r1_sum"] = second["server"]["r1_sum"] + 5.0

    # Execute
    resumed = open_tracking(run_dir, dict(params, rounds=5), tb, uri, resume=True)
    resumed.log_round(rerun)
    resumed.close("FINISHED")

    # Assert: one MLflow run, finished, both values at step 1; TensorBoard shows round 1 once, the re-run's.
    client, run = _mlflow_run(uri, "run-b")
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == str(params["rounds"])  # params keep what the run started with
    history = client.get_metric_history(run.info.run_id, "server/r1_sum")
    assert sorted((m.step, m.value) for m in history) == sorted(
        [(0, first["server"]["r1_sum"]), (1, second["server"]["r1_sum"]), (1, rerun["server"]["r1_sum"])])
    scalars = _scalars(tb / "run-b")
    assert [step for step, _ in scalars["server/r1_sum"]] == [0, 1]
    assert scalars["server/r1_sum"][1][1] == pytest.approx(rerun["server"]["r1_sum"], rel=1e-6)


def test_flatten_record_keys_and_sums() -> None:
    record = {
        "round": 3, "strategy": "fedafd", "quorum_met": True, "duplicates": 1, "public_size": 48,
        "selected": ["a", "b/c"], "dropped": {"b/c": "silent"}, "rejected": [],
        "server": {"r1_sum": 12.5, "distill_loss": 0.25},
        "clients": {"a": {"kind": "image", "metrics": {"top1": 40.0}, "losses": {"task": 1.5}, "train_seconds": 2.0,
                          "diagnostics": {"disc_acc_intra": 0.5, "image": {"gate1_mean": 0.75}}}},
        "diagnostics": {"server": {"image": {"sed_entropy": 0.25}, "r1_sum_before_stage3": 11.0}},
        "sed_mean_weights": {"image": {"a": 0.75}},
        "bytes_by_part": {"a": {"up": {"public_features": 100, "control": 10}, "down": {"global_tower": 7}},
                          "b/c": {"up": {"control": 5}, "down": {}}},
        "link": {"a": {"round_trip": 3.0, "compute": 2.0, "comm": 1.0, "num_params": 9.0}},
        "timings": {"stage1": 0.5}, "codecs": {"features": "fp32"},
    }
    assert flatten_record(record) == {
        "server/r1_sum": 12.5, "server/distill_loss": 0.25,
        "diagnostics/server/image/sed_entropy": 0.25, "diagnostics/server/r1_sum_before_stage3": 11.0,
        "device/a/top1": 40.0, "device/a/loss/task": 1.5, "device/a/train_seconds": 2.0,
        "device/a/diagnostics/disc_acc_intra": 0.5, "device/a/diagnostics/image/gate1_mean": 0.75,
        "device/a/link/round_trip": 3.0, "device/a/link/compute": 2.0, "device/a/link/comm": 1.0,
        "device/a/sed_weight/image": 0.75,
        "device/a/bytes/up/public_features": 100.0, "device/a/bytes/up/control": 10.0,
        "device/a/bytes/down/global_tower": 7.0, "device/b_c/bytes/up/control": 5.0,
        "bytes/up/public_features": 100.0, "bytes/up/control": 15.0, "bytes/up/total": 115.0,
        "bytes/down/global_tower": 7.0, "bytes/down/total": 7.0,
        "timings/stage1": 0.5,
        "round/selected": 2.0, "round/dropped": 1.0, "round/rejected": 0.0, "round/uploads": 1.0,
        "round/duplicates": 1.0, "round/quorum_met": 1.0, "round/public_size": 48.0,
    }


def test_a_failing_sink_is_switched_off_and_the_others_go_on(tracked) -> None:
    class Recording:
        name = "recording"

        def __init__(self):
            self.steps, self.status = [], None

        def log_scalars(self, scalars, step):
            self.steps.append(step)

        def close(self, status):
            self.status = status

    class Broken(Recording):
        name = "broken"

        def log_scalars(self, scalars, step):
            super().log_scalars(scalars, step)
            raise ConnectionError("tracking server gone")

    good, bad = Recording(), Broken()
    tracking = Tracking([bad, good])
    for record in tracked["records"]:
        tracking.log_round(record)
    tracking.close("FINISHED")
    assert good.steps == [0, 1] and good.status == "FINISHED"
    assert bad.steps == [0] and bad.status == "FAILED"


@pytest.mark.parametrize("option, extra, module", [("--tensorboard", "tensorboard", "tensorboard"),
                                                   ("--mlflow", "mlflow", "mlflow")])
def test_a_missing_extra_stops_serve_before_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           option: str, extra: str, module: str) -> None:
    from fedafd.cloud_server.cli import app

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec and import both fail
    result = CliRunner().invoke(app, ["serve", "--local", "image=1", "--out", str(tmp_path / "run"),
                                      option, str(tmp_path / "track")])
    assert result.exit_code == 2
    assert f"pip install 'fedafd[{extra}]'" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_serve_local_logs_to_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedafd.cloud_server.cli import app

    _offline_mlflow(monkeypatch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny = ["rounds=1", "public_size=48", "feature_dim=16", "image_arch=cnn_small", "text_arch=gru", "batch_size=16",
            "max_private=48", "max_test=32", "device=cpu", "join_timeout_s=120"]
    result = CliRunner().invoke(app, ["serve", "--local", "image=1", "--out", str(tmp_path / "run-c"),
                                      "--tensorboard", str(tmp_path / "tb"), "--mlflow", uri,
                                      *[arg for setting in tiny for arg in ("-c", setting)]])
    assert result.exit_code == 0, result.output
    (record,) = read_metrics(tmp_path / "run-c" / "metrics.jsonl")
    client, run = _mlflow_run(uri, "run-c")
    assert run.info.status == "FINISHED"
    assert run.data.params["local"] == "image=1" and run.data.params["rounds"] == "1"
    assert run.data.metrics["device/image-0/top1"] == record["clients"]["image-0"]["metrics"]["top1"]
    assert _scalars(tmp_path / "tb" / "run-c")["server/rsum"][0] == (0, pytest.approx(record["server"]["rsum"], rel=1e-6))
