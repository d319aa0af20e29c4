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

from distillery.platform.config.promote import PromoteConfig  # noqa: E402
from distillery.platform.config.sections import ConfigError, load_config  # noqa: E402
from distillery.platform.tracking.promote import describe_registry, run_promote  # noqa: E402
from distillery.platform.tracking.registry import RegistryError  # noqa: E402


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
        if args.show:
            print(describe_registry(cfg))
            return {}
        out = run_promote(cfg, run_id=args.run_id, sweep=args.sweep, roll_back=args.rollback)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")
    except (RegistryError, ConnectionError) as exc:
        parser.exit(1, f"error: {exc}\n")
    print(out["reason"])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
