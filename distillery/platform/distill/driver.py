"""The distillation job's driver: validate inputs, prepare cache and tracking, run Ray Train.

``run_distill(cfg)`` is what ``jobs/distill.py`` calls. Everything that can be checked before a
worker starts is checked here (dataset, cache fingerprint and coverage, tracking server,
checkpoint to resume), so a bad input fails in seconds with a message naming it, and nothing
already written is touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from distillery.platform.io import storage
from distillery.platform.engine.checkpoints import find_latest_checkpoint
from distillery.platform.cache.job import (CacheComputeConfig, CacheFeaturesConfig, CacheSettings, ViewRecipe,
                                           build_teacher, ensure_dataset, open_training_cache,
                                           resolve_teacher_dtype)
from distillery.platform.datasets.coco import CocoDataset
from distillery.platform.config.sections import absolute_uri, config_hash, flatten_config
from distillery.platform.config.distill import DistillConfig
from distillery.platform.cache.feature_cache import FeatureCache, manifest_sha256

__all__ = ["find_latest_checkpoint", "resolve_gam", "run_distill"]

log = logging.getLogger(__name__)


def resolve_gam(cfg: DistillConfig) -> dict[str, Any]:
    """GAM settings: the config's values, else the official per-size defaults (S for the tiny
    test student)."""
    from distillery.students.gam import GAM_DEFAULTS

    base = dict(GAM_DEFAULTS.get(cfg.student.name, GAM_DEFAULTS["rtdetrv4_s"]))
    g = cfg.gam
    out = {"lambda0": base["lambda0"], "rho": base["rho"], "delta": base["delta"],
           "default_weight": base["default_weight"], "stop_epoch": base["stop_epoch"]}
    for key in out:
        value = getattr(g, key)
        if value is not None:
            out[key] = value
    if out["delta"] >= out["rho"]:
        raise ValueError(f"gam.delta ({out['delta']}) must be smaller than gam.rho ({out['rho']})")
    out.update(rule=g.rule, enabled=g.enabled)
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _prepare_cache(cfg: DistillConfig, train: CocoDataset, fingerprint: dict[str, Any], dtype: str,
                   use_gpu: bool) -> FeatureCache:
    """Open the train-split cache (building it first when allowed); refuse a foreign teacher."""
    uri = storage.join(cfg.cache.uri, "train")

    def build() -> None:  # builds a missing cache, repairs a damaged one (cache.build_if_missing)
        from distillery.platform.cache.job import _cache_split

        log.info("building the feature cache at %s", uri)
        cache_cfg = CacheFeaturesConfig(data=cfg.data, teacher=cfg.teacher, ray=cfg.ray, storage=cfg.storage,
                                        cache=CacheSettings(uri=cfg.cache.uri, dtype=cfg.cache.dtype,
                                                            shard_size=cfg.cache.shard_size, splits=["train"],
                                                            views=cfg.cache.views, view_recipe=_view_recipe(cfg)),
                                        compute=CacheComputeConfig())
        grid = [fingerprint["embed_dim"], *_grid_of(fingerprint)]
        _cache_split(cache_cfg, "train", train, fingerprint, grid, dtype, use_gpu)

    cache = open_training_cache(uri, fingerprint, train.image_ids, build if cfg.cache.build_if_missing else None)
    from distillery.data.augment import AugmentConfig
    from distillery.data.views import view_recipe

    # Views replayed in training must be the ones the cache drew: same K, same probabilities.
    recipe = _view_recipe(cfg)
    cache.check_views(cfg.cache.views, view_recipe(AugmentConfig(
        size=cfg.student.input_size, photometric_prob=recipe.photometric_prob,
        iou_crop_prob=recipe.iou_crop_prob, flip_prob=recipe.flip_prob)))
    cache.check_covers(train.image_ids)
    return cache


def _view_recipe(cfg: DistillConfig) -> ViewRecipe:
    """The cache-side view recipe implied by the training job's augmentation section."""
    return ViewRecipe(photometric_prob=cfg.augment.photometric_prob, iou_crop_prob=cfg.augment.iou_crop_prob,
                      flip_prob=cfg.augment.flip_prob)


def load_train_val(data, report_dir: str) -> tuple[CocoDataset, CocoDataset]:
    """The train and val splits of ``data`` (a job's DataConfig), validated as they load (bad
    records reported under ``report_dir``); refuses splits whose category tables differ."""
    splits = {}
    for split in ("train", "val"):
        from distillery.platform.datasets.formats import load_split  # data.format: coco, yolo or voc

        splits[split] = load_split(data, split, report_uri=storage.join(report_dir, f"{split}.jsonl"))
    train, val = splits["train"], splits["val"]
    if val.categories != train.categories:
        raise ValueError(f"train and val category tables differ: {train.annotation_uri} vs {val.annotation_uri}")
    return train, val


def fit_on_ray_train(worker, cfg, run_info: dict[str, Any], train_ds, *, name: str, storage_path: str,
                     use_gpu: bool, callbacks=None):
    """Run ``worker`` on ``cfg.train.num_workers`` Ray Train workers (TorchTrainer, Train V2) with the
    job's checkpoint and failure settings; return ``(result, best checkpoint by AP or None)``.

    Shared by the distillation and MoE-tuning jobs: ``cfg`` is either job's config (its ``train``
    section has the fields read here), ``run_info`` reaches every worker with the config."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from distillery.platform.engine.progress import WORKER_ENV

    run_config = ray.train.RunConfig(
        name=name, storage_path=None if storage.has_protocol(storage_path) else storage_path,
        storage_filesystem=_storage_filesystem(storage_path),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                                     checkpoint_score_attribute="AP",
                                                     checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(callbacks or []),
        # Ray Train's INFO lines (each rank's whole metrics dict per report, every checkpoint
        # path) drown the progress lines rank 0 prints; its warnings and errors still show.
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        worker_runtime_env={"env_vars": dict(WORKER_ENV)})
    if storage.has_protocol(storage_path):
        run_config.storage_path = storage.filesystem(storage_path)[1]
    trainer = TorchTrainer(
        worker, train_loop_config={"cfg": cfg.model_dump(mode="json"), "run": run_info},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=run_config, datasets={"train": train_ds})
    _install_failure_policy()
    result = trainer.fit()
    # Ray keeps the top checkpoints by AP, listed in report order: pick the best one.
    scored = [(c, m.get("AP", float("-inf"))) for c, m in (result.best_checkpoints or [])]
    scored = [(c, ap if ap == ap else float("-inf")) for c, ap in scored]  # NaN -> lowest
    best = max(scored, key=lambda cm: cm[1])[0] if scored else result.checkpoint
    return result, best


def _install_failure_policy() -> None:
    """Make Ray Train raise at once when a worker fails with a :class:`DeterministicError` (a
    corrupt checkpoint, bad data, an unknown model): a retry would fail the same way, so it must
    not consume ``train.max_failures``. Ray Train V2 builds its failure policy in
    ``create_failure_policy`` with no public hook to choose another; ours wraps the default."""
    from ray.train.v2.api import data_parallel_trainer

    from distillery.platform.engine.failure_policy import create_failure_policy

    data_parallel_trainer.create_failure_policy = create_failure_policy


def _grid_of(fp: dict[str, Any]) -> tuple[int, int]:
    side = fp["input_size"] // fp["pool"] // fp["patch_size"]
    return side, side


def prepare_inputs(cfg: DistillConfig) -> None:
    """Make sure the dataset and, in cached mode, the train split's feature cache exist.

    A sweep calls this once before its trials start, so that concurrent trials never race to
    build the same cache. Uses the running Ray instance (or starts one, like the job)."""
    from distillery.platform.cluster.runtime import cluster_has_gpus, ray_session

    cfg = _with_absolute_paths(cfg)
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)  # before the first storage access
    ensure_dataset(cfg.data)
    if cfg.teacher_mode != "cached":
        return
    from distillery.platform.datasets.formats import load_split

    train = load_split(cfg.data, "train", check_images="none",
                       report_uri=storage.join(cfg.output.local_dir, "bad_records", "prepare_train.jsonl"))
    with ray_session(cfg.ray, cfg.storage, min_local_cpus=3):
        use_gpu = cluster_has_gpus() if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)
        dtype = resolve_teacher_dtype(cfg.teacher, use_gpu)
        teacher = build_teacher(cfg.teacher.model_dump(), dtype)
        _prepare_cache(cfg, train, teacher.fingerprint, dtype, use_gpu)


def run_distill(cfg: DistillConfig, *, callbacks: list | None = None, parent_run_id: str | None = None,
                extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train a student with Ray Train + DeepSpeed; return a summary (AP, paths, run id).

    ``callbacks`` are Ray Train callbacks (a sweep passes Tune's ``TuneReportCallback``);
    ``parent_run_id`` makes the MLflow run a child (one per sweep trial); ``extra_tags`` are
    added to it."""
    import ray.data

    from distillery.platform.cluster.runtime import cluster_has_gpus, ray_session
    from distillery.platform.datasets.ingest import build_train_dataset
    from distillery.platform.engine.progress import filter_ray_log_noise, quiet_driver_noise
    from distillery.platform.tracking.runs import create_run, resolve_tracking_uri, tracking_reachable
    from distillery.platform.engine.worker import train_worker

    t0 = time.time()
    cfg = _with_absolute_paths(cfg)
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)  # before the first storage access
    local_dir = Path(cfg.output.local_dir)
    name = cfg.output.name or time.strftime("distill-%Y%m%d-%H%M%S")
    storage_path = cfg.output.storage_path
    run_storage = storage.join(storage_path, name)

    # --- inputs, checked before anything runs
    # (the checkpoint to resume first: checking its files takes seconds, building a dataset minutes)
    resume_checkpoint = find_latest_checkpoint(cfg.output.resume_from) if cfg.output.resume_from else None
    ensure_dataset(cfg.data)
    train, val = load_train_val(cfg.data, storage.join(str(local_dir), "bad_records", name))
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, local_dir)
    tracking_reachable(tracking_uri)
    gam = resolve_gam(cfg)

    # Training workers hold their CPUs for the whole run; ingest (parquet read, join, decode)
    # needs a couple more logical CPUs beside them.
    with ray_session(cfg.ray, cfg.storage, min_local_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + 2):
        filter_ray_log_noise()
        quiet_driver_noise()
        use_gpu = cluster_has_gpus() if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)
        teacher_dim, cache_meta, fingerprint, teacher_dtype = None, None, None, None
        dataset_cache = None
        if cfg.teacher_mode != "none":
            teacher_dtype = resolve_teacher_dtype(cfg.teacher, use_gpu)
            teacher = build_teacher(cfg.teacher.model_dump(), teacher_dtype)
            fingerprint, teacher_dim = teacher.fingerprint, teacher.embed_dim
            del teacher
        if cfg.teacher_mode == "cached":
            dataset_cache = _prepare_cache(cfg, train, fingerprint, teacher_dtype, use_gpu)
            cache_meta = {"dtype": dataset_cache.dtype, "grid": list(dataset_cache.grid),
                          "views": dataset_cache.views, "uri": dataset_cache.uri}
        # Per-operator progress bars of a dataset streamed for hours only flood the job log, and
        # so does its execution plan, printed again every epoch: rank 0 prints progress instead.
        data_context = ray.data.DataContext.get_current()
        data_context.enable_progress_bars = False
        data_context.print_on_execution_start = False
        # A data error raised in an ingest task (a corrupt image) keeps its own class instead of
        # Ray Data's UserCodeException (whose cause is lost on the way): deterministic, no retry.
        data_context.raise_original_map_exception = True
        train_ds = build_train_dataset(train, dataset_cache, bad_records=cfg.data.bad_records,
                                       report_uri=storage.join(run_storage, "bad_records"))

        # --- tracking: one run per job; rank 0 logs into it
        params = flatten_config(cfg)
        tags = {"distillery.run_storage": run_storage, "distillery.git_commit": _git_commit(),
                "distillery.config_hash": config_hash(cfg), "distillery.dataset_sha256": train.annotation_sha256,
                "distillery.teacher_mode": cfg.teacher_mode}
        if fingerprint is not None:
            from distillery.platform.cache.feature_cache import fingerprint_digest

            tags["distillery.teacher_fingerprint"] = fingerprint_digest(fingerprint)
        if dataset_cache is not None:
            tags["distillery.cache_manifest_sha256"] = manifest_sha256(dataset_cache.uri)
        tags.update(extra_tags or {})
        run_id = create_run(tracking_uri, cfg.tracking.experiment, name, params, tags, parent_run_id=parent_run_id)

        per_step = cfg.train.batch_size * cfg.train.num_workers * cfg.deepspeed.gradient_accumulation_steps
        steps_per_epoch = max(1, len(train) // per_step)
        if cfg.debug.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.debug.max_steps_per_epoch)
        from distillery.platform.datasets.formats import coco_split_paths  # workers evaluate on a COCO file

        val_ann, val_images = coco_split_paths(cfg.data, "val", val, storage.join(run_storage, "data"))
        run_info = {"num_classes": train.categories.num_classes, "categories": train.categories.to_dict(),
                    "teacher_dim": teacher_dim, "teacher_dtype": teacher_dtype, "cache_meta": cache_meta,
                    "gam": gam, "steps_per_epoch": steps_per_epoch, "val_annotations": val_ann,
                    "val_images": val_images, "tracking_uri": tracking_uri, "run_id": run_id,
                    "run_storage": run_storage, "resume_checkpoint": resume_checkpoint}

        with _mlflow_status(tracking_uri, run_id):
            result, best = fit_on_ray_train(train_worker, cfg, run_info, train_ds, name=name,
                                            storage_path=storage_path, use_gpu=use_gpu, callbacks=callbacks)
            summary = {"run_id": run_id, "tracking_uri": tracking_uri, "experiment": cfg.tracking.experiment,
                       "run_storage": run_storage, "best_checkpoint": best.path if best else None,
                       "last_checkpoint": result.checkpoint.path if result.checkpoint else None,
                       "metrics": dict(result.metrics or {}),
                       "gam_history": _gam_history(result.checkpoint)}
            from distillery.platform.serving.export import log_final_model

            summary.update(log_final_model(cfg, summary, run_info, best))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    return summary


def _gam_history(checkpoint) -> list[dict[str, Any]]:
    """Every epoch's GAM record (AIFI share, lambda) from the last checkpoint's state."""
    from distillery.platform.engine.worker import STATE_JSON

    if checkpoint is None:
        return []
    with checkpoint.as_directory() as d:
        state_file = Path(d) / STATE_JSON
        return json.loads(state_file.read_text()).get("gam_history", []) if state_file.is_file() else []


@contextlib.contextmanager
def _mlflow_status(tracking_uri: str, run_id: str):
    """Mark the MLflow run FINISHED, or FAILED if anything in the block raises."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _with_absolute_paths(cfg: DistillConfig) -> DistillConfig:
    """Relative local paths resolved against the driver's directory: Ray Train workers run elsewhere."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.root = absolute_uri(cfg.data.root)
    cfg.cache.uri = absolute_uri(cfg.cache.uri)
    cfg.output.storage_path = absolute_uri(cfg.output.storage_path)
    cfg.output.local_dir = absolute_uri(cfg.output.local_dir)
    if cfg.output.resume_from:
        cfg.output.resume_from = absolute_uri(cfg.output.resume_from)
    if cfg.teacher.weights:
        cfg.teacher.weights = absolute_uri(cfg.teacher.weights)
    return cfg


def _storage_filesystem(storage_path: str):
    """A pyarrow filesystem for S3 run storage that uses our fsspec/S3 settings (endpoint,
    credentials from the environment); None for local paths."""
    return storage.pyarrow_filesystem(storage_path) if storage.has_protocol(storage_path) else None
