"""Canary credentials: AWS credentials in a job's environment never reach a Ray runtime env.

The end-to-end searches use the helpers below: tests/test_learning.py runs jobs/distill.py with
its own local Ray instance (the path that used to copy the AWS variables into the runtime env's
``env_vars``, which Ray's agents then wrote to their logs), tests/test_readme_day.py the README's
day on a `ray start` cluster; every file of their Ray sessions, MLflow stores, run directories
and console output is searched for the canary strings: zero hits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest



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
    # Ray's list as it ships, read in a fresh interpreter: in this process an earlier sweep (any
    # ray_session once ray.tune is imported) has already taken the credentials out of it.
    shipped = subprocess.run([sys.executable, "-c", "from ray.tune.execution import class_cache as c; "
                              "print(' '.join(sorted(c.ENV_VARS_TO_PROPAGATE)))"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert "AWS_SECRET_ACCESS_KEY" in shipped
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", set(shipped))

    class Before:
        pass

    class After:
        pass

    assert secret in str(class_cache._ActorClassCache().get(Before)._default_options)  # Ray's own behaviour
    keep_credentials_out_of_tune()
    assert secret not in str(class_cache._ActorClassCache().get(After)._default_options)
