"""Ray Tune sweep of the distillation (or MoE-tuning) job, one MLflow child run per trial.

    python jobs/sweep.py [--config configs/X.yaml] [dotted.key=value ...]
    python jobs/sweep.py --resume runs/sweeps/<name>          # continue an interrupted sweep
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep_gam.yaml

With no --config it runs the embedded default: `gam: auto` (a calibration run measures the
AIFI gradient share, then rho and delta are sampled around it) on the embedded distillation
default shortened to 4 epochs, 4 trials with ASHA, MLflow in a sqlite file under runs/.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from distillery.platform.config.sections import ConfigError, load_config  # noqa: E402
from distillery.platform.errors import exit_on_user_error  # noqa: E402
from distillery.tuning.space import SpaceError  # noqa: E402
from distillery.tuning.sweep import run_sweep  # noqa: E402
from distillery.tuning.sweep_config import SweepConfig  # noqa: E402


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML sweep recipe (default: the embedded default)")
    parser.add_argument("--resume", default=None, metavar="SWEEP_PATH",
                        help="continue the sweep stored there (finished trials are kept)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    if args.resume and (args.config or args.overrides):
        parser.exit(2, "error: --resume continues a sweep with its stored config; give no --config or overrides\n")
    try:
        cfg = None if args.resume else load_config(SweepConfig, args.config, args.overrides)
        s = run_sweep(cfg, resume=args.resume)
    except (ConfigError, SpaceError) as exc:
        parser.exit(2, f"error: {exc}\n")
    if s.get("interrupted"):
        print(f"sweep interrupted; continue it with: {s['resume']}")
        print(json.dumps(s, default=str))
        sys.exit(130)
    for row in s["trials"]:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if s["best"]:
        print(f"best: trial {s['best']['trial_id']}  AP {s['best']['best_AP']:.3f}  (MLflow run {s['best']['run_id']})")
        print(f"promote it: python jobs/promote.py --run-id {s['best']['run_id']} "
              f"tracking.tracking_uri={s['tracking_uri']}")
    print(f"MLflow parent run: {s['parent_run_id']}  (tracking URI {s['tracking_uri']})")
    print(json.dumps(s, default=str))
    return s


if __name__ == "__main__":
    exit_on_user_error(main)  # a user error: one "error: ..." block, exit status 2
