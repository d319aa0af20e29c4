"""The teacher-pretraining job's configuration (``jobs/pretrain_teacher.py --engine``).

A DINOv3 ViT (timm, built as the frozen teacher builds it) trained on a dataset's train split with
the dense objective of :mod:`distillery.teachers.dense_pretrain` (a linear head on its patch tokens
predicts the class of the box holding each patch's centre, 0 for the background), on Ray Train +
DeepSpeed workers, evaluated each epoch on the val split by a linear probe of its frozen patch
features (balanced per-patch accuracy), its weights written in Meta's DINOv3 layout for
``teacher.weights=`` of the distillation and cache jobs.

Defaults are the embedded default: the synthetic dataset, the domain teacher's architecture (6
blocks, width 192) from a random initialisation at 256 px pooled by 2. ``model.init_weights``
starts from a checkpoint instead (Meta's ``.pth``, a timm state dict, ``hf-hub:``, ``https://``):
fine-tuning a released DINOv3 on your own data.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt, field_validator

from distillery.platform.config.sections import (DataConfig, DebugSettings, DeepSpeedSettings, JobConfig,
                                                 OptionalLocalPath, RunOutputSettings, StrictModel, TrackingSettings,
                                                 TrainSettings)
from distillery.platform.io.weights_source import check_weights_source

__all__ = ["TeacherPretrainConfig"]


class PretrainModelSettings(StrictModel):
    """The ViT trained, with the keys of the jobs' ``teacher`` section that load its file."""

    model_name: str = "vit_small_patch16_dinov3"
    model_kwargs: dict[str, int | float | bool | str] = Field(
        default_factory=lambda: {"embed_dim": 192, "depth": 6, "num_heads": 3})
    init_weights: OptionalLocalPath = None  # a checkpoint to start from; None: random weights from seed
    seed: int = 0                           # the initialisation (ViT: seed; patch head: seed + 2)
    input_size: int = Field(256, ge=32)     # the teacher's input side (images resized to it, square)
    pool: int = Field(2, ge=1)              # average-pooled by this before the ViT (as the teacher does)

    @field_validator("init_weights")
    @classmethod
    def _weights_reachable(cls, weights: str | None) -> str | None:
        return check_weights_source(weights, "model.init_weights")


class DenseOptimSettings(StrictModel):
    """AdamW with a linear warm-up then cosine to zero over the run (``dense_lr_factor``)."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(30, ge=0)
    clip_max_norm: float = Field(1.0, ge=0)


class PretrainTrainSettings(TrainSettings):
    steps_per_epoch: PositiveInt | None = None  # None: one pass over the train split
    flip: bool = True                           # random horizontal flips (image and label grid)


class ProbeEvalSettings(StrictModel):
    """The evaluation: a linear probe of the frozen patch features, fitted on ``probe_images`` train
    images and scored on the whole val split (``linear_probe``)."""

    probe_images: PositiveInt = 200
    probe_steps: PositiveInt = 300


class TeacherPretrainConfig(JobConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    model: PretrainModelSettings = Field(default_factory=PretrainModelSettings)
    optim: DenseOptimSettings = Field(default_factory=DenseOptimSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    train: PretrainTrainSettings = Field(default_factory=lambda: PretrainTrainSettings(epochs=12, batch_size=16))
    eval: ProbeEvalSettings = Field(default_factory=ProbeEvalSettings)
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="distillery-teacher"))
    output: RunOutputSettings = Field(default_factory=lambda: RunOutputSettings(storage_path="runs/teacher_pretrain"))
    debug: DebugSettings = Field(default_factory=DebugSettings)
