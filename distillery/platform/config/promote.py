"""The configuration of ``jobs/promote.py``: which registered model, the metric and margin that
decide a promotion, and the tracking store."""

from __future__ import annotations

from pydantic import Field

from distillery.platform.config.sections import StrictModel

__all__ = ["PromoteConfig", "PromoteTrackingSettings", "RegistrySettings"]


class RegistrySettings(StrictModel):
    model_name: str = "rtdetrv4-s"
    metric: str = "AP"
    margin: float = Field(0.0, ge=0)


class PromoteTrackingSettings(StrictModel):
    tracking_uri: str | None = None  # config > MLFLOW_TRACKING_URI > sqlite under local_dir
    local_dir: str = "runs"


class PromoteConfig(StrictModel):
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    tracking: PromoteTrackingSettings = Field(default_factory=PromoteTrackingSettings)
