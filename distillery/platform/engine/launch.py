"""What a training job's driver does around the engine, the same for every job: load and check
the train/val splits, quiet Ray Data, count the steps, run the workers on Ray Train
(:func:`fit_on_ray_train`) and mark the MLflow run finished or failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from distillery.platform.cache.feature_cache import MANIFEST
from distillery.platform.config.sections import with_absolute_paths
from distillery.platform.datasets.coco import CocoDataset
from distillery.platform.datasets.formats import load_split
from distillery.platform.engine.checkpoints import best_checkpoint
from distillery.platform.engine.progress import WORKER_ENV
from distillery.platform.engine.run_spec import RunDescription, worker_config
from distillery.platform.engine.spec import JobSpec
from distillery.platform.errors import DeterministicError
from distillery.platform.io import storage

__all__ = ["claimed_run_folder", "configure_ray_data", "fit_on_ray_train", "git_commit", "load_train_val", "mlflow_status",
           "require_cluster_fit", "require_writable_outputs", "run_lock", "run_summary", "steps_per_epoch"]

log = logging.getLogger(__name__)


def configure_ray_data() -> None:
    """Ray Data settings of a training job's driver (before its train dataset is built)."""
    import ray.data  # (see fit_on_ray_train)

    context = ray.data.DataContext.get_current()
    # Per-operator progress bars of a dataset streamed for hours only flood the job log, and so
    # does its execution plan, printed again every epoch: rank 0 prints progress instead.
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # A data error raised in an ingest task (a corrupt image) keeps its own class instead of
    # Ray Data's UserCodeException (whose cause is lost on the way): deterministic, no retry.
    context.raise_original_map_exception = True


@contextlib.contextmanager
def claimed_run_folder(cfg, prefix: str):
    """A training job's config ready to run, for the block: local paths absolute, S3 configured,
    a run name (``<prefix>-<timestamp>`` when ``output.name`` is unset: named once, so the lock
    and the run agree on the folder), its output directories writable, its run folder locked
    (:func:`run_lock`). Everything here is checked before any other work."""
    cfg = with_absolute_paths(cfg)
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)  # before the first storage access
    if not cfg.output.name:
        cfg = cfg.model_copy(update={"output": cfg.output.model_copy(
            update={"name": time.strftime(f"{prefix}-%Y%m%d-%H%M%S")})})
    require_writable_outputs(cfg)
    with run_lock(storage.join(cfg.output.storage_path, cfg.output.name)):
        yield cfg


def require_writable_outputs(cfg) -> None:
    """Every local directory the job will write, checked writable before any work (Ray not
    started): a read-only one is one error line naming its key and path. The cache folder only
    when this job may build it (``cache.build_if_missing`` and no manifest yet)."""
    keys = {"output.local_dir": cfg.output.local_dir, "output.storage_path": cfg.output.storage_path}
    cache = getattr(cfg, "cache", None)
    if cache is not None and getattr(cache, "build_if_missing", False) and \
            not storage.exists(storage.join(cache.uri, "train", MANIFEST)):
        keys["cache.uri"] = cache.uri
    for key, uri in keys.items():
        storage.require_writable(uri, key)


def require_cluster_fit(cfg, train: CocoDataset, tracking_uri: str, **paths: str | None) -> None:
    """At start, on the cluster the job runs on (Ray connected, nothing scheduled yet): its
    training workers leave a CPU for the Ray Data ingest (one per decode task:
    ``engine.ingest``), and on several nodes every path a worker reads or writes is shared
    (the images, the run storage, the tracking store, and ``paths``: key -> path)."""
    # Imported here: see fit_on_ray_train (this module is loaded before the inputs are checked).
    from distillery.platform.cluster.runtime import require_ingest_cpus, require_shared_paths

    require_ingest_cpus(cfg.train.num_workers, cfg.train.cpus_per_worker, ingest_cpus=1.0)
    images = train.records[0].uri if train.records else cfg.data.root
    require_shared_paths({"data.root": images, "output.storage_path": cfg.output.storage_path,
                          "tracking.tracking_uri": tracking_uri, **paths}, cfg.ray.shared_paths)


def steps_per_epoch(cfg, num_images: int, limit: int | None) -> int:
    """Optimizer steps per epoch: the train split over all workers' (accumulated) batches, at most
    ``limit``."""
    per_step = cfg.train.batch_size * cfg.train.num_workers * cfg.deepspeed.gradient_accumulation_steps
    steps = max(1, num_images // per_step)
    return min(steps, limit) if limit else steps


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_train_val(data, report_dir: str) -> tuple[CocoDataset, CocoDataset]:
    """The train and val splits of ``data`` (a job's DataConfig), validated as they load (bad
    records reported under ``report_dir``); refuses splits whose category tables differ."""
    splits = {}
    for split in ("train", "val"):  # data.format: coco, yolo or voc
        splits[split] = load_split(data, split, report_uri=storage.join(report_dir, f"{split}.jsonl"))
    train, val = splits["train"], splits["val"]
    if val.categories != train.categories:
        raise ValueError(f"train and val category tables differ: {train.annotation_uri} vs {val.annotation_uri}")
    return train, val


def fit_on_ray_train(spec: JobSpec, cfg, run: RunDescription, train_ds, *, name: str, storage_path: str,
                     use_gpu: bool, callbacks=None):
    """Run ``spec``'s job on ``cfg.train.num_workers`` Ray Train workers (TorchTrainer, Train V2) with
    the job's checkpoint and failure settings; return ``(result, best checkpoint by its spec's
    best_metric, else the last one)``.

    Shared by every job: ``cfg`` is the job's config (its ``train`` section has the fields read
    here), ``run`` reaches every worker with the config."""
    # Imported here: a job's driver checks its inputs (and prints one line on a bad one) before
    # it loads Ray Train (and, with the engine's worker, DeepSpeed).
    import ray.train
    from ray.train.torch import TorchTrainer

    from distillery.platform.engine.trainer import train_worker

    remote = storage.has_protocol(storage_path)
    run_config = ray.train.RunConfig(
        name=name, storage_path=None if remote else storage_path,
        storage_filesystem=storage.pyarrow_filesystem(storage_path) if remote else None,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                     checkpoint_score_attribute=spec.best_metric,
                                                     checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(callbacks or []),
        # Ray Train's INFO lines (each rank's whole metrics dict per report, every checkpoint
        # path) drown the progress lines rank 0 prints; its warnings and errors still show.
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        worker_runtime_env={"env_vars": dict(WORKER_ENV)})
    if remote:
        run_config.storage_path = storage.filesystem(storage_path)[1]
    trainer = TorchTrainer(
        train_worker, train_loop_config=worker_config(spec, cfg, run),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=run_config, datasets={"train": train_ds},
        dataset_config=ray.train.DataConfig(execution_options=ordered_ingest_options()))
    install_failure_policy()
    result = trainer.fit()
    # Ray keeps the top checkpoints by the job's best metric (equal values in report order): pick the best one.
    best = best_checkpoint(result.best_checkpoints or [], spec.best_metric)
    if best is None:
        best = result.checkpoint
    return result, best


def ordered_ingest_options():
    """Ray Train's ingest options with ``preserve_order``: every epoch's blocks leave the pipeline in
    the dataset's order, and ``streaming_split`` hands each to the split with the fewest rows so
    far (locality hints are ignored then), so every rank gets the same rows in the same order in
    every run. Without it, blocks go out as their tasks finish, and which rank trains on which
    image changes from run to run. Its cost (a finished block waits for the ones before it): the
    ``ordered`` pipeline of ``benchmarks/ingest_epoch_start.py``."""
    import ray.train  # (see fit_on_ray_train)

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def install_failure_policy() -> None:
    """Make Ray Train raise at once when a worker fails with a :class:`DeterministicError` (a
    corrupt checkpoint, bad data, an unknown model): a retry would fail the same way, so it must
    not consume ``train.max_failures``. Ray Train V2 builds its failure policy in
    ``create_failure_policy`` with no public hook to choose another; ours wraps the default."""
    from ray.train.v2.api import data_parallel_trainer  # (see fit_on_ray_train)

    from distillery.platform.engine.failure_policy import create_failure_policy  # (imports Ray Train)

    data_parallel_trainer.create_failure_policy = create_failure_policy


def run_summary(run: RunDescription, experiment: str, result, best) -> dict[str, Any]:
    """What every job's summary says about its training run (``result``, ``best``: :func:`fit_on_ray_train`'s)."""
    return {"run_id": run.run_id, "tracking_uri": run.tracking_uri, "experiment": experiment,
            "run_storage": run.run_storage, "best_checkpoint": best.path if best else None,
            "last_checkpoint": result.checkpoint.path if result.checkpoint else None,
            "metrics": dict(result.metrics or {})}


@contextlib.contextmanager
def mlflow_status(tracking_uri: str, run_id: str):
    """Mark the MLflow run FINISHED, or FAILED if anything in the block raises."""
    client = MlflowClient(tracking_uri)
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")



class RunInUseError(RuntimeError, DeterministicError):
    """Another live job holds this run directory (the same ``output.name``)."""


LOCK_FILE = ".distillery.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def run_lock(run_storage: str, key: str = "output.name"):
    """Hold ``<run_storage>/.distillery.lock`` (the owner's pid, host and start time) for the
    block: a second job started with the same ``output.name`` while the first runs is refused at
    once, naming the owner, instead of interleaving its checkpoints with the first's. A lock left
    by a process that is gone (same host, pid not running) is stale and taken over, so a rerun
    after a crash or Ctrl-C resumes. On S3 the check and the write are two requests (no atomic
    create): two jobs started within that window are not told apart."""
    lock = storage.join(run_storage, LOCK_FILE)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    payload = json.dumps(owner).encode()
    created = False  # the run folder was made for the lock (removed again if the job wrote nothing)
    for _ in range(2):
        try:
            if storage.is_remote(lock):
                if storage.exists(lock):
                    raise FileExistsError(lock)
                storage.write_bytes(lock, payload)
            else:
                created = created or not os.path.isdir(run_storage)
                os.makedirs(run_storage, exist_ok=True)
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(payload)
            break
        except FileExistsError:
            try:
                held = json.loads(storage.read_bytes(lock))
            except (OSError, ValueError):
                held = {}
            if held.get("host") == owner["host"] and isinstance(held.get("pid"), int) and not _pid_alive(held["pid"]):
                log.warning("%s: stale lock of pid %s (not running), taken over", lock, held["pid"])
                storage.remove(lock)
                continue
            raise RunInUseError(f"{key}: the run directory {run_storage} is in use by another job (pid "
                                f"{held.get('pid', '?')} on {held.get('host', '?')}, started {held.get('started', '?')}; "
                                f"lock {lock}): choose another {key}, or wait for it to finish") from None
    else:
        raise RunInUseError(f"{key}: could not take the lock {lock} of {run_storage}")
    try:
        yield lock
    finally:
        try:
            storage.remove(lock)
            if created and not os.listdir(run_storage):  # a job refused before it wrote anything
                os.rmdir(run_storage)
        except OSError as exc:  # the run's outcome matters more than a lock left behind (stale next time)
            log.warning("could not remove %s: %s", lock, exc)
