"""The sweep job end to end against a real `mlflow server`: a tiny `gam: auto` sweep with ASHA is
interrupted after its first trial and resumed, then the registry promotes, refuses and rolls back.

One sweep feeds every check (it is the expensive part): interruption and restore, parent/child
runs, the results table and plots, then promotion decisions on the trials' real models.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, wait_for_http

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1: sqlite backend store, artifacts proxied to a local directory."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(uri + "/health", timeout=120, proc=proc)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def run_job(args, env=None, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sweep(mlflow_server, synthetic_data, tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    trial_overrides = [f"data.root={synthetic_data}", f"cache.uri={tiny_cache}", "train.num_workers=1",
                       "train.epochs=1", "debug.max_steps_per_epoch=2", "tracking.num_val_images=0"]
    args = ["jobs/sweep.py", "--config", "configs/sweep_tiny.yaml", f"trial.overrides={json.dumps(trial_overrides)}",
            f"tracking.tracking_uri={mlflow_server}", f"sweep.storage_path={out / 'sweeps'}", "sweep.name=tiny",
            f"output.local_dir={out / 'local'}", "sweep.num_samples=2", "sweep.max_concurrent_trials=1"]
    first = run_job([*args, "debug.interrupt_after_trials=1"])
    assert first.returncode == 130, first.stdout[-3000:] + first.stderr[-6000:]
    interrupted = last_json(first.stdout)
    assert interrupted["interrupted"] and interrupted["sweep_path"] == str(out / "sweeps" / "tiny")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    parent = interrupted["parent_run_id"]
    assert client.get_run(parent).info.status == "KILLED"
    done_before = {r.data.tags["distillery.trial_id"]: r.info.run_id for r in _children(client, parent)
                   if r.data.tags.get("distillery.sweep_role") == "trial" and r.info.status == "FINISHED"}
    assert len(done_before) >= 1

    second = run_job(["jobs/sweep.py", "--resume", interrupted["sweep_path"]])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-6000:]
    summary = last_json(second.stdout)
    return {"summary": summary, "client": client, "done_before": done_before, "uri": mlflow_server,
            "out": out, "synthetic": synthetic_data}


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_sweep_interrupted_and_resumed(sweep):
    s, client = sweep["summary"], sweep["client"]
    parent = client.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["distillery.sweep_role"] == "parent"
    children = _children(client, s["parent_run_id"])
    roles = [c.data.tags.get("distillery.sweep_role") for c in children]
    assert roles.count("calibration") == 1  # calibrated once, not again on resume
    trials = [c for c in children if c.data.tags.get("distillery.sweep_role") == "trial"]
    trial_ids = {c.data.tags["distillery.trial_id"] for c in trials}
    assert len(trial_ids) == 2 and len(s["trials"]) == 2
    # Trials finished before the interruption were not run again.
    for trial_id, run_id in sweep["done_before"].items():
        assert [c.info.run_id for c in trials if c.data.tags["distillery.trial_id"] == trial_id] == [run_id]
    # No child is left RUNNING: finished, closed as stopped by ASHA / the interruption, or failed
    # by the interruption's SIGINT; every trial has one run that ended normally or by ASHA.
    assert all(c.info.status in ("FINISHED", "KILLED", "FAILED") for c in children)
    for trial_id in trial_ids:
        assert any(c.info.status in ("FINISHED", "KILLED") for c in trials
                   if c.data.tags["distillery.trial_id"] == trial_id), trial_id
    for c in trials:
        assert c.data.tags["mlflow.parentRunId"] == s["parent_run_id"]
        assert "epoch/AP" in c.data.metrics and "gam.rho" not in c.data.tags
        assert 0 < float(c.data.params["gam.delta"]) < float(c.data.params["gam.rho"])
    # gam: auto centred rho on the calibration's measured AIFI share.
    share = s["calibration"]["aifi_share"]
    assert 0 < share < 1
    for row in s["trials"]:
        assert share * 0.8 - 1e-12 <= row["gam.rho"] <= share * 1.2 + 1e-12
        assert 0.05 * row["gam.rho"] - 1e-12 <= row["gam.delta"] <= 0.15 * row["gam.rho"] + 1e-12
    artifacts = {a.path for a in client.list_artifacts(s["parent_run_id"])}
    assert "results.csv" in artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(s["parent_run_id"], "plots")}
    assert {"ap_vs_rho_delta.png", "parallel_coordinates.png"} <= plots
    assert parent.data.tags["distillery.best_run_id"] == s["best"]["run_id"]


def test_promotion_refusal_and_rollback(sweep):
    from distillery.platform.tracking.registry import RegistryError, load_champion, promote_run, rollback

    s, client, uri = sweep["summary"], sweep["client"], sweep["uri"]
    finished = sorted((c for c in _children(client, s["parent_run_id"])
                       if c.data.tags.get("distillery.sweep_role") == "trial" and c.info.status == "FINISHED"),
                      key=lambda c: c.data.metrics["best/AP"])
    assert len(finished) >= 1
    best = client.get_run(s["best"]["run_id"])
    name = "rtdetrv4-tiny"
    env = {"MLFLOW_TRACKING_URI": uri}

    # A run without a model (the calibration run logs none) is refused, naming the run.
    calib = s["calibration"]["calibration_run_id"]
    with pytest.raises(RegistryError, match=calib):
        promote_run(uri, name, calib)

    # The worst finished trial first: no champion yet, so it becomes champion (v1).
    worst = finished[0]
    first = run_job(["jobs/promote.py", "--run-id", worst.info.run_id, f"registry.model_name={name}"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    r1 = last_json(first.stdout)
    assert r1["promoted"] and r1["version"] == "1" and r1["champion_before"] is None

    # The sweep's best through --sweep: it must beat v1 by the margin to take over.
    if best.data.metrics["best/AP"] <= worst.data.metrics["best/AP"]:
        # Every trial scored the same: make v1's recorded score lower so that the order is known.
        client.set_model_version_tag(name, "1", "val_AP", repr(best.data.metrics["best/AP"] - 0.01))
    second = run_job(["jobs/promote.py", "--sweep", s["parent_run_id"], f"registry.model_name={name}"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    r2 = last_json(second.stdout)
    assert r2["run_id"] == best.info.run_id and r2["promoted"] and r2["champion_before"] == "1"

    # A worse model (v1's run again) becomes challenger only; champion stays.
    r3 = promote_run(uri, name, worst.info.run_id, margin=0.0)
    assert not r3.promoted and "champion unchanged" in r3.reason
    aliases = client.get_registered_model(name).aliases
    assert aliases["champion"] == "2" and aliases["challenger"] == "3"
    assert client.get_model_version(name, "2").tags["run_id"] == best.info.run_id
    lineage = client.get_model_version(name, "2").tags
    for key in ("sweep_id", "teacher_fingerprint", "cache_manifest_sha256", "dataset_sha256", "git_commit",
                "config_hash"):
        assert lineage.get(key), key

    # models:/name@champion is a runnable predictor; the version carries the ONNX file.
    predictor = load_champion(uri, name)
    image = np.asarray(Image.open(next((sweep["synthetic"] / "images" / "val").glob("*.jpg"))).convert("RGB"))
    pred = predictor.predict(image[None])
    assert set(pred) >= {"boxes", "scores", "labels"}
    import mlflow

    from distillery.platform.tracking.runs import tracking_uri_scope

    # MLflow resolves a models:/ URI against the process's registry URI (its registry_uri argument
    # does not reach the lookup), so point it there for this call only.
    with tracking_uri_scope(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/2", dst_path=str(sweep["out"] / "dl")))
    assert list(local.rglob("*.onnx"))

    # Rollback: champion back to v1; a second rollback has nowhere to go.
    back = run_job(["jobs/promote.py", "--rollback", f"registry.model_name={name}"], env)
    assert back.returncode == 0, back.stderr[-3000:]
    assert client.get_registered_model(name).aliases["champion"] == "1"
    with pytest.raises(RegistryError, match="no previous version"):
        rollback(uri, name)
    with pytest.raises(RegistryError, match="does not exist"):
        load_champion(uri, "no-such-model")
    with pytest.raises(RegistryError, match="no alias 'staging'"):
        load_champion(uri, name, alias="staging")


def test_tracking_server_down_is_a_clear_error(tmp_path):
    port = free_port()
    res = run_job(["jobs/promote.py", "--run-id", "abc", f"tracking.tracking_uri=http://127.0.0.1:{port}"],
                  timeout=120)
    assert res.returncode == 1 and f"127.0.0.1:{port} is not reachable" in res.stderr
