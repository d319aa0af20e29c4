"""The teacher a job's config asks for, with the domain teacher built when it is the one in use.

Torch-free at import (the cache job's driver module imports this before it needs torch): the
domain teacher's module is imported when a build or reuse check is due.
"""

from __future__ import annotations

from distillery.platform.config.sections import ConfigError, DataConfig, TeacherConfig
from distillery.platform.io import storage

__all__ = ["resolve_teacher"]


def resolve_teacher(teacher: TeacherConfig, data: DataConfig) -> TeacherConfig:
    """``teacher`` unchanged, unless it uses the domain teacher (``teacher.domain``, no weights file,
    no random weights asked): then a copy whose ``weights`` is the domain teacher's Meta-layout file
    (built under ``<data.root>/teacher/`` on first use) and whose ``model_name`` / ``model_kwargs`` are
    the domain teacher's. The cache fingerprint then carries that file's sha256.

    The domain teacher knows the synthetic dataset's domain: with your own data (``data.synthetic``
    null or another format) it is refused, naming the ways out.
    """
    if not teacher.uses_domain_teacher:
        return teacher
    if data.format != "coco" or data.synthetic is None:
        raise ConfigError(
            "teacher: no weights given, so the embedded default's teacher.domain would train a DINOv3 on "
            "synthetic shapes, which knows nothing of your dataset (data.synthetic is null or data.format is "
            f"{data.format!r}); give teacher.weights=<Meta's DINOv3 .pth or a timm state dict>, or "
            "teacher.allow_random_init=true for a plumbing run")
    if storage.has_protocol(data.root):
        raise ConfigError(f"teacher.domain: the domain teacher is kept beside the synthetic dataset, which must then "
                          f"be a local directory (data.root is {data.root}); give teacher.weights instead")
    # Imported here: it loads torch and timm (see the module docstring).
    from distillery.platform.teacher_pretrain.domain import ensure_domain_teacher

    d = teacher.domain
    built = ensure_domain_teacher(data.root, image_size=teacher.input_size, pool=teacher.pool, seed=d.seed,
                                  images=d.images, steps=d.steps, batch_size=d.batch_size, lr=d.lr,
                                  model_name=d.model_name, model_kwargs=dict(d.model_kwargs))
    return teacher.model_copy(update={"weights": built.weights, "model_name": built.model_name,
                                      "model_kwargs": dict(built.model_kwargs)})
