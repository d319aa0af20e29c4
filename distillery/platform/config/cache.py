"""The feature-cache job's configuration (``jobs/cache_features.py``), and the cache section
family the distillation job shares (:class:`CacheLocation`: where a cache is and how it is laid out).

The embedded default caches the synthetic dataset's train split with the domain teacher (a small
DINOv3 trained on first use on disjoint synthetic images, ``teacher.domain``) at 256 px pooled to
128, fp16, 32 images per shard: the cache ``jobs/distill.py``'s embedded default reads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, model_validator

from distillery.platform.config.sections import (DataConfig, JobConfig, LocalPath, StrictModel, TeacherConfig,
                                                 domain_teacher)

__all__ = ["CacheComputeConfig", "CacheDebugConfig", "CacheFeaturesConfig", "CacheLocation", "CacheSettings",
           "PcaSettings", "ViewRecipe"]


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


class PcaSettings(StrictModel):
    """The compressed storage (``cache.dtype: pca``): each token's projection on the top ``dims``
    principal components of the teacher's channels, quantised per token to ``bits`` bits (one
    float16 scale per token); the basis is fitted by the cache job on the teacher's features of
    the first ``fit_images`` images and kept beside the manifest (``distillery.platform.cache.codec``).
    Per token d * bits / 8 + 2 bytes against fp16's 2 * C: the defaults keep C/4 components at
    8 bits, 0.126x fp16 for ViT-B/16 (C = 768: 192 components; benchmarks/cache_compression.py)."""

    # An integer: that many components; a fraction in (0, 1): that share of the teacher's channels.
    dims: PositiveInt | Annotated[float, Field(gt=0, lt=1)] = 0.25
    bits: Literal[4, 8] = 8
    fit_images: PositiveInt = 64

    def resolved_dims(self, channels: int) -> int:
        if isinstance(self.dims, float):
            return max(1, round(self.dims * channels))
        if self.dims > channels:
            raise ValueError(f"cache.pca.dims={self.dims} is more than the teacher's {channels} channels")
        return self.dims


class CacheLocation(StrictModel):
    """Where a feature cache is and how its shards are laid out."""

    uri: LocalPath = "runs/cache/synthetic-dinov3-domain-256"
    # fp16; int8 (per-token, 0.5x); pca (the `pca` section's codec, at most 0.2x with its defaults).
    dtype: Literal["fp16", "int8", "pca"] = "fp16"
    pca: PcaSettings = Field(default_factory=PcaSettings)
    shard_size: PositiveInt = 32
    # Teacher grids per image: 1 = the plain image only; K > 1 adds K-1 pre-augmented views
    # (K times the storage and teacher passes; see benchmarks/cache_fidelity.py for the trade-off).
    views: PositiveInt = Field(1, le=64)

    def codec_spec(self, channels: int) -> dict[str, Any]:
        """What a cache of this section stores, as the manifest records it (``dtype``, and for
        ``pca`` the codec's settings): a cache read with another is refused, naming the fields."""
        if self.dtype != "pca":
            return {"dtype": self.dtype}
        return {"dtype": "pca", "dims": self.pca.resolved_dims(channels), "bits": self.pca.bits,
                "fit_images": self.pca.fit_images}


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
