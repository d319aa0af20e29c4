"""What ``jobs/promote.py`` does: register a run's model (or a sweep's best trial's) and promote
it by alias, roll the champion back, or describe the registered versions."""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient

from distillery.platform.config.promote import PromoteConfig
from distillery.platform.config.sections import absolute_uri
from distillery.platform.tracking.registry import RegistryError, describe, promote_run, rollback
from distillery.platform.tracking.runs import resolve_tracking_uri

__all__ = ["best_trial_run", "describe_registry", "run_promote", "tracking_uri_of"]


def best_trial_run(tracking_uri: str, parent_run_id: str) -> str:
    """The MLflow run of a sweep's best trial (recorded on the parent run when the sweep ended)."""
    try:
        parent = MlflowClient(tracking_uri).get_run(parent_run_id)
    except Exception as exc:  # MlflowException: unknown run
        raise RegistryError(f"sweep parent run {parent_run_id!r} not found: {exc}") from None
    best = parent.data.tags.get("distillery.best_run_id")
    if not best:
        raise RegistryError(f"run {parent_run_id} has no distillery.best_run_id tag: not a finished sweep")
    return best


def run_promote(cfg: PromoteConfig, *, run_id: str | None = None, sweep: str | None = None,
                roll_back: bool = False) -> dict[str, Any]:
    """Promote ``run_id``'s model (or sweep ``sweep``'s best trial's), or with ``roll_back`` move
    the champion back to the previous version; return the outcome (its ``reason`` says why).
    Raises ``ConfigError`` for a bad tracking URI, ``RegistryError`` / ``ConnectionError`` for
    what the registry refuses."""
    uri = tracking_uri_of(cfg)
    name = cfg.registry.model_name
    if roll_back:
        return rollback(uri, name)
    run_id = run_id or best_trial_run(uri, sweep)
    extra = {"sweep_parent_run_id": sweep} if sweep else {}
    return promote_run(uri, name, run_id, metric=cfg.registry.metric, margin=cfg.registry.margin,
                       extra_tags=extra).as_dict()


def describe_registry(cfg: PromoteConfig) -> str:
    """The registered model's versions, tags and aliases."""
    return describe(tracking_uri_of(cfg), cfg.registry.model_name)


def tracking_uri_of(cfg: PromoteConfig) -> str:
    """The tracking store (relative to DISTILLERY_HOME when set, as in every job)."""
    return resolve_tracking_uri(cfg.tracking.tracking_uri, absolute_uri(cfg.tracking.local_dir))
