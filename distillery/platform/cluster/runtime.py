"""Connecting to Ray: one place that decides between a cluster and a local instance."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import ray
from ray._private import ray_constants

from distillery.platform.errors import DeterministicError, hold_worker_tracebacks
from distillery.platform.io import storage
from distillery.platform.config.sections import RayConfig, StorageConfig

__all__ = ["ClusterFitError", "alive_nodes", "cluster_has_gpus", "ray_session", "require_ingest_cpus",
           "require_shared_paths", "runtime_env_vars"]

log = logging.getLogger(__name__)

# The S3 variables that may be written into a runtime env (and so into Ray's logs): none of them
# is a secret. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN are not among them.


@contextlib.contextmanager
def ray_session(ray_cfg: RayConfig, storage_cfg: StorageConfig | None = None,
                min_local_cpus: float = 0) -> Iterator[None]:
    """Use the running Ray instance, connect to ``address``/``RAY_ADDRESS``, or start a local one.

    A local instance gets ``ray.num_cpus`` logical CPUs, else at least ``min_local_cpus`` (a job
    that pins CPUs to training workers still needs some for its Ray Data tasks: on a 2-core
    laptop, 2 workers + ingest need more *logical* CPUs than there are cores). Only an instance
    started here is shut down on exit.

    S3 *settings* (endpoint, region) travel to the workers in the job's runtime env. Credentials
    never do: Ray writes a runtime env's variables to its agents' logs (world-readable files
    under the session directory). Workers read credentials from their own environment: a local
    instance's processes inherit this driver's; a cluster's nodes have them from their own
    environment, an instance role or a credentials file.
    """
    if "ray.tune" in sys.modules:  # a sweep: Tune would otherwise copy the credentials itself
        keep_credentials_out_of_tune()
    if storage_cfg is not None:
        storage.configure_s3(storage_cfg.s3_endpoint_url, storage_cfg.s3_region)
    if ray.is_initialized():
        yield
        return
    env = runtime_env_vars(storage_cfg)
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"log_to_driver": True}
    # A driver under `ray job submit` already carries the job's runtime env; adding ours would
    # conflict with it. Locally started workers inherit this process's environment anyway.
    if env and not os.environ.get("RAY_JOB_ID"):
        kwargs["runtime_env"] = {"env_vars": env}
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **kwargs)
    else:
        num_cpus = ray_cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(min_local_cpus))
        log.info("starting a local Ray instance (num_cpus=%s)", num_cpus)
        # address="local": always a new instance of our own, even if another one runs here.
        # The dashboard serves Ray's State API, which Train V2's placement-group cleaner polls
        # (without it, it logs a warning every few seconds); bound to 127.0.0.1, any free port.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=None, **kwargs)
    hold_worker_tracebacks(_session_dir())  # a failed job's error line first; tracebacks in a file
    watchdog = None if address else _start_watchdog()
    try:
        yield
    finally:
        ray.shutdown()
        if watchdog is not None:
            watchdog.stdin.close()  # (what a killed driver's exit does too)
            watchdog.wait(timeout=30)


def _session_dir() -> str | None:
    try:
        return ray._private.worker.global_worker.node.get_session_dir_path()
    except AttributeError:  # another Ray layout: the file goes to the temp directory
        return None


def _start_watchdog() -> subprocess.Popen | None:
    """A process that ends this local instance's agents the moment this driver dies, even by
    SIGKILL (they would linger ~60-100 s otherwise: see :mod:`distillery.platform.cluster.watchdog`)."""
    node = ray._private.worker._global_node
    raylets = (node.all_processes or {}).get(ray_constants.PROCESS_TYPE_RAYLET) if node else None
    if not raylets:
        return None
    # Its own session: a signal to the driver's process group (Ctrl+C) must not end it first.
    return subprocess.Popen([sys.executable, "-m", "distillery.platform.cluster.watchdog", str(raylets[0].process.pid)],
                            stdin=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))})


# Names Ray Tune copies from the driver's environment into every trial's runtime env, and so into
# Ray's runtime-env agent log (ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE).
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_tune() -> None:
    """Stop Ray Tune from putting AWS credentials into its trials' runtime env. The trial
    processes still have them: like every Ray worker they inherit the node's environment."""
    # Here, not at the top: importing ray.tune would make every job look like a sweep to ray_session.
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(_CREDENTIAL_VARIABLES)


def runtime_env_vars(storage_cfg: StorageConfig | None) -> dict[str, str]:
    """The S3 settings a job's runtime env carries to its workers: endpoint and region only."""
    return storage.storage_env(storage_cfg.s3_endpoint_url if storage_cfg else None,
                               storage_cfg.s3_region if storage_cfg else None)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


class ClusterFitError(ValueError, DeterministicError):
    """A job that cannot run on the cluster it was given (paths the other nodes cannot see, no
    CPU left for its ingest); refused at start, naming the key."""


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node.get("Alive")]


def require_shared_paths(paths: dict[str, str | None], shared_paths: bool = False) -> None:
    """On a cluster of several nodes, refuse a local path that workers on other nodes would read
    or write (``paths``: config key -> path or URI): they cannot see this node's disk, and a
    sqlite tracking store there would be a different, new file on each node. ``shared_paths``
    (``ray.shared_paths``) says local paths are on a file system every node mounts at the same
    place (NFS): then they pass."""
    nodes = alive_nodes()
    if len(nodes) < 2 or shared_paths:
        return
    local = {key: uri for key, uri in paths.items() if uri and not storage.is_remote(uri.removeprefix("sqlite:///"))
             and not uri.startswith(("http://", "https://"))}
    if not local:
        return
    key, uri = next(iter(local.items()))
    others = ", ".join(f"{k}={v}" for k, v in list(local.items())[1:])
    raise ClusterFitError(f"{key}={uri}: a local path, on a Ray cluster of {len(nodes)} nodes whose other nodes "
                          "cannot see it: use s3:// (an http:// MLflow server for tracking.tracking_uri), or set "
                          "ray.shared_paths=true if every node mounts it at the same place"
                          + (f"\nalso local: {others}" if others else ""))


def _max_cluster_cpus() -> tuple[float, str]:
    """The CPUs the cluster has, or can grow to when an autoscaler publishes its limits (what
    Ray Data's own autoscaling reads), and which of the two it is."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - another Ray layout: the nodes there are now
        limits = None
    if limits and limits.get("CPU"):
        return float(limits["CPU"]), "at most, as its autoscaler allows"
    return float(ray.cluster_resources().get("CPU", 0)), "in all"


def require_ingest_cpus(num_workers: int, cpus_per_worker: float, ingest_cpus: float = 1.0) -> None:
    """Refuse training workers that leave no CPU for the job's Ray Data ingest: its decode tasks
    would wait for a CPU for ever, and the job would print nothing (``ingest_cpus``: what one
    ingest task needs). Likewise a worker larger than every node, which Ray can never place."""
    total, how = _max_cluster_cpus()
    held = num_workers * cpus_per_worker
    if total - held < ingest_cpus:
        raise ClusterFitError(
            f"train.cpus_per_worker={cpus_per_worker:g}: {num_workers} workers x {cpus_per_worker:g} CPUs hold "
            f"{held:g} of the cluster's {total:g} CPUs ({how}), leaving {max(total - held, 0):g} for the Ray Data "
            f"ingest, which needs {ingest_cpus:g} per task: lower train.cpus_per_worker or train.num_workers, "
            "or add CPUs")
    node_cpus = [node.get("Resources", {}).get("CPU", 0) for node in alive_nodes()]
    if how == "in all" and node_cpus and max(node_cpus) < cpus_per_worker:
        raise ClusterFitError(f"train.cpus_per_worker={cpus_per_worker:g}: no node has that many CPUs (the largest "
                              f"has {max(node_cpus):g}); Ray cannot place a worker")
