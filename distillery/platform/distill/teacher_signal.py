"""The teacher signal of a distillation run, chosen once from ``teacher_mode``.

* ``none``: no teacher; a plain DEIM run (no DSI term);
* ``cached``: the frozen teacher's feature grids, precomputed into the feature cache, rendered
  through each sample's augmentation into the batch (``teacher_grid``, ``teacher_mask``);
* ``online``: the frozen teacher runs on every augmented batch in the worker.

The driver asks it what to prepare (a teacher fingerprint, a cache); the worker asks it for the
batch's teacher inputs. Nothing else compares ``teacher_mode``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from distillery.data.augment import AugmentConfig
from distillery.data.sample import render_features
from distillery.data.views import view_recipe
from distillery.platform.cache.feature_cache import FeatureCache
from distillery.platform.cache.job import build_teacher
from distillery.platform.io import storage

__all__ = ["CachedTeacher", "NoTeacher", "OnlineTeacher", "TeacherSignal", "render_teacher_grid", "teacher_signal"]


class TeacherSignal:
    """No teacher (the base class is the ``none`` signal)."""

    mode: ClassVar[str] = "none"
    needs_teacher: ClassVar[bool] = False   # the driver builds the teacher for its fingerprint and width
    needs_cache: ClassVar[bool] = False     # the driver prepares the train split's feature cache
    previews: ClassVar[bool] = False        # the augmentation preview shows its grids

    def __init__(self, cfg):
        self.cfg = cfg

    def cache_views(self, augment: AugmentConfig) -> int:
        """The cached views per image (1: no views), checked against the cache's manifest."""
        return 1

    def start(self, device: torch.device, teacher_dtype: str | None) -> None:
        """Worker side, once before training."""

    def batch_inputs(self, samples, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's part of a step batch for the augmented ``samples`` / ``images``."""
        return {}


NoTeacher = TeacherSignal


class CachedTeacher(TeacherSignal):
    mode = "cached"
    needs_teacher = needs_cache = previews = True

    def cache_views(self, augment: AugmentConfig) -> int:
        """``cache.views`` against the cache's manifest (and, with views, the augmentation recipe
        the views were drawn with): a mismatch stops the worker before its first step."""
        cache = FeatureCache(storage.join(self.cfg.cache.uri, "train"))
        cache.check_views(self.cfg.cache.views, view_recipe(augment))
        return cache.views

    def batch_inputs(self, samples, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return render_teacher_grid(samples, (images.shape[-2] // 32, images.shape[-1] // 32), images.device)


class OnlineTeacher(TeacherSignal):
    mode = "online"
    needs_teacher = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.teacher: torch.nn.Module | None = None

    def start(self, device: torch.device, teacher_dtype: str | None) -> None:
        self.teacher = build_teacher(self.cfg.teacher.model_dump(), teacher_dtype).to(device)

    def batch_inputs(self, samples, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.teacher.input_size
        teacher_in = images if images.shape[-1] == size else F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return {"teacher_grid": self.teacher(teacher_in)}


_SIGNALS: dict[str, type[TeacherSignal]] = {c.mode: c for c in (NoTeacher, CachedTeacher, OnlineTeacher)}


def teacher_signal(cfg) -> TeacherSignal:
    """The teacher signal of a distillation config (``cfg.teacher_mode``)."""
    return _SIGNALS[cfg.teacher_mode](cfg)


def render_teacher_grid(samples, f5_hw: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """The cached teacher grids of augmented ``samples``, rendered onto the student's F5 grid."""
    grids, masks = zip(*(render_features(s, f5_hw) for s in samples))
    return {"teacher_grid": torch.stack(grids).to(device), "teacher_mask": torch.stack(masks).to(device)}
