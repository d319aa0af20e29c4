"""The distillation job's spec: its kind (spelled here alone), its run description, its checkpoint
record, and where its worker-side job and its driver live. (The file its run storage adds,
``distillery_model.json``, is what ``predict --model <run dir>`` reads: ``serving.predict.MODEL_JSON``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distillery.platform.config.distill import DistillConfig
from distillery.platform.engine.checkpoints import CheckpointRecord
from distillery.platform.engine.run_spec import RunDescription
from distillery.platform.engine.spec import JobSpec

__all__ = ["SPEC", "DistillRecord", "DistillRun", "GamSettings"]


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
    num_classes: int
    categories: dict[str, list]     # {"category_ids": [...], "names": [...]}
    gam: GamSettings
    teacher_dim: int | None = None  # the teacher's embedding width (None: no teacher)
    teacher_dtype: str | None = None
    cache_meta: dict[str, Any] | None = None  # the train cache's FeatureCache.ingest_meta() (cached teacher)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillRun":
        return super().from_dict({**data, "gam": GamSettings(**data["gam"])})


@dataclass
class DistillRecord(CheckpointRecord):
    gam_history: list[dict[str, Any]] = field(default_factory=list)


SPEC = JobSpec(name="distill", config_class=DistillConfig, run_class=DistillRun, record_class=DistillRecord,
               job="distillery.platform.distill.job:DistillJob",
               driver="distillery.platform.distill.driver:DistillDriver",
               description="distil a frozen VFM into an RT-DETRv4 / DEIMv2 student (DSI + GAM)")
