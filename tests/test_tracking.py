"""MLflow's fluent API used by the platform (register, load a champion, log a run's final
artefacts) must not leave its tracking URI behind in the process: ``mlflow.set_tracking_uri``
exports MLFLOW_TRACKING_URI, and the next job in the same process would log there."""

import os

import mlflow

from distillery.platform.tracking.runs import create_run, resolve_tracking_uri, tracking_uri_scope


def test_scope_leaves_no_tracking_uri_behind(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'scoped.db'}"
    run_id = create_run(uri, "scope", "run", {"a": "1"}, {})
    with tracking_uri_scope(uri):
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metric("m", 1.0)
        assert mlflow.get_tracking_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    # The next job in this process resolves its own default store, not the scoped one.
    assert resolve_tracking_uri(None, tmp_path / "next") == f"sqlite:///{(tmp_path / 'next').resolve() / 'mlflow.db'}"
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics["m"] == 1.0


def test_scope_restores_a_uri_the_user_had_set(tmp_path, monkeypatch):
    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mine)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with tracking_uri_scope(f"sqlite:///{tmp_path / 'other.db'}"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == mine
    assert mlflow.get_tracking_uri() == mine
