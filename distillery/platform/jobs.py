"""Every training job of the platform, registered here: one line per job package (the module that
builds its :class:`~distillery.platform.engine.spec.JobSpec` as ``SPEC``).

A sweep's ``trial.job`` and anything else that picks a job by its kind looks it up here; the
engine itself never does (a worker gets its job's path from the driver).
"""

from __future__ import annotations

import importlib
from functools import cache

from distillery.platform.engine.spec import JobSpec

__all__ = ["JOB_SPEC_MODULES", "job_names", "job_spec", "job_specs"]

JOB_SPEC_MODULES = (
    "distillery.platform.distill.spec",
    "distillery.platform.moe.spec",
    "distillery.platform.teacher_pretrain.spec",
)


@cache
def job_specs() -> dict[str, JobSpec]:
    """Every registered job's spec, by kind (loaded on first use: the spec modules import torch)."""
    specs: dict[str, JobSpec] = {}
    for module in JOB_SPEC_MODULES:
        spec = importlib.import_module(module).SPEC
        if spec.name in specs:
            raise RuntimeError(f"job kind {spec.name!r} is registered twice ({module})")
        specs[spec.name] = spec
    return specs


def job_names() -> list[str]:
    return list(job_specs())


def job_spec(name: str) -> JobSpec:
    """The spec of the job ``name``; a ValueError naming the known ones otherwise."""
    specs = job_specs()
    if name not in specs:
        raise ValueError(f"unknown job {name!r} (known: {', '.join(specs)})")
    return specs[name]
