"""The typed run description: what a job's driver decided and every training worker needs
(step counts, val split, tracking run, where to resume); each job extends it with its own fields
(its spec's ``run_class``: ``distill/spec.py``, ``moe/spec.py``).

It crosses the process boundary in Ray Train's ``train_loop_config`` as a plain dict, together
with the job's config and the path of its worker-side job: :func:`worker_config` packs them,
:func:`from_worker_config` unpacks them, the only two places that know that dict's layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from distillery.platform.engine.spec import JobSpec

__all__ = ["RunDescription", "from_worker_config", "worker_config"]


@dataclass(kw_only=True)
class RunDescription:
    """What every job's workers need from the driver."""

    steps_per_epoch: int            # optimizer steps per epoch and rank
    val_annotations: str            # the val split as a COCO file (the workers evaluate on it)
    val_images: str
    run_storage: str                # the run's storage (checkpoints are Ray Train's, beside it)
    tracking_uri: str | None = None
    run_id: str | None = None       # the MLflow run rank 0 logs into (None: no tracking)
    resume_checkpoint: str | None = None  # output.resume_from, checked on the driver

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunDescription":
        """Back from :meth:`to_dict` (a job whose fields are not plain JSON overrides it)."""
        return cls(**_fields_of(cls, data))


def _fields_of(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def worker_config(spec: JobSpec, cfg, run: RunDescription) -> dict[str, Any]:
    """Ray Train's ``train_loop_config``: the job (its spec's ``job`` path), its config and its run
    description, as JSON."""
    if not isinstance(run, spec.run_class):
        raise TypeError(f"job {spec.name}: its run description is a {spec.run_class.__name__}, "
                        f"not a {type(run).__name__}")
    return {"job": spec.job, "cfg": cfg.model_dump(mode="json"), "run": run.to_dict()}


def from_worker_config(config: dict[str, Any], spec: JobSpec) -> tuple[Any, RunDescription]:
    """(the job's config, its run description) back from ``train_loop_config``."""
    return spec.config_class.model_validate(config["cfg"]), spec.run_class.from_dict(config["run"])
