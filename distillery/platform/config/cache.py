"""The feature-cache job's configuration (``jobs/cache_features.py``), and the cache section
family the distillation job shares (:class:`CacheLocation`: where a cache is and how it is laid out).

The embedded default caches the synthetic dataset's train split with the domain teacher (a small
DINOv3 trained on first use on disjoint synthetic images, ``teacher.domain``) at 256 px pooled to
128, fp16, 32 images per shard: the cache ``jobs/distill.py``'s embedded default reads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from distillery.platform.config.sections import (DataConfig, JobConfig, LocalPath, StrictModel, TeacherConfig,
                                                 domain_teacher)

__all__ = ["CacheComputeConfig", "CacheDebugConfig", "CacheFeaturesConfig", "CacheLocation", "CacheSettings",
           "ViewRecipe"]


class ViewRecipe(StrictModel):
    """The per-image strong ops a cached view draws (the reference recipe's defaults; the
    distillation job's ``augment`` section must agree with what the cache recorded)."""

    photometric_prob: float = Field(0.5, ge=0, le=1)
    zoom_out_ratio: tuple[float, float] = (1.0, 4.0)
    iou_crop_prob: float = Field(0.8, ge=0, le=1)
    flip_prob: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ratio_range(self) -> "ViewRecipe":
        lo, hi = self.zoom_out_ratio
        if not 1.0 <= lo <= hi:
            raise ValueError(f"view_recipe.zoom_out_ratio must satisfy 1 <= min <= max, got {self.zoom_out_ratio}")
        return self


class CacheLocation(StrictModel):
    """Where a feature cache is and how its shards are laid out."""

    uri: LocalPath = "runs/cache/synthetic-dinov3-domain-256"
    dtype: Literal["fp16", "int8"] = "fp16"
    shard_size: PositiveInt = 32
    # Teacher grids per image: 1 = the plain image only; K > 1 adds K-1 pre-augmented views
    # (K times the storage and teacher passes; see benchmarks/cache_fidelity.py for the trade-off).
    views: PositiveInt = Field(1, le=64)


class CacheSettings(CacheLocation):
    """The cache job's cache section: the location plus which splits, and how views are drawn."""

    splits: list[Literal["train", "val"]] = Field(default_factory=lambda: ["train"], min_length=1)
    view_seed: int = 0
    view_recipe: ViewRecipe = Field(default_factory=ViewRecipe)


class CacheComputeConfig(StrictModel):
    actors: PositiveInt = 1
    batch_size: PositiveInt = 16
    gpus_per_actor: float | Literal["auto"] = "auto"
    cpus_per_actor: float = Field(1.0, gt=0)
    decode_cpus: float = Field(1.0, gt=0)


class CacheDebugConfig(StrictModel):
    # Fault injection for tests: write only this many of the missing shards, then fail (as a job
    # killed halfway would: some shards on storage, no manifest).
    stop_after_shards: PositiveInt | None = None


class CacheFeaturesConfig(JobConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=lambda: domain_teacher(input_size=256))
    cache: CacheSettings = Field(default_factory=CacheSettings)
    compute: CacheComputeConfig = Field(default_factory=CacheComputeConfig)
    debug: CacheDebugConfig = Field(default_factory=CacheDebugConfig)
