"""The teacher-pretraining job's spec: its kind (spelled here alone), its run description, its
checkpoint record and file, and where its worker-side job and its driver live."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distillery.platform.engine.checkpoints import CheckpointRecord
from distillery.platform.engine.run_spec import RunDescription
from distillery.platform.engine.spec import JobSpec
from distillery.platform.teacher_pretrain.config import TeacherPretrainConfig

__all__ = ["SPEC", "TEACHER_FILE", "TeacherPretrainRecord", "TeacherPretrainRun"]

# The job's file in a checkpoint directory (beside the engine's), and in its run storage (the best one's).
TEACHER_FILE = "teacher.pth"   # the ViT in Meta's DINOv3 layout: what teacher.weights= loads


@dataclass(kw_only=True)
class TeacherPretrainRun(RunDescription):
    num_classes: int                  # the dataset's categories + the background (class 0)
    grid: int                         # patches per side: input_size / pool / patch size
    class_weights: list[float]        # the dense loss's, from the train split's patch counts
    probe_annotations: str            # the train split as COCO: the probe is fitted on its first images
    probe_images: str


@dataclass
class TeacherPretrainRecord(CheckpointRecord):
    initial_metrics: dict[str, float] | None = None   # the same evaluation of the model before training
    teacher: dict[str, Any] = field(default_factory=dict)   # teacher.* keys that load TEACHER_FILE


SPEC = JobSpec(name="teacher_pretrain", config_class=TeacherPretrainConfig, run_class=TeacherPretrainRun,
               record_class=TeacherPretrainRecord, job="distillery.platform.teacher_pretrain.job:TeacherPretrainJob",
               driver="distillery.platform.teacher_pretrain.driver:TeacherPretrainDriver",
               description="pretrain a DINOv3 teacher on a dataset's boxes (dense per-patch classes)",
               best_metric="balanced_accuracy")
