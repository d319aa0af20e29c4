"""Model registry: register a run's model, tag its lineage, promote by alias, roll back.

Aliases carry the deployment state: ``challenger`` is the newest registered candidate and
``champion`` the one serving (``models:/<name>@champion``). A candidate becomes champion only if
its validation metric beats the champion's by ``margin`` (or there is no champion); every
decision is written on the version as a tag, with its reason. Alias moves are all-or-nothing:
if any step fails, aliases already moved in this call are put back.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from distillery.platform.tracking.runs import tracking_reachable, tracking_uri_scope

__all__ = ["PromotionResult", "RegistryError", "load_champion", "promote_run", "rollback"]

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
# Run tags copied onto the registered version as its lineage.
LINEAGE_TAGS = {
    "distillery.sweep_id": "sweep_id",
    "distillery.teacher_fingerprint": "teacher_fingerprint",
    "distillery.cache_manifest_sha256": "cache_manifest_sha256",
    "distillery.dataset_sha256": "dataset_sha256",
    "distillery.git_commit": "git_commit",
    "distillery.config_hash": "config_hash",
}


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (names the model, version, alias or run)."""


@dataclass
class PromotionResult:
    model_name: str
    version: str
    run_id: str
    metric: str
    value: float
    champion_before: str | None
    champion_value: float | None
    promoted: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _client(tracking_uri: str):
    tracking_reachable(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(f"run {run_id!r} not found on the tracking server: {exc.message}") from None


def _version_by_alias(client, name: str, alias: str):
    """The version behind ``name@alias``, or None if the alias is not set."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _require_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} does not exist") from None


def _metric_of_version(version, metric: str) -> float:
    raw = (version.tags or {}).get(f"val_{metric}")
    try:
        return float(raw)
    except (TypeError, ValueError):
        return -math.inf


def promote_run(tracking_uri: str, model_name: str, run_id: str, *, metric: str = "AP", margin: float = 0.0,
                extra_tags: dict[str, str] | None = None) -> PromotionResult:
    """Register ``run_id``'s model as a new version of ``model_name``, alias it ``challenger``, and
    make it ``champion`` if its best val ``metric`` beats the champion's by ``margin``."""
    client = _client(tracking_uri)
    run = _get_run(client, run_id)
    model_uri = run.data.tags.get("distillery.model_uri")
    if not model_uri:
        raise RegistryError(f"run {run_id} has no logged model (no distillery.model_uri tag: was it trained "
                            "with tracking.log_model=false, or did it not finish?)")
    value = run.data.metrics.get(f"best/{metric}")
    if value is None or not math.isfinite(value):
        raise RegistryError(f"run {run_id} has no finite best/{metric} metric to judge it by")

    with tracking_uri_scope(tracking_uri):
        version = mlflow.register_model(model_uri, model_name, await_registration_for=60,
                                        tags={"run_id": run_id, f"val_{metric}": repr(float(value))})
    v = str(version.version)
    lineage = {short: run.data.tags[tag] for tag, short in LINEAGE_TAGS.items() if tag in run.data.tags}
    lineage.update(extra_tags or {})
    for key, val in lineage.items():
        client.set_model_version_tag(model_name, v, key, str(val))

    champion = _version_by_alias(client, model_name, CHAMPION)
    champ_value = _metric_of_version(champion, metric) if champion else None
    if champion is None:
        promoted, reason = True, f"no champion yet: version {v} ({metric} {value:.4f}) becomes champion"
    elif value > champ_value + margin:
        promoted, reason = True, (f"{metric} {value:.4f} beats champion v{champion.version} ({champ_value:.4f}) "
                                  f"by more than the margin {margin}")
    else:
        promoted, reason = False, (f"{metric} {value:.4f} does not beat champion v{champion.version} "
                                   f"({champ_value:.4f}) by the margin {margin}: champion unchanged")
    moves = {CHALLENGER: v}
    if promoted:
        moves[CHAMPION] = v
    _move_aliases(client, model_name, moves)
    client.set_model_version_tag(model_name, v, "promotion_decision", reason)
    client.set_model_version_tag(model_name, v, "promotion_time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if promoted and champion is not None:
        client.set_model_version_tag(model_name, v, "previous_champion", str(champion.version))
    log.info("registry %s v%s: %s", model_name, v, reason)
    return PromotionResult(model_name, v, run_id, metric, float(value), str(champion.version) if champion else None,
                           champ_value, promoted, reason)


def _move_aliases(client, name: str, moves: dict[str, str]) -> None:
    """Point each alias at its version; on any failure put back the ones already moved."""
    before = {alias: _version_by_alias(client, name, alias) for alias in moves}
    done: list[str] = []
    try:
        for alias, version in moves.items():
            client.set_registered_model_alias(name, alias, version)
            done.append(alias)
    except Exception as exc:
        for alias in done:
            old = before[alias]
            if old is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, old.version)
        raise RegistryError(f"moving aliases {moves} of {name!r} failed ({exc}); aliases restored") from exc


def rollback(tracking_uri: str, model_name: str) -> dict[str, Any]:
    """Point ``champion`` back at the version it replaced (recorded when it was promoted)."""
    client = _client(tracking_uri)
    _require_model(client, model_name)
    champion = _version_by_alias(client, model_name, CHAMPION)
    if champion is None:
        raise RegistryError(f"registered model {model_name!r} has no {CHAMPION!r} alias to roll back")
    previous = (champion.tags or {}).get("previous_champion")
    if not previous:
        raise RegistryError(f"{model_name}@{CHAMPION} is version {champion.version}, the first champion: "
                            "there is no previous version to roll back to")
    _move_aliases(client, model_name, {CHAMPION: previous})
    reason = f"rolled back from v{champion.version} to v{previous}"
    client.set_model_version_tag(model_name, champion.version, "rolled_back",
                                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    client.set_model_version_tag(model_name, previous, "promotion_decision", reason)
    log.info("registry %s: %s", model_name, reason)
    return {"model_name": model_name, "champion": previous, "from_version": str(champion.version), "reason": reason}


def load_champion(tracking_uri: str, model_name: str, alias: str = CHAMPION):
    """``models:/<name>@<alias>`` as a pyfunc predictor (image array in; boxes, scores, labels out)."""
    client = _client(tracking_uri)
    _require_model(client, model_name)
    if _version_by_alias(client, model_name, alias) is None:
        raise RegistryError(f"registered model {model_name!r} has no alias {alias!r}")
    with tracking_uri_scope(tracking_uri):
        return mlflow.pyfunc.load_model(f"models:/{model_name}@{alias}")


def describe(tracking_uri: str, model_name: str) -> str:
    """The model's versions, their metric and aliases, as JSON (for the CLI)."""
    client = _client(tracking_uri)
    _require_model(client, model_name)
    model = client.get_registered_model(model_name)
    versions = client.search_model_versions(f"name = '{model_name}'")
    return json.dumps({"aliases": dict(model.aliases or {}),
                       "versions": {v.version: {k: t for k, t in (v.tags or {}).items()} for v in versions}},
                      indent=1, default=str)
