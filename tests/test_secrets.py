"""Canary credentials: a job run with AWS credentials in its environment leaves them nowhere.

The distillation job starts its own local Ray instance (the path that used to copy the AWS
variables into the runtime env's ``env_vars``, which Ray's agents then wrote to their logs),
builds its dataset and feature cache, trains, logs to MLflow (sqlite) and stores checkpoints.
Every file of its Ray session (logs included), its MLflow store and artifacts, its run
directory and its console output are searched for the canary strings: zero hits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def canary_credentials() -> dict[str, str]:
    """Unique random strings in the shape of AWS credentials (never valid anywhere)."""
    token = uuid.uuid4().hex
    return {"AWS_ACCESS_KEY_ID": "AKIACANARY" + uuid.uuid4().hex[:10].upper(),
            "AWS_SECRET_ACCESS_KEY": "canary-secret-" + uuid.uuid4().hex,
            "AWS_SESSION_TOKEN": "canary-token-" + token + token}


def files_containing(roots: list[Path], needles: list[str]) -> dict[str, list[str]]:
    """{needle: [files under roots that contain it, with the text around it]} (binary files
    included: sqlite, parquet, logs); the needle itself is shown as <CANARY>."""
    encoded = {n: n.encode() for n in needles}
    hits: dict[str, list[str]] = {n: [] for n in needles}
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except OSError:  # a socket, or a file removed while we looked
                continue
            for needle, raw in encoded.items():
                at = data.find(raw)
                if at >= 0:
                    around = data[max(0, at - 150): at + len(raw) + 50].replace(raw, b"<CANARY>")
                    hits[needle].append(f"{path}: ...{around.decode(errors='replace')}...")
    return {n: files for n, files in hits.items() if files}


def test_canary_credentials_appear_in_no_log_store_or_run_dir(tmp_path):
    canaries = canary_credentials()
    # Ray's temp dir of its own (short: Ray's socket paths are length-limited), so that every
    # session file of this run, and only of this run, can be searched.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rsec-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env.update(canaries, RAY_TMPDIR=str(ray_tmp), AWS_DEFAULT_REGION="us-east-1")
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/distill.py", "--config", "configs/distill_tiny.yaml",
           f"data.root={out / 'data'}", f"cache.uri={out / 'cache'}", f"output.storage_path={out / 'train'}",
           f"output.local_dir={out / 'local'}", "output.name=canary", "train.epochs=1",
           "debug.max_steps_per_epoch=2"]
    try:
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        console = run.stdout + run.stderr
        assert run.returncode == 0, console[-4000:]
        (tmp_path / "console.txt").write_text(console)
        sessions = list(ray_tmp.glob("ray/session_*"))
        assert sessions and any(sessions[0].glob("logs/*.log")), "the job's Ray session left no logs to search"
        assert list(out.glob("local/**/mlflow.db")), "no MLflow store to search"
        hits = files_containing([ray_tmp, out, tmp_path], list(canaries.values()))
        assert not hits, f"credentials found in: {hits}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("name", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])
def test_runtime_env_never_carries_credentials(name, monkeypatch):
    from distillery.platform.cluster.runtime import runtime_env_vars
    from distillery.platform.config.sections import StorageConfig

    monkeypatch.setenv(name, "canary-" + uuid.uuid4().hex)
    env = runtime_env_vars(StorageConfig(s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-1"))
    assert name not in env and os.environ[name] not in env.values()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and env["AWS_DEFAULT_REGION"] == "eu-west-1"


def test_sweeps_keep_credentials_out_of_tunes_trial_runtime_env(monkeypatch):
    """Ray Tune copies AWS credentials from the driver into every trial's runtime env (and so into
    runtime_env_agent.log); ray_session stops that for sweeps."""
    from ray.tune.execution import class_cache

    from distillery.platform.cluster.runtime import keep_credentials_out_of_tune

    secret = "canary-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", set(class_cache.ENV_VARS_TO_PROPAGATE))

    class Before:
        pass

    class After:
        pass

    assert secret in str(class_cache._ActorClassCache().get(Before)._default_options)  # Ray's own behaviour
    keep_credentials_out_of_tune()
    assert secret not in str(class_cache._ActorClassCache().get(After)._default_options)
