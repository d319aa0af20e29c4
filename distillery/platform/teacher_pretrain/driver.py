"""The teacher-pretraining job's driver: its steps in the engine's set-up (:class:`TeacherPretrainDriver`).

``run_teacher_pretrain(cfg)`` is what ``jobs/pretrain_teacher.py --engine`` calls. Before Ray
starts: the ViT is built (an unknown model, an input size that is no multiple of pool x patch or
an ``init_weights`` file that does not fit fails here, naming the key) and the dense loss's class
weights are counted from the train split's annotations. After training: the best checkpoint's
teacher file is copied to ``<run storage>/teacher.pth`` with ``teacher.json`` beside it (the
``teacher.*`` keys that load it) and logged to the MLflow run (``export/``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from distillery.platform.config.sections import ConfigError
from distillery.platform.datasets.formats import coco_split_paths
from distillery.platform.engine.checkpoints import read_record
from distillery.platform.engine.driver import JobDriver, run_training_job
from distillery.platform.io import storage
from distillery.platform.io.weights_source import resolve_weights_source
from distillery.platform.teacher_pretrain.config import TeacherPretrainConfig
from distillery.platform.teacher_pretrain.patch_data import split_class_weights
from distillery.platform.teacher_pretrain.spec import SPEC, TEACHER_FILE, TeacherPretrainRun
from distillery.platform.tracking.runs import log_best_metrics, tracking_uri_scope
from distillery.teachers.dinov3 import build_dinov3_vit
from distillery.teachers.dinov3_weights import load_teacher_weights

__all__ = ["TeacherPretrainDriver", "run_teacher_pretrain"]

log = logging.getLogger(__name__)


def run_teacher_pretrain(cfg: TeacherPretrainConfig, *, callbacks: list | None = None, parent_run_id: str | None = None,
                         extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Pretrain a DINOv3 teacher on ``cfg.data``; return the summary (the teacher file, its
    ``teacher.*`` keys, the val metrics before and after)."""
    return run_training_job(SPEC, cfg, callbacks=callbacks, parent_run_id=parent_run_id, extra_tags=extra_tags)


class TeacherPretrainDriver(JobDriver):
    def check_inputs(self) -> TeacherPretrainConfig:
        m, train = self.cfg.model, self.launch.train
        try:
            vit = build_dinov3_vit(m.model_name, m.model_kwargs, seed=m.seed)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ConfigError(f"model.model_name={m.model_name!r} / model.model_kwargs: {exc}") from None
        patch = int(vit.patch_embed.patch_size[0])
        if m.input_size % (m.pool * patch):
            raise ConfigError(f"model.input_size ({m.input_size}) must be a multiple of model.pool x the patch size "
                              f"({m.pool} x {patch})")
        if m.init_weights and self.launch.resume_checkpoint is None:
            load_teacher_weights(vit, resolve_weights_source(m.init_weights)[0])   # a wrong file fails here
        self.grid = m.input_size // m.pool // patch
        self.num_classes = train.categories.num_classes + 1
        self.class_weights, counts = split_class_weights(train, self.num_classes, m.input_size, self.grid)
        absent = [name for name, n in zip(("background", *train.categories.names), counts) if n == 0]
        if absent:
            log.warning("teacher pretraining: no patch of the train split at a %dx%d grid is of class %s (weight 0)",
                        self.grid, self.grid, ", ".join(absent))
        return self.cfg

    def shared_paths(self) -> dict[str, str | None]:
        return {"model.init_weights": self.cfg.model.init_weights}

    def step_limit(self) -> int | None:
        return self.cfg.train.steps_per_epoch

    def tags(self) -> dict[str, str]:
        return {"distillery.teacher_model": self.cfg.model.model_name,
                "distillery.teacher_init": self.cfg.model.init_weights or f"random (seed {self.cfg.model.seed})"}

    def describe_run(self, **common: Any) -> TeacherPretrainRun:
        launch = self.launch
        probe_annotations, probe_images = coco_split_paths(self.cfg.data, "train", launch.train,
                                                           storage.join(launch.run_storage, "data"))
        return TeacherPretrainRun(num_classes=self.num_classes, grid=self.grid, class_weights=self.class_weights,
                                  probe_annotations=probe_annotations, probe_images=probe_images, **common)

    def summary(self, run: TeacherPretrainRun, result, best) -> dict[str, Any]:
        """The best checkpoint's teacher file, copied to the run storage and logged to the MLflow run."""
        if best is None:
            raise RuntimeError("training finished without a checkpoint: no teacher to write")
        weights, keys_file = storage.join(run.run_storage, TEACHER_FILE), storage.join(run.run_storage, "teacher.json")
        with best.as_directory() as d:
            record = read_record(d, SPEC)
            storage.write_bytes(weights, (Path(d) / TEACHER_FILE).read_bytes())
        teacher = {**record.teacher, "weights": weights}
        storage.write_text(keys_file, json.dumps({"teacher": teacher, "checkpoint_epoch": record.epoch,
                                                  "metrics": record.metrics, "initial_metrics": record.initial_metrics},
                                                 indent=1))
        with tracking_uri_scope(run.tracking_uri), mlflow.start_run(run_id=run.run_id), \
                tempfile.TemporaryDirectory() as tmp:
            for uri in (weights, keys_file):
                local = Path(tmp) / uri.rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(uri))
                mlflow.log_artifact(str(local), artifact_path="export")
            log_best_metrics(record.metrics)
        return {"teacher": teacher, "checkpoint_epoch": record.epoch, "best_metrics": record.metrics,
                "initial_metrics": record.initial_metrics}
