"""A fault drill on a Ray cluster of several nodes, started on this one machine.

    python tools/multinode_faults.py [--part cache|distill|both] [--work DIR]

The cluster is Ray's own ``ray.cluster_utils.Cluster``: one head and worker nodes, each a raylet
of its own with a few logical CPUs, random ports and a temp dir under ``--work`` (never Ray's
defaults, so other Ray instances on the machine are untouched; the "current cluster" file Ray
writes for ``ray.init()`` goes there too). Shared storage is S3 (a moto server on 127.0.0.1);
tracking is an MLflow server (artifacts proxied by it). The jobs run as they would for a user:
``python jobs/X.py ... ray.address=<the cluster>``, in their own process.

- ``cache``: the tiny recipe's feature cache over 96 synthetic images (24 shards) across 3 nodes,
  once undisturbed and once with a worker node removed after the first shards are on S3; the
  two manifests must list the same shards with the same sha256.
- ``distill``: the tiny distillation recipe with its 2 training workers on 2 different nodes (each
  node has 1 CPU, a third node the ingest's); during epoch 2 (epoch 1's checkpoint on S3), the
  node of a training worker is removed and a replacement node added: Ray Train restarts the
  workers from that checkpoint (``train.max_failures``) and the job finishes.

Prints one JSON line per part with what it saw. Takes minutes on 2 cores; not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUCKET = "drill"
SYNTHETIC = "{train: 96, val: 4, size: 128, seed: 0}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


def start_moto(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(work / "moto.log", "w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    wait_for(endpoint + "/moto-api/", proc)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return proc, endpoint


def start_mlflow(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}", "--serve-artifacts",
                             "--artifacts-destination", str(work / "mlflow-artifacts"), "--workers", "1"],
                            stdout=open(work / "mlflow.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    wait_for(uri + "/health", proc)
    return proc, uri


def start_cluster(work: Path, head_cpus: int, node_cpus: list[int]):
    import ray._private.utils as ray_utils
    from ray.cluster_utils import Cluster

    temp = Path(tempfile.mkdtemp(prefix="drill", dir="/tmp"))  # short: Ray's socket paths live under it
    ray_utils.get_ray_address_file = lambda temp_dir=None: str(temp / "ray_current_cluster")
    cluster = Cluster(initialize_head=False, connect=False)
    add_node(cluster, head_cpus, temp_dir=str(temp), include_dashboard=False)  # the first one is the head
    for cpus in node_cpus:
        add_node(cluster, cpus)
    cluster.wait_for_nodes()
    return cluster


def add_node(cluster, cpus: int, tries: int = 3, **node_args):
    """A node; Ray gives a raylet 30 s to register, which a loaded 2-core machine can miss."""
    for attempt in range(1, tries + 1):
        try:
            return cluster.add_node(num_cpus=cpus, **node_args)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for it
            if attempt == tries:
                raise
            print(f"add_node: {exc}; trying again", file=sys.stderr)


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def run_job(script: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / script), *args], cwd=str(log.parent), env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def manifest_shards(endpoint: str, uri: str) -> dict:
    import boto3

    body = boto3.client("s3", endpoint_url=endpoint).get_object(Bucket=BUCKET, Key=f"{uri}/train/manifest.json")["Body"]
    manifest = json.loads(body.read())
    return {"fingerprint_digest": manifest["fingerprint_digest"], "count": manifest["count"],
            "shards": [(s["name"], s["count"], s["sha256"]) for s in manifest["shards"]]}


def cache_part(work: Path, endpoint: str, drill: bool = True) -> dict:
    """The undisturbed cache job, then (``drill``) the one that loses a node mid-pass."""
    cluster = start_cluster(work, 2, [2, 2])
    common = ["--config", str(REPO / "configs" / "cache_features_tiny.yaml"), f"ray.address={cluster.address}",
              f"storage.s3_endpoint_url={endpoint}", f"data.root=s3://{BUCKET}/data", f"data.synthetic={SYNTHETIC}",
              "cache.shard_size=4", "compute.actors=3", "compute.cpus_per_actor=1"]
    try:
        t0 = time.time()
        calm = run_job("cache_features.py", [*common, f"cache.uri=s3://{BUCKET}/cache-calm"], work / "cache-calm.log")
        calm_rc = calm.wait(timeout=1800)
        calm_s = time.time() - t0
        if not drill:
            return {"part": "cache (undisturbed only)", "calm_rc": calm_rc, "calm_seconds": round(calm_s, 1)}
        t0 = time.time()
        fault = run_job("cache_features.py", [*common, f"cache.uri=s3://{BUCKET}/cache-fault"], work / "cache-fault.log")
        removed_at, shards_then = None, None
        while fault.poll() is None:
            shards = [k for k in s3_keys(endpoint, "cache-fault/train/") if "/shard-" in k]
            if removed_at is None and len(shards) >= 2:
                cluster.remove_node(next(iter(cluster.worker_nodes)))
                removed_at, shards_then = round(time.time() - t0, 1), len(shards)
            time.sleep(0.5)
        fault_rc = fault.returncode
        out = {"part": "cache", "nodes": 3, "calm_rc": calm_rc, "fault_rc": fault_rc, "calm_seconds": round(calm_s, 1),
               "fault_seconds": round(time.time() - t0, 1), "node_removed_at_s": removed_at,
               "shards_on_s3_when_removed": shards_then}
        if calm_rc == 0 and fault_rc == 0:
            a, b = manifest_shards(endpoint, "cache-calm"), manifest_shards(endpoint, "cache-fault")
            out.update(shards=len(a["shards"]), images=a["count"], same_manifest=a == b)
        return out
    finally:
        cluster.shutdown()


def _worker_nodes_of_training(cluster) -> list:
    """The cluster's nodes that host a live Ray Train worker (from the GCS actor table)."""
    import ray
    from ray._private import state

    if not ray.is_initialized():
        ray.init(address=cluster.address, log_to_driver=False)
    hosts = {info["Address"]["NodeID"] for info in state.actors().values()
             if info.get("ActorClassName", "").endswith("RayTrainWorker") and info.get("State") == "ALIVE"}
    return [node for node in cluster.worker_nodes if node.node_id in hosts]


def distill_part(work: Path, endpoint: str, tracking: str) -> dict:
    # 1 CPU per node: the 2 training workers sit on 2 nodes, the ingest on the third.
    cluster = start_cluster(work, 1, [1, 1])
    args = ["--config", str(REPO / "configs" / "distill_tiny.yaml"), f"ray.address={cluster.address}",
            f"storage.s3_endpoint_url={endpoint}", f"data.root=s3://{BUCKET}/data", f"data.synthetic={SYNTHETIC}",
            f"cache.uri=s3://{BUCKET}/cache-calm", "cache.shard_size=4", f"output.storage_path=s3://{BUCKET}/runs",
            "output.name=drill", f"output.local_dir={work / 'runs'}", f"tracking.tracking_uri={tracking}",
            "train.max_failures=2", "debug.max_steps_per_epoch=6", "tracking.log_model=false"]
    try:
        t0 = time.time()
        job = run_job("distill.py", args, work / "distill.log")
        removed, replaced_at = None, None
        while job.poll() is None:
            # Mid-epoch 2: epoch 1's checkpoint is then on S3 and reported (its files alone could
            # still be uploading, before Ray Train knows of it).
            in_epoch_2 = "[train] epoch 2/" in (work / "distill.log").read_text(errors="replace")
            checkpoints = {k.split("/")[2] for k in s3_keys(endpoint, "runs/drill/") if "/checkpoint_" in k}
            if removed is None and in_epoch_2 and checkpoints:
                hosts = _worker_nodes_of_training(cluster)
                if hosts:
                    cluster.remove_node(hosts[0])
                    add_node(cluster, 1)  # the replacement
                    removed, replaced_at = sorted(checkpoints), round(time.time() - t0, 1)
            time.sleep(1.0)
        log = (work / "distill.log").read_text(errors="replace")
        final = sorted({k.split("/")[2] for k in s3_keys(endpoint, "runs/drill/") if "/checkpoint_" in k})
        summary = next((json.loads(line) for line in log.splitlines() if line.startswith("{")), {})
        return {"part": "distill", "rc": job.returncode, "seconds": round(time.time() - t0, 1),
                "checkpoints_when_removed": removed, "node_removed_and_replaced_at_s": replaced_at,
                # Where the restarted workers began: epoch 2 (restored), not epoch 1 (from scratch).
                "first_progress_after_removal": next((line.split("[train] ", 1)[1][:60] for line in
                                                      log.split("its node has died", 1)[-1].splitlines()
                                                      if "[train] epoch" in line), None),
                "checkpoints_at_end": final, "checkpoint_epoch": summary.get("checkpoint_epoch"),
                "AP": (summary.get("metrics") or {}).get("AP")}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("cache", "distill", "both"), default="both")
    parser.add_argument("--work", default=None, help="folder for logs and the MLflow store (default: a new temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="multinode-drill-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    moto, endpoint = start_moto(work)
    servers = [moto]
    try:
        if args.part in ("cache", "both"):
            print(json.dumps(cache_part(work, endpoint)), flush=True)
        if args.part in ("distill", "both"):
            if not s3_keys(endpoint, "cache-calm/train/manifest.json"):  # the distillation trains from that cache
                print(json.dumps(cache_part(work, endpoint, drill=False)), flush=True)
            mlflow, tracking = start_mlflow(work)
            servers.append(mlflow)
            print(json.dumps(distill_part(work, endpoint, tracking)), flush=True)
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"logs: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
