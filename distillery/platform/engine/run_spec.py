"""The typed run description: what a job's driver decided and every training worker needs
(classes, step counts, val split, tracking run, where to resume), one dataclass per job kind.

It crosses the process boundary in Ray Train's ``train_loop_config`` as a plain dict, together
with the job's config: :func:`worker_config` packs both, :func:`from_worker_config` unpacks them,
the only two places that know that dict's layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["DistillRun", "GamSettings", "MoETuneRun", "RunDescription", "from_worker_config", "worker_config"]


@dataclass(kw_only=True)
class RunDescription:
    """What every job's workers need from the driver."""

    kind: ClassVar[str] = ""
    steps_per_epoch: int            # optimizer steps per epoch and rank
    val_annotations: str            # the val split as a COCO file (the workers evaluate on it)
    val_images: str
    run_storage: str                # the run's storage (checkpoints are Ray Train's, beside it)
    tracking_uri: str | None = None
    run_id: str | None = None       # the MLflow run rank 0 logs into (None: no tracking)
    resume_checkpoint: str | None = None  # output.resume_from, checked on the driver

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass
class GamSettings:
    """GAM's settings after the per-size defaults are applied (``distill.driver.resolve_gam``)."""

    lambda0: float
    rho: float
    delta: float
    default_weight: float
    stop_epoch: int | None
    rule: str
    enabled: bool


@dataclass(kw_only=True)
class DistillRun(RunDescription):
    kind: ClassVar[str] = "distill"
    num_classes: int
    categories: dict[str, list]     # {"category_ids": [...], "names": [...]}
    gam: GamSettings
    teacher_dim: int | None = None  # the teacher's embedding width (None: no teacher)
    teacher_dtype: str | None = None
    cache_meta: dict[str, Any] | None = None  # the train cache's FeatureCache.ingest_meta() (cached teacher)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillRun":
        return cls(**{**_fields_of(cls, data), "gam": GamSettings(**data["gam"])})


@dataclass(kw_only=True)
class MoETuneRun(RunDescription):
    kind: ClassVar[str] = "moe_tune"
    phrases: list[str]
    text_embeddings: list[list[float]]   # (P, dim) phrase embeddings, computed on the driver
    category_ids: list[int]
    build_options: dict[str, Any]
    parameter_counts: dict[str, Any]
    moe_meta: dict[str, Any] | None = None  # the MoE decomposition (None: dense fine-tuning)
    base_uri: str | None = None             # the staged dense base (None: the workers train it)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoETuneRun":
        return cls(**_fields_of(cls, data))


def _fields_of(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


_KINDS = {c.kind: c for c in (DistillRun, MoETuneRun)}


def worker_config(cfg, run: RunDescription) -> dict[str, Any]:
    """Ray Train's ``train_loop_config``: the job's config and its run description, as JSON."""
    return {"cfg": cfg.model_dump(mode="json"), "run": run.to_dict()}


def from_worker_config(config: dict[str, Any], config_class) -> tuple[Any, RunDescription]:
    """(the job's config, its run description) back from ``train_loop_config``."""
    run = config["run"]
    return config_class.model_validate(config["cfg"]), _KINDS[run["kind"]].from_dict(run)
