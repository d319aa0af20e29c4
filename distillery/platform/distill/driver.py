"""The distillation job's driver: its steps in the engine's set-up (:class:`DistillDriver`:
teacher, student weights, GAM settings, feature cache), and the cache preparation a sweep runs
once before its trials (:func:`prepare_inputs`).

``run_distill(cfg)`` is what ``jobs/distill.py`` calls. Everything that can be checked before a
worker starts is checked on the driver (dataset, cache fingerprint and coverage, tracking server,
checkpoint to resume), so a bad input fails in seconds with a message naming it, and nothing
already written is touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distillery.data.views import view_recipe
from distillery.platform.cache.job import (cache_split, build_teacher, ensure_dataset, open_training_cache,
                                           resolve_teacher_dtype)
from distillery.platform.cluster.runtime import cluster_has_gpus, ray_session
from distillery.platform.config.augment import runtime_augment_config
from distillery.platform.config.cache import CacheComputeConfig, CacheFeaturesConfig, CacheSettings
from distillery.platform.config.distill import DistillConfig
from distillery.platform.config.sections import with_absolute_paths
from distillery.platform.datasets.coco import CocoDataset
from distillery.platform.datasets.formats import load_split
from distillery.platform.distill.teacher_signal import teacher_signal
from distillery.platform.distill.spec import SPEC, DistillRun, GamSettings
from distillery.platform.engine.checkpoints import ENGINE_STATE, best_run_checkpoint, read_record
from distillery.platform.engine.driver import JobDriver, run_training_job
from distillery.platform.io import storage
from distillery.platform.io.weights_source import StudentWeightsError, is_remote_source, resolve_registry_weights
from distillery.platform.serving.export import log_final_model
from distillery.platform.serving.predict import MODEL_JSON
from distillery.platform.teacher_pretrain.resolve import resolve_teacher
from distillery.students.gam import GAM_DEFAULTS
from distillery.platform.cache.checks import fingerprint_digest
from distillery.platform.cache.feature_cache import FeatureCache, manifest_sha256

__all__ = ["DistillDriver", "prepare_inputs", "resolve_gam", "resolve_student_weights", "run_distill"]

log = logging.getLogger(__name__)


def resolve_gam(cfg: DistillConfig) -> dict[str, Any]:
    """GAM settings: the config's values, else the official per-size defaults (S for the tiny
    test student)."""
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
    if not g.enabled and out["lambda0"] == 0 and teacher_signal(cfg).needs_teacher:
        log.warning("gam.enabled=false with gam.lambda0=0: loss_dsi is computed and logged but its weight is 0, so "
                    "the student is NOT being distilled (set gam.lambda0 to the fixed DSI weight)")
    return out


def _prepare_cache(cfg: DistillConfig, train: CocoDataset, fingerprint: dict[str, Any], dtype: str,
                   use_gpu: bool) -> FeatureCache:
    """Open the train-split cache (building it first when allowed); refuse a foreign teacher."""
    uri = storage.join(cfg.cache.uri, "train")

    def build() -> None:  # builds a missing cache, repairs a damaged one (cache.build_if_missing)
        log.info("building the feature cache at %s", uri)
        cache_cfg = CacheFeaturesConfig(data=cfg.data, teacher=cfg.teacher, ray=cfg.ray, storage=cfg.storage,
                                        cache=CacheSettings(uri=cfg.cache.uri, dtype=cfg.cache.dtype, pca=cfg.cache.pca,
                                                            shard_size=cfg.cache.shard_size, splits=["train"],
                                                            views=cfg.cache.views, view_recipe=cfg.augment.view_recipe()),
                                        compute=CacheComputeConfig())
        grid = [fingerprint["embed_dim"], *_grid_of(fingerprint)]
        cache_split(cache_cfg, "train", train, fingerprint, grid, dtype, use_gpu)

    cache = open_training_cache(uri, fingerprint, train.image_ids, build if cfg.cache.build_if_missing else None,
                                codec=cfg.cache.codec_spec(fingerprint["embed_dim"]))
    # Views replayed in training must be the ones the cache drew: same K, same probabilities.
    cache.check_views(cfg.cache.views, view_recipe(runtime_augment_config(cfg.augment, cfg.student.input_size)))
    return cache


def _grid_of(fp: dict[str, Any]) -> tuple[int, int]:
    side = fp["input_size"] // fp["pool"] // fp["patch_size"]
    return side, side


def resolve_student_weights(cfg: DistillConfig, tracking_uri: str, local_dir: Path) -> DistillConfig:
    """``student.weights`` as the workers will read it, resolved here on the driver before Ray
    starts: ``models:/<name>@<alias>`` (or ``/<version>``) looked up in the job's own tracking
    store and downloaded under ``output.local_dir/models/``; a run directory (the Ray Train run
    storage: ``distillery_model.json`` + ``checkpoint_*``) as its best checkpoint, as
    ``predict --model <run dir>`` picks it; a local path that is not there, or a directory that
    holds no weights, refused at once. ``hf-hub:`` and ``https://`` sources stay as they are."""
    source = cfg.student.weights
    if not source or is_remote_source(source):
        return cfg
    if source.startswith("models:/"):
        resolved = resolve_registry_weights(source, tracking_uri, local_dir)
    else:
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise StudentWeightsError(f"student.weights={source}: no such file or directory")
        resolved = str(path)
        if path.is_dir():
            if (path / MODEL_JSON).is_file():  # a run directory: its best checkpoint
                resolved = str(best_run_checkpoint(path))
            elif not any((path / name).is_file() for name in (ENGINE_STATE, "weights.safetensors",
                                                              "export/weights.safetensors")):
                raise StudentWeightsError(f"student.weights={source}: this directory is neither a run directory "
                                          f"({MODEL_JSON} + checkpoint_*), a checkpoint ({ENGINE_STATE}) nor an "
                                          "export (weights.safetensors)")
    if resolved != source:
        log.info("student.weights %s -> %s", source, resolved)
    return cfg.model_copy(update={"student": cfg.student.model_copy(update={"weights": resolved})})


def prepare_inputs(cfg: DistillConfig) -> None:
    """Make sure the dataset and, in cached mode, the train split's feature cache exist.

    A sweep calls this once before its trials start, so that concurrent trials never race to
    build the same cache. Uses the running Ray instance (or starts one, like the job)."""
    cfg = with_absolute_paths(cfg)
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)  # before the first storage access
    ensure_dataset(cfg.data)
    if not teacher_signal(cfg).needs_cache:
        return
    cfg = cfg.model_copy(update={"teacher": resolve_teacher(cfg.teacher, cfg.data)})  # the domain teacher, if used
    train = load_split(cfg.data, "train", check_images="none",
                       report_uri=storage.join(cfg.output.local_dir, "bad_records", "prepare_train.jsonl"))
    with ray_session(cfg.ray, cfg.storage, min_local_cpus=3):
        use_gpu = cluster_has_gpus() if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)
        dtype = resolve_teacher_dtype(cfg.teacher, use_gpu)
        teacher = build_teacher(cfg.teacher.model_dump(), dtype)
        _prepare_cache(cfg, train, teacher.fingerprint, dtype, use_gpu)


def run_distill(cfg: DistillConfig, *, callbacks: list | None = None, parent_run_id: str | None = None,
                extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train a student with Ray Train + DeepSpeed; return a summary (AP, paths, run id): the
    engine's set-up (:func:`~distillery.platform.engine.driver.run_training_job`) with this job's
    steps (:class:`DistillDriver`)."""
    return run_training_job(SPEC, cfg, callbacks=callbacks, parent_run_id=parent_run_id, extra_tags=extra_tags)


class DistillDriver(JobDriver):
    """The distillation job's driver steps: the teacher (resolved, then built once on the cluster
    for its fingerprint and width), the student's weights, GAM's settings, the feature cache."""

    def check_inputs(self) -> DistillConfig:
        cfg, launch = self.cfg, self.launch
        self.signal = teacher_signal(cfg)
        if self.signal.needs_teacher:  # the domain teacher (built on first use), if it is the one in use
            cfg = cfg.model_copy(update={"teacher": resolve_teacher(cfg.teacher, cfg.data)})
        self.weights_source = cfg.student.weights
        cfg = resolve_student_weights(cfg, launch.tracking_uri, launch.local_dir)
        self.gam = GamSettings(**resolve_gam(cfg))
        self.teacher_dim, self.teacher_dtype, self.fingerprint, self.cache = None, None, None, None
        return cfg

    def shared_paths(self) -> dict[str, str | None]:
        return {"cache.uri": self.cfg.cache.uri if self.signal.needs_cache else None,
                "student.weights": self.cfg.student.weights}

    def on_cluster(self) -> FeatureCache | None:
        cfg, use_gpu = self.cfg, self.launch.use_gpu
        if self.signal.needs_teacher:
            self.teacher_dtype = resolve_teacher_dtype(cfg.teacher, use_gpu)
            teacher = build_teacher(cfg.teacher.model_dump(), self.teacher_dtype)
            self.fingerprint, self.teacher_dim = teacher.fingerprint, teacher.embed_dim
            del teacher
        if self.signal.needs_cache:
            self.cache = _prepare_cache(cfg, self.launch.train, self.fingerprint, self.teacher_dtype, use_gpu)
        return self.cache

    def step_limit(self) -> int | None:
        return self.cfg.debug.max_steps_per_epoch

    def tags(self) -> dict[str, str]:
        tags = {"distillery.teacher_mode": self.signal.mode}
        if self.weights_source and self.weights_source != self.cfg.student.weights:  # as given, before resolving
            tags["distillery.student_weights_source"] = self.weights_source
        if self.fingerprint is not None:
            tags["distillery.teacher_fingerprint"] = fingerprint_digest(self.fingerprint)
        if self.cache is not None:
            tags["distillery.cache_manifest_sha256"] = manifest_sha256(self.cache.uri)
        return tags

    def describe_run(self, **common: Any) -> DistillRun:
        train = self.launch.train
        return DistillRun(num_classes=train.categories.num_classes, categories=train.categories.to_dict(),
                          teacher_dim=self.teacher_dim, teacher_dtype=self.teacher_dtype,
                          cache_meta=self.cache.ingest_meta() if self.cache is not None else None, gam=self.gam,
                          **common)

    def summary(self, run: DistillRun, result, best) -> dict[str, Any]:
        return {"gam_history": _gam_history(result.checkpoint), **log_final_model(self.cfg, run, best)}


def _gam_history(checkpoint) -> list[dict[str, Any]]:
    """Every epoch's GAM record (AIFI share, lambda) from the last checkpoint's state."""
    if checkpoint is None:
        return []
    with checkpoint.as_directory() as d:
        return read_record(d, SPEC).gam_history


