"""Experiment tracking: each round's metrics.jsonl record, flattened once into `group/.../name` scalars,
also goes to TensorBoard event files and/or an MLflow run (optional extras `fedafd[tensorboard]`,
`fedafd[mlflow]`). metrics.jsonl stays the source of truth: a sink that fails is logged and switched off,
the federation goes on."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from fedafd.runtime.errors import FedafdError

log = logging.getLogger("fedafd.cloud")

EXTRAS = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}
"""Extra -> the modules it installs that tracking imports (MLflow's sqlite store needs SQLAlchemy and alembic)."""
MLFLOW_RUN_FILE = "mlflow_run.json"
"""In the run folder: the tracking URI and run id, so `serve --resume` continues the same MLflow run."""
DEFAULT_EXPERIMENT = "fedafd"
"""The MLflow experiment unless MLFLOW_EXPERIMENT_NAME names another."""
HPARAM_METRICS = ("server/r1_sum", "server/rsum")
"""Scalars TensorBoard's HParams tab shows beside the config."""


class TrackingError(FedafdError):
    """A tracking sink cannot start; the message names the option or the package."""


class RoundSink(Protocol):
    """What ServerApp calls after each round's JSONL line."""

    def log_round(self, record: dict) -> None: ...


class Sink(Protocol):
    """One tracking backend, fed the flattened scalars."""

    name: str

    def log_scalars(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED (MLflow's run statuses)."""


def require_extras(*extras: str) -> None:
    """Fails before anything is written when an extra's packages are missing (without importing them)."""
    missing = [extra for extra in extras if any(importlib.util.find_spec(m) is None for m in EXTRAS[extra])]
    if missing:
        raise TrackingError("; ".join(f"--{extra} needs the {extra} packages: pip install 'fedafd[{extra}]'"
                                      for extra in missing))


def _key(part: str) -> str:
    """A client id as one key segment: MLflow allows letters, digits, '_', '-', '.', ' ', '/', ':' only."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in part)


def flatten_record(record: dict) -> dict[str, float]:
    """One round's record as the scalars every sink logs: the server's retrieval and stage losses, its
    learning diagnostics (diagnostics/server/...), each device's metrics, loss parts, learning diagnostics
    (device/<id>/diagnostics/...), bytes by direction and part, link times and SED weights (under
    device/<id>/), the round's bytes by direction and part over all devices, stage timings, counts.
    No key is also the prefix of another (MLflow's file store keeps each key as a file)."""
    flat: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, (bool, int, float)):
            flat[key] = float(value)

    def put_tree(prefix: str, tree: dict) -> None:
        """Nested diagnostics ({name: v, modality: {name: v}}) as prefix/name and prefix/modality/name."""
        for name, value in tree.items():
            if isinstance(value, dict):
                put_tree(f"{prefix}/{_key(name)}", value)
            else:
                put(f"{prefix}/{_key(name)}", value)

    for name, value in record["server"].items():
        put(f"server/{name}", value)
    put_tree("diagnostics/server", record.get("diagnostics", {}).get("server", {}))
    for cid, client in record["clients"].items():
        device = f"device/{_key(cid)}"
        for name, value in client["metrics"].items():
            put(f"{device}/{name}", value)
        for part, value in client["losses"].items():
            put(f"{device}/loss/{part}", value)
        put_tree(f"{device}/diagnostics", client.get("diagnostics", {}))
        put(f"{device}/train_seconds", client["train_seconds"])
    for cid, link in record.get("link", {}).items():
        for name in ("round_trip", "compute", "comm"):
            put(f"device/{_key(cid)}/link/{name}", link.get(name))
    for modality, weights in record.get("sed_mean_weights", {}).items():
        for cid, weight in weights.items():
            put(f"device/{_key(cid)}/sed_weight/{modality}", weight)
    totals: dict[str, float] = defaultdict(float)
    for cid, directions in record.get("bytes_by_part", {}).items():
        for direction, parts in directions.items():
            for part, nbytes in parts.items():
                put(f"device/{_key(cid)}/bytes/{direction}/{part}", nbytes)
                totals[f"bytes/{direction}/{part}"] += nbytes
                totals[f"bytes/{direction}/total"] += nbytes
    flat.update(totals)
    for stage, seconds in record["timings"].items():
        put(f"timings/{stage}", seconds)
    for name in ("selected", "dropped", "rejected"):
        put(f"round/{name}", len(record.get(name, ())))
    put("round/uploads", len(record["clients"]))
    for name in ("duplicates", "quorum_met", "public_size"):
        put(f"round/{name}", record.get(name))
    return flat


class Tracking:
    """The server's one round sink: flattens each record once and hands it to every backend."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)
        self._off: set[str] = set()

    def log_round(self, record: dict) -> None:
        scalars = flatten_record(record)
        for sink in self.sinks:
            if sink.name in self._off:
                continue
            try:
                sink.log_scalars(scalars, step=record["round"])
            except Exception as err:  # tracking is a copy of metrics.jsonl; losing it must not stop the federation
                log.warning("tracking to %s failed at round %d (%s: %s); it is off for the rest of the run, "
                            "metrics.jsonl has every round", sink.name, record["round"], type(err).__name__, err)
                self._off.add(sink.name)

    def close(self, status: str = "FINISHED") -> None:
        for sink in self.sinks:
            try:
                sink.close(status if sink.name not in self._off else "FAILED")
            except Exception as err:  # as above: never hide the run's own outcome
                log.warning("closing tracking to %s failed (%s: %s)", sink.name, type(err).__name__, err)
        self.sinks = []


def open_tracking(run_dir: Path, params: dict[str, Any], tensorboard: Path | None = None,
                  mlflow: str | None = None, resume: bool = False) -> Tracking:
    """The sinks `serve --tensorboard DIR --mlflow URI` asked for; params are the run's config."""
    sinks: list[Sink] = []
    if tensorboard is not None:
        sinks.append(TensorBoardSink(tensorboard / run_dir.name, params, resume))
    if mlflow is not None:
        sinks.append(MlflowSink(mlflow, run_dir, params, resume))
    return Tracking(sinks)


class TensorBoardSink:
    """Event files in LOG_DIR (one folder per run, so `tensorboard --logdir DIR` lists runs side by side),
    step = round; the config as HParams and as a text table."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, params: dict[str, Any], resume: bool):
        from torch.utils.tensorboard import SummaryWriter  # a broken install fails here, at start-up

        self.log_dir, self.params, self.resume = log_dir, params, resume
        self.writer: SummaryWriter | None = None  # opened at the first round, whose number a resume needs

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, purge_step hides what an earlier process logged from this round on (a round that
            # crashed after its metrics line and is re-run), so every step shows once.
            self.writer = SummaryWriter(str(self.log_dir), purge_step=step if self.resume else None)
            if not self.resume:
                self._write_params()
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # visible to a live `tensorboard` now, not after flush_secs

    def _write_params(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in self.params.items()}
        for summary in hparams(plain, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(plain.items()))
        self.writer.add_text("config", "| setting | value |\n|---|---|\n" + rows)

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _artifacts_beside(uri: str) -> str | None:
    """For a sqlite URI, artifacts go next to the database (MLflow's default is ./mlruns under the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(unquote(uri[len("sqlite:///"):])).resolve()
    return (database.parent / "mlartifacts").as_uri()


class MlflowSink:
    """One MLflow run per run folder (its id kept in RUN_DIR/mlflow_run.json): config as params, every
    round's scalars at step = round, and at the end metrics.jsonl, config.json and the run's report
    (the rows of `fedafd-cloud report --format json`, the `profile` files) as artifacts."""

    name = "mlflow"

    def __init__(self, uri: str, run_dir: Path, params: dict[str, Any], resume: bool):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports leave the machine unasked
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store unless told; naming a folder here is that choice.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.uri, self.run_dir = uri, run_dir
        self.client = MlflowClient(tracking_uri=uri)
        try:
            run = (self._continued() if resume else None) or self._new_run()
            self.run_id = run.info.run_id
            logged = run.data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != _param_value(v))
            if changed:
                log.warning("MLflow run %s keeps the params it started with; now different: %s", self.run_id, changed)
            self._log_params({k: v for k, v in params.items() if k not in logged})
        except MlflowException as err:
            raise TrackingError(f"--mlflow {uri}: {err.message}") from None
        (run_dir / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def _new_run(self):
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(name, artifact_location=_artifacts_beside(self.uri)))
        return self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                      tags={"fedafd.run_dir": str(self.run_dir.resolve())})

    def _continued(self):
        """The run this folder logged to before, if it is in this tracking store; else None (a new run)."""
        from mlflow.exceptions import MlflowException

        path = self.run_dir / MLFLOW_RUN_FILE
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        if saved["tracking_uri"] != self.uri:
            log.warning("%s logged to %s, --mlflow is %s: starting a new MLflow run", path, saved["tracking_uri"], self.uri)
            return None
        try:
            run = self.client.get_run(saved["run_id"])
        except MlflowException:
            log.warning("MLflow run %s from %s is not in %s: starting a new one", saved["run_id"], path, self.uri)
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, status: str) -> None:
        from fedafd.cloud_server.reporting.bandwidth import write_profile
        from fedafd.cloud_server.reporting.report import CONFIG_FILE, METRICS_FILE, read_metrics, summarize_round

        for name in (METRICS_FILE, CONFIG_FILE):
            if (self.run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / METRICS_FILE).exists():
            with tempfile.TemporaryDirectory() as tmp:
                rows = [summarize_round(r) for r in read_metrics(self.run_dir / METRICS_FILE)]
                (Path(tmp) / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
                write_profile(self.run_dir, Path(tmp))
                self.client.log_artifacts(self.run_id, tmp, artifact_path="report")
        self.client.set_terminated(self.run_id, status)
