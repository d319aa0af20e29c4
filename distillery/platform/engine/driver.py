"""Every training job's driver, one set-up: :func:`run_training_job` runs a job its spec describes,
calling the job's own driver steps (a :class:`JobDriver` subclass, the spec's ``driver``) where the
jobs differ.

In order: the run folder claimed and locked; the checkpoint to resume checked (its files take
seconds, a dataset minutes); the dataset made when it is the synthetic one and its splits
validated; the tracking store reached; the job's own inputs checked (:meth:`JobDriver.check_inputs`,
before Ray starts); then on Ray: the cluster fits the job, the job prepares what its train
dataset needs (:meth:`JobDriver.on_cluster`), the Ray Data ingest, one MLflow run, the run
description (:meth:`JobDriver.describe_run`), Ray Train, and the job's summary
(:meth:`JobDriver.summary`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillery.platform.cache.feature_cache import FeatureCache
from distillery.platform.cache.job import ensure_dataset
from distillery.platform.cluster.runtime import cluster_has_gpus, ray_session
from distillery.platform.config.sections import config_hash, flatten_config
from distillery.platform.datasets.coco import CocoDataset
from distillery.platform.datasets.formats import coco_split_paths
from distillery.platform.engine.ingest import build_train_dataset
from distillery.platform.engine.checkpoints import find_latest_checkpoint
from distillery.platform.engine.launch import (claimed_run_folder, configure_ray_data, fit_on_ray_train, git_commit,
                                               load_train_val, mlflow_status, require_cluster_fit, run_summary,
                                               steps_per_epoch)
from distillery.platform.engine.progress import filter_ray_log_noise, quiet_driver_noise
from distillery.platform.engine.run_spec import RunDescription
from distillery.platform.engine.spec import JobSpec, load_attribute
from distillery.platform.io import storage
from distillery.platform.tracking.runs import create_run, resolve_tracking_uri, tracking_reachable

__all__ = ["JobDriver", "Launch", "run_training_job"]


@dataclass
class Launch:
    """What the shared set-up found, for a job's driver steps."""

    spec: JobSpec
    cfg: Any                        # the job's config (absolute paths, named; check_inputs may replace it)
    run_storage: str                # output.storage_path / output.name
    local_dir: Path
    resume_checkpoint: str | None   # output.resume_from's checkpoint, checked
    train: CocoDataset
    val: CocoDataset
    tracking_uri: str
    use_gpu: bool = False           # known once Ray is up (on_cluster and after)


class JobDriver:
    """A job's own driver steps, in the order :func:`run_training_job` calls them. Only
    :meth:`describe_run` must be written; the other defaults add nothing."""

    def __init__(self, launch: Launch):
        self.launch = launch

    @property
    def cfg(self):
        return self.launch.cfg

    def check_inputs(self):
        """Before Ray starts: check (and resolve) the job's own inputs; return its config."""
        return self.cfg

    def shared_paths(self) -> dict[str, str | None]:
        """Config key -> path every node must see, besides the images, run storage and tracking store."""
        return {}

    def on_cluster(self) -> FeatureCache | None:
        """On Ray, before the train dataset is built: what it joins the images with (None: nothing)."""
        return None

    def step_limit(self) -> int | None:
        """At most this many optimizer steps per epoch (None: the whole train split)."""
        return None

    def tags(self) -> dict[str, str]:
        """The job's own tags of its MLflow run."""
        return {}

    def describe_run(self, **common: Any) -> RunDescription:
        """The job's run description from the fields every job's has (``common``)."""
        raise NotImplementedError(f"{type(self).__name__}.describe_run")

    def summary(self, run: RunDescription, result, best) -> dict[str, Any]:
        """After training, on the driver (the MLflow run still open): what the job logs and adds to its summary."""
        return {}


def run_training_job(spec: JobSpec, cfg, *, callbacks: list | None = None, parent_run_id: str | None = None,
                     extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train ``spec``'s job with Ray Train + DeepSpeed; return its summary (AP, paths, run id).

    ``callbacks`` are Ray Train callbacks (a sweep passes Tune's ``TuneReportCallback``);
    ``parent_run_id`` makes the MLflow run a child (one per sweep trial); ``extra_tags`` are
    added to it. The run directory (``output.storage_path/output.name``) is locked for the job:
    a second job with the same name is refused while this one runs (``launch.run_lock``)."""
    with claimed_run_folder(cfg, spec.run_prefix) as cfg:
        t0 = time.time()
        local_dir = Path(cfg.output.local_dir)
        name, storage_path = cfg.output.name, cfg.output.storage_path
        run_storage = storage.join(storage_path, name)

        # --- inputs, checked before anything runs
        resume_checkpoint = find_latest_checkpoint(cfg.output.resume_from, spec) if cfg.output.resume_from else None
        ensure_dataset(cfg.data)
        train, val = load_train_val(cfg.data, storage.join(str(local_dir), "bad_records", name))
        tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, local_dir)
        tracking_reachable(tracking_uri)
        launch = Launch(spec, cfg, run_storage, local_dir, resume_checkpoint, train, val, tracking_uri)
        driver: JobDriver = load_attribute(spec.driver)(launch)
        cfg = launch.cfg = driver.check_inputs()

        # Training workers hold their CPUs for the whole run; ingest (shard read, join, decode)
        # needs a couple more logical CPUs beside them.
        with ray_session(cfg.ray, cfg.storage, min_local_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + 2):
            filter_ray_log_noise()
            quiet_driver_noise()
            require_cluster_fit(cfg, train, tracking_uri, **driver.shared_paths())
            launch.use_gpu = cluster_has_gpus() if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)
            joined = driver.on_cluster()
            configure_ray_data()
            train_ds = build_train_dataset(train, joined, bad_records=cfg.data.bad_records,
                                           report_uri=storage.join(run_storage, "bad_records"))

            # --- tracking: one run per job; rank 0 logs into it
            tags = {"distillery.job": spec.name, "distillery.run_storage": run_storage,
                    "distillery.git_commit": git_commit(), "distillery.config_hash": config_hash(cfg),
                    "distillery.dataset_sha256": train.annotation_sha256, **driver.tags(), **(extra_tags or {})}
            run_id = create_run(tracking_uri, cfg.tracking.experiment, name, flatten_config(cfg), tags,
                                parent_run_id=parent_run_id)
            val_ann, val_images = coco_split_paths(cfg.data, "val", val, storage.join(run_storage, "data"))
            run = driver.describe_run(steps_per_epoch=steps_per_epoch(cfg, len(train), driver.step_limit()),
                                      val_annotations=val_ann, val_images=val_images, tracking_uri=tracking_uri,
                                      run_id=run_id, run_storage=run_storage, resume_checkpoint=resume_checkpoint)

            with mlflow_status(tracking_uri, run_id):
                result, best = fit_on_ray_train(spec, cfg, run, train_ds, name=name, storage_path=storage_path,
                                                use_gpu=launch.use_gpu, callbacks=callbacks)
                summary = {**run_summary(run, cfg.tracking.experiment, result, best),
                           **driver.summary(run, result, best)}
        summary["wall_seconds"] = round(time.time() - t0, 1)
        return summary
