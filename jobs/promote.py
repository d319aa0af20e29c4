"""Register a trained model in the MLflow model registry and promote it by alias.

    python jobs/promote.py --run-id <mlflow run id>        # a distillation / MoE run's model
    python jobs/promote.py --sweep <parent run id>         # the best trial of a sweep
    python jobs/promote.py --rollback                      # champion back to the previous version
    python jobs/promote.py --show                          # versions, tags and aliases

Options as dotted overrides: registry.model_name=rtdetrv4-s registry.margin=0.005
tracking.tracking_uri=http://mlflow:5000. The new version gets alias `challenger`; it becomes
`champion` only if its best val AP beats the champion's by the margin (or there is none).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from mlflow.tracking import MlflowClient  # noqa: E402
from pydantic import Field  # noqa: E402

from distillery.platform.config.sections import ConfigError, StrictModel, absolute_uri, load_config  # noqa: E402
from distillery.platform.tracking.registry import RegistryError, describe, promote_run, rollback  # noqa: E402
from distillery.platform.tracking.runs import resolve_tracking_uri  # noqa: E402


class RegistrySettings(StrictModel):
    model_name: str = "rtdetrv4-s"
    metric: str = "AP"
    margin: float = Field(0.0, ge=0)


class TrackingSettings(StrictModel):
    tracking_uri: str | None = None  # config > MLFLOW_TRACKING_URI > sqlite under local_dir
    local_dir: str = "runs"


class PromoteConfig(StrictModel):
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)


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


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--run-id", help="MLflow run whose model to register")
    action.add_argument("--sweep", metavar="PARENT_RUN_ID", help="register the best trial of this sweep")
    action.add_argument("--rollback", action="store_true", help="move champion back to the previous version")
    action.add_argument("--show", action="store_true", help="print versions and aliases")
    parser.add_argument("--config", default=None, help="YAML with registry:/tracking: sections")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PromoteConfig, args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    try:  # (relative to DISTILLERY_HOME when set, as in every job)
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, absolute_uri(cfg.tracking.local_dir))
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    name = cfg.registry.model_name
    try:
        if args.rollback:
            out = rollback(uri, name)
        elif args.show:
            print(describe(uri, name))
            return {}
        else:
            run_id = args.run_id or best_trial_run(uri, args.sweep)
            extra = {"sweep_parent_run_id": args.sweep} if args.sweep else {}
            out = promote_run(uri, name, run_id, metric=cfg.registry.metric, margin=cfg.registry.margin,
                              extra_tags=extra).as_dict()
    except (RegistryError, ConnectionError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(out["reason"])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
