"""Shared fixtures: real services started by the tests themselves (moto S3, local Ray)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep the CPU-only test machine quiet and deterministic.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not up yet"
            last = exc
            time.sleep(0.25)
    raise RuntimeError(f"{url} did not come up within {timeout}s: {last}")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with a bucket 'distillery-test'; AWS env points at it."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    exe = shutil.which("moto_server") or sys.executable
    cmd = [exe, "-H", "127.0.0.1", "-p", str(port)] if exe != sys.executable else \
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                             "AWS_ENDPOINT_URL")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    try:
        wait_for_http(endpoint + "/moto-api/", proc=proc)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="distillery-test")
        yield {"endpoint": endpoint, "bucket": "distillery-test"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic COCO dataset (train 24, val 8, 128 px)."""
    from distillery.platform.datasets.synthetic import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_coco(root, train=24, val=8, size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def ray_local(moto_s3):
    """A local Ray instance for the whole session: 4 logical CPUs on the 2-core CI machine, so
    that 2 training workers and their Ray Data ingest can run side by side.

    It depends on moto_s3 so that the workers inherit the AWS environment pointing at it.
    """
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cache(ray_local, synthetic_data, tmp_path_factory):
    """The feature cache of configs/distill_tiny.yaml's teacher over ``synthetic_data`` (train split),
    built once: the distillation, sweep and job-submit tests open it instead of each building its own
    (a job finds the manifest and skips the build; the fingerprint check still runs)."""
    from distillery.platform.cache.job import CacheFeaturesConfig, CacheSettings, run_cache_job
    from distillery.platform.config.sections import load_config
    from distillery.platform.config.distill import DistillConfig

    uri = tmp_path_factory.mktemp("tiny_cache") / "cache"
    cfg = load_config(DistillConfig, REPO / "configs" / "distill_tiny.yaml", [f"data.root={synthetic_data}"])
    run_cache_job(CacheFeaturesConfig(data=cfg.data, teacher=cfg.teacher, ray=cfg.ray, storage=cfg.storage,
                                      cache=CacheSettings(uri=str(uri), dtype=cfg.cache.dtype,
                                                          shard_size=cfg.cache.shard_size, splits=["train"])))
    return uri
