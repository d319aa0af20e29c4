"""Teacher pretraining: the domain teacher the embedded defaults distil from (built on first use,
kept beside the synthetic dataset; :mod:`.domain`), how a job's teacher config resolves to it
(:mod:`.resolve`), its probe (:mod:`.probe`) and ``jobs/pretrain_teacher.py`` (:mod:`.domain_job`);
and the ``teacher_pretrain`` job on the training engine (``jobs/pretrain_teacher.py --engine``: a
DINOv3 teacher trained on a dataset's boxes): :mod:`.spec`, :mod:`.config`, :mod:`.driver`,
:mod:`.job` (the workers), :mod:`.patch_data`.

The names of :mod:`.domain` are loaded on first access: the cache job's driver imports
:mod:`.resolve` through this package and must not load torch at import.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DOMAIN_MODEL_KWARGS", "DOMAIN_MODEL_NAME", "DomainTeacher", "ensure_domain_teacher", "synthetic_pool"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("distillery.platform.teacher_pretrain.domain"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
