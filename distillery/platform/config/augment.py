"""The augmentation section, and its one translation into the runtime recipe
(:class:`distillery.data.augment.AugmentConfig`) that every job, the cache job's views and the
benchmarks use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from distillery.platform.config.cache import ViewRecipe
from distillery.platform.config.sections import StrictModel

if TYPE_CHECKING:
    from distillery.data.augment import AugmentConfig

__all__ = ["AugmentSettings", "NEVER", "runtime_augment_config"]

# An epoch no run reaches: a window starting there is never open.
NEVER = 10 ** 9


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
    multiscale_repeat: int = Field(3, ge=1)  # times the base size is in the size list (official base_size_repeat)
    # DEIMv2's Copy-Blend (objects of other batch images blended in; 0 = off, as RT-DETRv4 trains).
    copyblend_prob: float = Field(0.0, ge=0, le=1)
    copyblend_epochs: tuple[int, int] = (3, 9)

    @classmethod
    def flips_only(cls, flip_prob: float) -> "AugmentSettings":
        """Fine-tuning's augmentation: horizontal flips and the resize; no strong ops, Mixup or
        multi-scale."""
        return cls(policy_epochs=(NEVER, NEVER, NEVER), mixup_epochs=(NEVER, NEVER), multiscale=False,
                   flip_prob=flip_prob)

    def view_recipe(self) -> ViewRecipe:
        """The cache-side view recipe these settings imply (the per-image strong ops' probabilities)."""
        return ViewRecipe(photometric_prob=self.photometric_prob, iou_crop_prob=self.iou_crop_prob,
                          flip_prob=self.flip_prob)


def runtime_augment_config(section: AugmentSettings | ViewRecipe, size: int) -> "AugmentConfig":
    """The runtime recipe of an augmentation section at input ``size``: fields map by name
    (AugmentConfig's defaults fill the rest); ``multiscale: false`` is a stop epoch of 0."""
    # Imported here: the cache job's decode tasks import this module (through the cache job) and
    # must not load torch, which distillery.data.augment imports.
    from distillery.data.augment import AugmentConfig

    fields = section.model_dump()
    if not fields.pop("multiscale", True):
        fields["multiscale_stop_epoch"] = 0
    return AugmentConfig(size=size, **fields)
