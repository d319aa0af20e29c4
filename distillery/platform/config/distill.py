"""The distillation job's configuration (``jobs/distill.py``).

Defaults are the *embedded default*: the synthetic dataset, a small RT-DETRv4 student (the same
classes as the paper sizes with smaller numbers) at 256 px, trained with DSI + GAM from a cached
DINOv3 teacher on 2 Ray Train workers on CPU for 12 epochs (about 5 minutes on 2 cores, plus the
domain teacher's one-off build; the schedule is the reference's, compressed: strong augmentation in epochs 3-8, Mosaic and
Mixup in 3-5, no augmentation in the last three). The teacher is the domain teacher
(``teacher.domain``: a 6-block, 192-wide DINOv3 trained on first use on synthetic images disjoint
from the student's; :mod:`distillery.platform.teacher_pretrain`) unless ``teacher.weights`` names a
file. The paper recipes live in ``configs/``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from distillery.platform.config.augment import AugmentSettings
from distillery.platform.config.cache import CacheLocation
from distillery.platform.config.sections import (AdamWSettings, DataConfig, DebugSettings, DeepSpeedSettings,
                                                 JobConfig, RunOutputSettings, StrictModel, TeacherConfig,
                                                 TrackingSettings, TrainSettings, domain_teacher)
from distillery.platform.io.weights_source import check_weights_source
from distillery.students.criterion import DEFAULT_LOSS_WEIGHTS, criterion_options
from distillery.students.optim import param_group_rules
from distillery.students.deimv2 import DEIMV2_SPECS, DISTILLED_VIT, TIMM_DINOV3_VITS
from distillery.students.families import student_names

__all__ = ["DistillConfig", "known_student_names"]


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
    """Every name ``build_student`` accepts: every registered family's sizes (``students.families``)."""
    return student_names()


class StudentSettings(StrictModel):
    name: str = "rtdetrv4_tiny"
    input_size: int = Field(256, ge=64, multiple_of=32)
    # Keyword overrides passed to build_student (e.g. num_queries, num_decoder_layers).
    overrides: dict[str, Any] = Field(default_factory=dict)
    peft: PeftSettings = Field(default_factory=PeftSettings)
    # Whole-model weights loaded after the build (build_student(weights=...)): an official
    # RT-DETRv4 / DEIMv2 release .pth, a Distillery checkpoint, export or run directory (its best
    # checkpoint), a state dict or .safetensors; a local path, hf-hub:<repo>, https:// URL or
    # models:/<name>@<alias> (resolved on the driver: distill.driver.resolve_student_weights).
    weights: str | None = None
    # Checkpoint trained on other classes: "coco" keeps the class rows of the dataset categories
    # named like COCO's; {category name: checkpoint class index} keeps those; None re-initialises.
    class_map: Literal["coco"] | dict[str, int] | None = None
    # HGNetv2 ImageNet weights (timm layout or the official stage-1 .pth; path, hf-hub:, https://).
    backbone_weights: str | None = None

    @model_validator(mode="after")
    def _weights_reachable(self) -> "StudentSettings":
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
            return self
        spec = DEIMV2_SPECS.get(self.name)
        backbone = self.overrides.get("backbone", spec.backbone if spec is not None else None)
        if backbone != DISTILLED_VIT and backbone not in TIMM_DINOV3_VITS:
            raise ValueError(f"student.peft.method={self.peft.method} needs a ViT backbone (deimv2_s/m/l/x/tiny); "
                             f"{self.name} has {backbone or 'an HGNetv2 CNN'}")
        return self


class CacheRef(CacheLocation):
    """The cache training reads. With ``views`` K > 1 a strong epoch replays one of each image's
    K-1 pre-augmented views; K must equal the cache manifest's (checked before the first step),
    and the views' recipe must match the ``augment`` section."""

    # Build the cache (train split) before training when it is absent.
    build_if_missing: bool = True


class GAMSettings(StrictModel):
    """Gradient-guided Adaptive Modulation; None fields take the per-size official defaults.

    ``enabled: false`` trains with a fixed DSI weight: ``lambda0`` for the whole run (no band, no
    ``stop_epoch`` reset), the "DSI, fixed lambda" setting. A weight of 0 with a teacher logs
    ``loss_dsi`` without training on it; the driver warns when a run is set up that way."""

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


class CriterionSettings(StrictModel):
    """Overrides of the student size's official criterion (``distillery.students.criterion_options``:
    losses, union set, matcher change per size); an unset field keeps the size's official value."""

    weight_dict: dict[str, float] | None = None  # partial: e.g. {loss_bbox: 5.0}
    local_losses: bool | None = None  # FGL + DDF
    use_union_set: bool | None = None
    mal_gamma: float | None = Field(None, gt=0)
    cost_class: float | None = Field(None, ge=0)
    cost_bbox: float | None = Field(None, ge=0)
    cost_giou: float | None = Field(None, ge=0)
    # DEIMv2's matcher change: off (False), or at this epoch with this IoU exponent.
    change_matcher: bool | None = None
    matcher_change_epoch: int | None = Field(None, ge=0)
    iou_order_alpha: float | None = Field(None, gt=0)

    @field_validator("weight_dict")
    @classmethod
    def _known_losses(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        unknown = sorted(set(weights or {}) - set(DEFAULT_LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown loss weight(s) {unknown}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
        return weights

    @model_validator(mode="after")
    def _change_is_on_or_off(self) -> "CriterionSettings":
        if self.change_matcher is False and self.matcher_change_epoch is not None:
            raise ValueError("criterion.change_matcher is false but criterion.matcher_change_epoch is set; keep one")
        return self

    def overrides(self, official: dict[str, Any]) -> dict[str, Any]:
        """``official`` (the size's ``criterion_options``) with the fields set here applied."""
        out = dict(official)
        out.update(self.model_dump(exclude_none=True, exclude={"change_matcher"}))
        if self.change_matcher is False:
            out.pop("matcher_change_epoch", None)
        elif self.change_matcher and out.get("matcher_change_epoch") is None:
            raise ValueError("criterion.change_matcher is true but neither the recipe nor the student's official "
                             "settings give criterion.matcher_change_epoch")
        return out


class DistillOptimSettings(AdamWSettings):
    """AdamW plus the distillation schedule (flat epochs, the no-augmentation tail) and the EMA."""

    flat_epochs: int = Field(7, ge=0)
    no_aug_epochs: int = Field(3, ge=0)
    ema_decay: float = Field(0.999, gt=0, lt=1)
    ema_warmups: int = Field(50, ge=0)
    # Parameter groups (students/optim.py): None -> the student size's official rules.
    norm_rule: Literal["all", "head", "split"] | None = None
    decay_biases: bool | None = None

    def param_group_rules(self, student_name: str) -> dict[str, Any]:
        """``build_optimizer``'s ``norm_rule`` / ``decay_biases``: the size's official ones
        (``param_group_rules``), the fields set here on top."""
        rules = param_group_rules(student_name)
        rules.update({k: v for k, v in (("norm_rule", self.norm_rule), ("decay_biases", self.decay_biases))
                      if v is not None})
        return rules


class DistillTrackingSettings(TrackingSettings):
    """MLflow, plus what a distillation run logs besides its metrics."""

    log_model: bool = True
    system_metrics: bool = True
    num_val_images: int = Field(4, ge=0)
    # At the start of a run: this many augmented training samples with their boxes beside a PCA
    # colouring of their teacher grids (plots/augment_preview.png; 0 = off).
    augment_preview: int = Field(4, ge=0, le=16)


class DistillDebugSettings(DebugSettings):
    # Shorter epochs (tests).
    max_steps_per_epoch: PositiveInt | None = None


class DistillConfig(JobConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=lambda: domain_teacher(input_size=256))
    teacher_mode: Literal["cached", "online", "none"] = "cached"
    cache: CacheRef = Field(default_factory=lambda: CacheRef(uri="runs/cache/synthetic-dinov3-domain-256"))
    student: StudentSettings = Field(default_factory=StudentSettings)
    gam: GAMSettings = Field(default_factory=GAMSettings)
    optim: DistillOptimSettings = Field(default_factory=DistillOptimSettings)
    criterion: CriterionSettings = Field(default_factory=CriterionSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tracking: DistillTrackingSettings = Field(default_factory=DistillTrackingSettings)
    output: RunOutputSettings = Field(default_factory=RunOutputSettings)
    debug: DistillDebugSettings = Field(default_factory=DistillDebugSettings)

    @model_validator(mode="after")
    def _teacher_sees_student_input(self) -> "DistillConfig":
        if self.teacher_mode != "none" and self.teacher.input_size != self.student.input_size:
            raise ValueError(
                f"teacher.input_size ({self.teacher.input_size}) must equal student.input_size "
                f"({self.student.input_size}): the teacher sees the student's input image")
        return self

    def criterion_options(self) -> dict[str, Any]:
        """The ``build_criterion`` options of this run: the student size's official ones, this
        config's ``criterion`` section on top."""
        return self.criterion.overrides(criterion_options(self.student.name))

    @model_validator(mode="after")
    def _criterion_resolves(self) -> "DistillConfig":
        self.criterion_options()  # e.g. change_matcher: true with no change epoch anywhere
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> "DistillConfig":
        if self.optim.no_aug_epochs > self.train.epochs:
            raise ValueError(f"optim.no_aug_epochs ({self.optim.no_aug_epochs}) exceeds train.epochs "
                             f"({self.train.epochs}): the no-augmentation tail must fit in the run")
        return self
