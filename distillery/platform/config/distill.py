"""The distillation job's configuration (``jobs/distill.py``).

Defaults are the *embedded default*: the synthetic dataset, a small RT-DETRv4 student (the same
classes as the paper sizes with smaller numbers) at 256 px, trained with DSI + GAM from a cached
DINOv3 ViT-B/16 teacher on 2 Ray Train workers on CPU for 12 epochs (about 5 minutes on 2
cores; the schedule is the reference's, compressed: strong augmentation in epochs 3-8, Mosaic and
Mixup in 3-5, no augmentation in the last three). The paper recipes live in ``configs/``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from distillery.platform.config.sections import (DataConfig, RayConfig, StorageConfig, StrictModel,
                                        SyntheticDataConfig, TeacherConfig)

__all__ = ["DistillConfig"]


class PeftSettings(StrictModel):
    """Parameter-efficient tuning of a DEIMv2 ViT backbone (distillery.students.peft.apply_peft):
    the ViT is frozen and only adapters (+ router for AdaRoute), the STA, encoder and decoder train."""

    method: Literal["none", "adaroute", "lora"] = "none"
    rank: PositiveInt = 16
    # AdaRoute: experts per shared centre (default: one per adapted block), sparse top-k mixing
    # (default: dense softmax), router MLP width.
    num_experts: PositiveInt | None = None
    top_k: PositiveInt | None = None
    router_hidden: PositiveInt = 16
    # LoRA scaling alpha (default alpha = rank).
    lora_alpha: float | None = Field(None, gt=0)
    # Which ViT blocks (indices, negative allowed) and which Linear sub-layers of each block.
    blocks: list[int] | None = None
    sublayers: list[str] | None = None

    def kwargs(self) -> dict[str, Any]:
        """The ``peft`` argument of :func:`distillery.students.build_student`."""
        out = self.model_dump(exclude_none=True)
        if self.method != "adaroute":
            for key in ("num_experts", "top_k", "router_hidden"):
                out.pop(key, None)
        if self.method != "lora":
            out.pop("lora_alpha", None)
        return out if self.method != "none" else {"method": "none"}


def known_student_names() -> list[str]:
    """Every name ``build_student`` accepts: the RT-DETRv4 sizes and the DEIMv2 ones."""
    from distillery.students.deimv2 import DEIMV2_SPECS
    from distillery.students.rtdetrv4 import STUDENT_SPECS

    return sorted({*STUDENT_SPECS, *DEIMV2_SPECS})


class StudentSettings(StrictModel):
    name: str = "rtdetrv4_tiny"
    input_size: int = Field(256, ge=64, multiple_of=32)
    # Keyword overrides passed to build_student (e.g. num_queries, num_decoder_layers).
    overrides: dict[str, Any] = Field(default_factory=dict)
    peft: PeftSettings = Field(default_factory=PeftSettings)
    # Whole-model weights loaded after the build (build_student(weights=...)): an official
    # RT-DETRv4 / DEIMv2 release .pth, a Distillery checkpoint or export, a state dict or
    # .safetensors; a local path, hf-hub:<repo> or https:// URL.
    weights: str | None = None
    # Checkpoint trained on other classes: "coco" keeps the class rows of the dataset categories
    # named like COCO's; {category name: checkpoint class index} keeps those; None re-initialises.
    class_map: Literal["coco"] | dict[str, int] | None = None
    # HGNetv2 ImageNet weights (timm layout or the official stage-1 .pth; path, hf-hub:, https://).
    backbone_weights: str | None = None

    @model_validator(mode="after")
    def _weights_reachable(self) -> "StudentSettings":
        from distillery.platform.io.weights_source import check_weights_source

        check_weights_source(self.weights, "student.weights")
        check_weights_source(self.backbone_weights, "student.backbone_weights")
        if self.backbone_weights is not None and "backbone_weights" in self.overrides:
            raise ValueError("student.backbone_weights and student.overrides.backbone_weights are both set; keep one")
        if self.class_map is not None and self.weights is None:
            raise ValueError("student.class_map needs student.weights (the checkpoint whose class rows it keeps)")
        return self

    @field_validator("name")
    @classmethod
    def _known_student(cls, name: str) -> str:
        # Checked here, before Ray starts, rather than by build_student in every worker.
        valid = known_student_names()
        if name not in valid:
            raise ValueError(f"unknown student {name!r}; valid names: {', '.join(valid)}")
        return name

    @model_validator(mode="after")
    def _peft_needs_a_vit(self) -> "StudentSettings":
        if self.peft.method == "none":
            return self  # (no torch import for the common case: configs validate in a blink)
        from distillery.students.deimv2 import DEIMV2_SPECS, DISTILLED_VIT, TIMM_DINOV3_VITS

        spec = DEIMV2_SPECS.get(self.name)
        backbone = self.overrides.get("backbone", spec.backbone if spec is not None else None)
        if backbone != DISTILLED_VIT and backbone not in TIMM_DINOV3_VITS:
            raise ValueError(f"student.peft.method={self.peft.method} needs a ViT backbone (deimv2_s/m/l/x/tiny); "
                             f"{self.name} has {backbone or 'an HGNetv2 CNN'}")
        return self


class CacheRef(StrictModel):
    uri: str = "runs/cache/synthetic-dinov3-vitb16-256"
    dtype: Literal["fp16", "int8"] = "fp16"
    shard_size: PositiveInt = 32
    # Teacher grids per image in the cache: 1 = plain images only; K > 1 = plain + K-1
    # pre-augmented views (cache job `cache.views`), one per image and strong epoch in training.
    # Must equal the cache manifest's `views` (checked before the first step), and the views'
    # recipe must match the `augment` section.
    views: PositiveInt = Field(1, le=64)
    # Build the cache (train split) before training when it is absent.
    build_if_missing: bool = True


class GAMSettings(StrictModel):
    """Gradient-guided Adaptive Modulation; None fields take the per-size official defaults."""

    enabled: bool = True
    lambda0: float | None = Field(None, ge=0)
    rho: float | None = Field(None, gt=0, lt=1)
    delta: float | None = Field(None, gt=0, lt=1)
    default_weight: float | None = Field(None, ge=0)
    stop_epoch: int | None = Field(None, ge=0)
    rule: Literal["odds", "linear"] = "odds"

    @model_validator(mode="after")
    def _band(self) -> "GAMSettings":
        if self.rho is not None and self.delta is not None and self.delta >= self.rho:
            raise ValueError(f"gam.delta ({self.delta}) must be smaller than gam.rho ({self.rho})")
        return self


class OptimSettings(StrictModel):
    lr: float = Field(1e-3, gt=0)
    backbone_lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_max_norm: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    flat_epochs: int = Field(7, ge=0)
    no_aug_epochs: int = Field(3, ge=0)
    min_lr_ratio: float = Field(0.5, gt=0, le=1)
    ema_decay: float = Field(0.999, gt=0, lt=1)
    ema_warmups: int = Field(50, ge=0)


class AugmentSettings(StrictModel):
    """The reference schedule, epochs 0-based; see distillery.data.augment.AugmentConfig."""

    policy_epochs: tuple[int, int, int] = (3, 6, 9)
    mosaic_prob: float = Field(0.5, ge=0, le=1)
    mixup_prob: float = Field(0.3, ge=0, le=1)
    mixup_epochs: tuple[int, int] = (3, 6)
    photometric_prob: float = Field(0.5, ge=0, le=1)
    iou_crop_prob: float = Field(0.8, ge=0, le=1)
    flip_prob: float = Field(0.5, ge=0, le=1)
    multiscale: bool = False
    multiscale_stop_epoch: int = Field(9, ge=0)
    # DEIMv2's Copy-Blend (objects of other batch images blended in; 0 = off, as RT-DETRv4 trains).
    copyblend_prob: float = Field(0.0, ge=0, le=1)
    copyblend_epochs: tuple[int, int] = (3, 9)


class DeepSpeedSettings(StrictModel):
    zero_stage: Literal[0, 1, 2] = 0
    # bf16 on GPU; fp32 on CPU (gloo), whatever is asked here.
    bf16: bool = True
    gradient_accumulation_steps: PositiveInt = 1
    # Extra keys merged into the generated DeepSpeed config (e.g. zero_optimization buckets).
    extra: dict[str, Any] = Field(default_factory=dict)


class TrainSettings(StrictModel):
    epochs: PositiveInt = 12
    batch_size: PositiveInt = 4  # per worker
    num_workers: PositiveInt = 2
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    eval_every: PositiveInt = 1
    eval_batch_size: PositiveInt = 8
    max_failures: int = Field(1, ge=0)
    keep_checkpoints: PositiveInt = 2
    seed: int = 0
    log_every: PositiveInt = 5
    shuffle_buffer: int = Field(16, ge=0)
    # Rank 0 prints a progress line every `progress_every` steps or `progress_seconds`,
    # whichever comes first (and one summary line per epoch).
    progress_every: PositiveInt = 10
    progress_seconds: float = Field(30.0, gt=0)


class TrackingSettings(StrictModel):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under output.local_dir
    experiment: str = "distillery"
    log_model: bool = True
    system_metrics: bool = True
    num_val_images: int = Field(4, ge=0)
    # At the start of a run: this many augmented training samples with their boxes beside a PCA
    # colouring of their teacher grids (plots/augment_preview.png; 0 = off).
    augment_preview: int = Field(4, ge=0, le=16)


class OutputSettings(StrictModel):
    storage_path: str = "runs/train"  # local path or s3:// (Ray Train run storage)
    name: str | None = None  # None: a timestamped name
    local_dir: str = "runs"  # local files (sqlite tracking store, exported model)
    resume_from: str | None = None  # a run storage path (continues its latest checkpoint)


class KillSpec(StrictModel):
    rank: int = Field(1, ge=0)
    step: int = Field(3, ge=1)


class DebugSettings(StrictModel):
    # Fault injection: kill this worker process once at this global step (tests).
    kill: KillSpec | None = None
    max_steps_per_epoch: PositiveInt | None = None


def _default_teacher() -> TeacherConfig:
    # Nothing can be downloaded on a fresh machine: the embedded default asks for random
    # weights explicitly (the fingerprint records it, and a loud warning says so).
    return TeacherConfig(allow_random_init=True, input_size=256)


class DistillConfig(StrictModel):
    data: DataConfig = Field(default_factory=lambda: DataConfig(synthetic=SyntheticDataConfig()))
    teacher: TeacherConfig = Field(default_factory=_default_teacher)
    teacher_mode: Literal["cached", "online", "none"] = "cached"
    cache: CacheRef = Field(default_factory=CacheRef)
    student: StudentSettings = Field(default_factory=StudentSettings)
    gam: GAMSettings = Field(default_factory=GAMSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    debug: DebugSettings = Field(default_factory=DebugSettings)

    @model_validator(mode="after")
    def _teacher_sees_student_input(self) -> "DistillConfig":
        if self.teacher_mode != "none" and self.teacher.input_size != self.student.input_size:
            raise ValueError(
                f"teacher.input_size ({self.teacher.input_size}) must equal student.input_size "
                f"({self.student.input_size}): the teacher sees the student's input image")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> "DistillConfig":
        if self.optim.no_aug_epochs > self.train.epochs:
            raise ValueError(f"optim.no_aug_epochs ({self.optim.no_aug_epochs}) exceeds train.epochs "
                             f"({self.train.epochs}): the no-augmentation tail must fit in the run")
        return self
