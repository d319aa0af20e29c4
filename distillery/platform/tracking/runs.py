"""MLflow tracking: where runs go, what is logged, and a small logger for the training worker.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else a sqlite file under
the local run directory (the embedded default). A sqlite store keeps its artifacts beside it
(:func:`experiment_artifact_location`). The driver creates the run and logs the
flattened config (secrets masked by :func:`flatten_config`); rank 0 of the training workers
logs per-step and per-epoch metrics into that run by id; the driver logs the final artefacts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

__all__ = ["MetricsLogger", "create_run", "experiment_artifact_location", "log_best_metrics", "resolve_tracking_uri",
           "tracking_reachable", "tracking_uri_scope"]

log = logging.getLogger(__name__)

# MLflow limits a param value to 6000 characters and a batch to 100 params.
_PARAM_MAX = 6000


def resolve_tracking_uri(configured: str | None, local_dir: str | os.PathLike) -> str:
    """Config > MLFLOW_TRACKING_URI > sqlite file in ``local_dir``. A relative sqlite path
    (``sqlite:///runs/mlflow.db``) is made absolute here: the workers run in other directories."""
    if configured:
        return _absolute_sqlite(configured)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return _absolute_sqlite(env)
    path = Path(local_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


@contextlib.contextmanager
def tracking_uri_scope(uri: str):
    """MLflow's fluent API (``mlflow.register_model``, ``mlflow.start_run``, ``models:/`` loading)
    pointed at ``uri`` for the block only. ``mlflow.set_tracking_uri`` also exports
    MLFLOW_TRACKING_URI into ``os.environ``; left there, the next job run in the same process
    (a sweep's promotion, then a distillation run) would send its run to this store, or to a
    server that has gone away since."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None: back to MLflow's default
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    return uri


def experiment_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go. For a sqlite store: a folder beside the database,
    named after it (``runs/mlflow.db`` -> ``runs/mlflow-artifacts/<experiment>``), so that models
    live with the store that lists them; MLflow's own default would be ``./mlruns`` of whatever
    directory the job started in, shared by every sqlite store used from there. None (the
    server's default artifact root) for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve()
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / f"{db.stem}-artifacts" / folder).as_uri()


def log_best_metrics(metrics: dict[str, Any]) -> None:
    """The best checkpoint's numeric, non-NaN metrics, logged to the active MLflow run as
    ``best/<name>`` (what the registry and the sweep report read)."""
    mlflow.log_metrics({f"best/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v})


def tracking_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise a clear error if an HTTP tracking server does not answer (before any work starts)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"MLflow tracking server {uri} is not reachable: {exc}") from None


def create_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, str],
               tags: dict[str, str] | None = None, artifact_location: str | None = None,
               parent_run_id: str | None = None) -> str:
    """Create an MLflow run (not left active in this process) and log params; return its id."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = artifact_location or experiment_artifact_location(tracking_uri, experiment)
        exp_id = client.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    items = [Param(k, v[:_PARAM_MAX]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


class MetricsLogger:
    """Buffered metric logging into an existing run (used on rank 0 of the training workers)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 50):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self._buffer: list[Any] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            v = float(v)
            if v != v:  # NaN metrics (e.g. an AP with no ground truth in that size range) are skipped
                continue
            self._buffer.append(Metric(k, v, now, int(step)))
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer.clear()

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    """Every run whose ``mlflow.parentRunId`` tag is ``parent_run_id`` (all experiments of the parent)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=10000)


def finish_sweep_runs(tracking_uri: str, parent_run_id: str, status: str, reason: str) -> int:
    """Close child runs still marked RUNNING (their trial was stopped or interrupted); return how many."""
    client = MlflowClient(tracking_uri)
    closed = 0
    for run in child_runs(tracking_uri, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "distillery.stopped", reason)
            client.set_terminated(run.info.run_id, status)
            closed += 1
    return closed
