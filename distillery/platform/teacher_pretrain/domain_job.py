"""``jobs/pretrain_teacher.py``: build (or reuse) the domain teacher, then probe it.

Single process: the training is a few CPU minutes of plain PyTorch, and the distillation and cache
jobs call the same :func:`~distillery.platform.teacher_pretrain.domain.ensure_domain_teacher` on
first use, so this job is only needed to build the teacher ahead of them or to measure it.
"""

from __future__ import annotations

import logging
from typing import Any

from distillery.platform.config.sections import with_absolute_paths
from distillery.platform.config.teacher_pretrain import PretrainTeacherConfig
from distillery.platform.teacher_pretrain.domain import ensure_domain_teacher
from distillery.platform.teacher_pretrain.probe import probe_domain_teacher

__all__ = ["run_pretrain_teacher"]

log = logging.getLogger(__name__)


def run_pretrain_teacher(cfg: PretrainTeacherConfig) -> dict[str, Any]:
    """The teacher's file and settings, whether it was built now, and the probe's figures."""
    cfg = with_absolute_paths(cfg)
    d = cfg.domain
    teacher = ensure_domain_teacher(cfg.data_root, image_size=cfg.input_size, pool=cfg.pool, seed=d.seed,
                                    images=d.images, steps=d.steps, batch_size=d.batch_size, lr=d.lr,
                                    model_name=d.model_name, model_kwargs=dict(d.model_kwargs))
    summary: dict[str, Any] = {"weights": teacher.weights, "built": teacher.built, "seconds": teacher.seconds,
                               "teacher_kwargs": teacher.teacher_kwargs(), "settings": teacher.settings}
    if cfg.probe.enabled:
        p = cfg.probe
        summary["probe"] = probe_domain_teacher(teacher, seed=p.seed, train_images=p.train_images,
                                                test_images=p.test_images, steps=p.steps)
    return summary
