"""`ray job submit` of jobs/distill.py to a real `ray start --head` cluster on 127.0.0.1 with
token authentication on (as Ray 2.60 does by default), then checks of its MLflow run and checkpoint."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import free_port, wait_for_http

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture()
def ray_head(tmp_path):
    """A head node of its own (not the session's local instance), stopped by the fixture."""
    token = tmp_path / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # (other tests' in-process mlflow.set_tracking_uri sets it)
    # Every port and the temp dir are the head's own: the test session's local Ray instance is
    # still up, and its dashboard agent holds Ray's default agent ports (a second agent that
    # cannot bind them never registers, and the job server answers "No available agent").
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port", "ray-client-server-port")}
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: Ray's socket paths are length-limited
    log = open(tmp_path / "ray_head.log", "w")
    # --block keeps `ray start` in the foreground: terminating it stops exactly this node's
    # processes (`ray stop` would also stop the test session's own Ray instance).
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             *(f"--{flag}={port}" for flag, port in ports.items()), f"--temp-dir={temp_dir}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=4",
                             "--disable-usage-stats", "--include-dashboard=true"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_http(address, timeout=120, proc=proc)
        yield address, env, Path(temp_dir)
    finally:
        # The node's processes (GCS, raylet, dashboard, workers) share `ray start`'s session:
        # SIGTERM them all at once (`ray start --block` alone shuts down one by one, ~30 s).
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:  # (the raylet can take ~20 s to honour SIGTERM)
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def agent_logs(temp_dir: Path) -> str:
    """The head's dashboard-agent logs, for a failure message."""
    text = []
    for f in sorted(temp_dir.glob("session_*/logs/dashboard_agent*")):
        text.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
    return "\n".join(text)


def ray_cli(args, env, timeout=120):
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_ray_job_submit_distill(ray_head, synthetic_data, tiny_cache, tmp_path):
    address, env, temp_dir = ray_head
    # Token authentication is on: a client without the token is turned away.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    denied = ray_cli(["job", "list", "--address", address], no_token)
    assert denied.returncode != 0

    out = tmp_path / "out"
    args = ["job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait", "--",
            "python", "jobs/distill.py", "--config", "configs/distill_tiny.yaml",
            f"data.root={synthetic_data}", f"cache.uri={tiny_cache}",
            f"output.storage_path={out / 'train'}", f"output.local_dir={out / 'local'}",
            "output.name=submitted", "train.epochs=1", "debug.max_steps_per_epoch=2", "tracking.log_model=false"]
    deadline = time.time() + 240  # the head's job agent registers some seconds after the dashboard answers
    while True:
        submit = ray_cli(args, env)
        if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout \
                or time.time() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stderr[-3000:] + submit.stdout + agent_logs(temp_dir)
    job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)
    deadline, status = time.time() + 600, ""
    while time.time() < deadline:
        reply = ray_cli(["job", "status", "--address", address, job_id], env)
        status = re.sub(r"\x1b\[[0-9;]*m", "", reply.stdout + reply.stderr).lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = ray_cli(["job", "logs", "--address", address, job_id], env).stdout
    assert "succeeded" in status, status + logs[-4000:]
    summary = json.loads(logs.strip().splitlines()[-1])
    assert summary["run_storage"] == str(out / "train" / "submitted")
    assert (out / "train" / "submitted").is_dir() and summary["best_checkpoint"]
    assert Path(summary["best_checkpoint"], "distillery_state.json").is_file()
    # Rank 0's progress and epoch-summary lines reach the job's log, once each.
    assert re.search(r"\[train\] epoch 1/1 step 1/2 \| loss [\d.]+ \(mal ", logs), logs[-4000:]
    assert logs.count("[train] epoch 1/1 done in ") == 1, logs[-4000:]

    from mlflow.tracking import MlflowClient

    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert "epoch/AP" in run.data.metrics and run.data.params["output.name"] == "submitted"


# --------------------------------------------------------------------------- where outputs go

def test_relative_paths_in_rays_temporary_working_dir_are_refused(tmp_path, monkeypatch):
    from distillery.platform.config.sections import ConfigError, absolute_uri

    ephemeral = tmp_path / "ray" / "session_2026-01-01_00-00-00_1_1" / "runtime_resources" / \
        "working_dir_files" / "_ray_pkg_0123abcd"
    ephemeral.mkdir(parents=True)
    monkeypatch.chdir(ephemeral)
    monkeypatch.delenv("DISTILLERY_HOME", raising=False)
    with pytest.raises(ConfigError) as err:
        absolute_uri("runs")
    first = str(err.value).splitlines()[0]
    assert str(ephemeral / "runs") in first and "DISTILLERY_HOME" in first and "Ray deletes" in first
    # Absolute paths and URIs are where the user said; DISTILLERY_HOME is the base of relative ones.
    assert absolute_uri(str(tmp_path / "out")) == str(tmp_path / "out")
    assert absolute_uri("s3://bucket/runs") == "s3://bucket/runs"
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    assert absolute_uri("runs/x") == str(tmp_path / "home" / "runs" / "x")


def test_relative_paths_elsewhere_resolve_against_the_current_directory(tmp_path, monkeypatch):
    from distillery.platform.config.sections import absolute_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILLERY_HOME", raising=False)
    assert absolute_uri("runs") == str(tmp_path / "runs")


def test_tracking_params_mask_secrets_by_name_and_in_uris():
    from distillery.platform.config.sections import StrictModel, flatten_config

    class Tracking(StrictModel):
        tracking_uri: str = "http://alice:hunter2@mlflow.internal:5000"
        api_token: str = "tok-123"
        tokenizer: str = "bert"

    class Job(StrictModel):
        tracking: Tracking = Tracking()

    params = flatten_config(Job())
    assert params["tracking.tracking_uri"] == "http://**********@mlflow.internal:5000"
    assert params["tracking.api_token"] == "**********"
    assert params["tracking.tokenizer"] == "bert"
    assert "hunter2" not in str(params) and "tok-123" not in str(params)
