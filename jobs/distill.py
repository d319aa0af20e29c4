"""Distil a frozen VFM into an RT-DETRv4 student with Ray Train + DeepSpeed.

    python jobs/distill.py [--config configs/X.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/X.yaml

With no --config it runs the embedded default: the synthetic dataset and its feature cache
(both built if absent), a small RT-DETRv4 student with DSI + GAM on 2 CPU workers for a few
epochs, MLflow in a sqlite file under runs/.
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from distillery.platform.config.sections import parse_job_args  # noqa: E402
from distillery.platform.errors import exit_on_user_error  # noqa: E402
from distillery.platform.distill.driver import run_distill  # noqa: E402
from distillery.platform.config.distill import DistillConfig  # noqa: E402


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_args(DistillConfig, argv, description=__doc__.split("\n\n")[0])
    s = run_distill(cfg)
    m = s.get("best_metrics") or s["metrics"]
    print(f"val AP {m.get('AP', float('nan')):.3f}  AP50 {m.get('AP50', float('nan')):.3f}  "
          f"(best checkpoint: epoch {s.get('checkpoint_epoch')})  lambda {m.get('lambda')}")
    print(f"MLflow run: {s['run_id']}  (tracking URI {s['tracking_uri']}, experiment {s['experiment']})")
    print(f"  view it: mlflow ui --backend-store-uri {s['tracking_uri']}")
    print(f"checkpoints: {s['run_storage']}  (best: {s['best_checkpoint']})")
    if s.get("model_uri"):
        print(f"model: {s['model_uri']}")
    print(f"wall time: {s['wall_seconds']} s")
    print(json.dumps(s, default=str))
    return s


if __name__ == "__main__":
    exit_on_user_error(main)  # a user error: one "error: ..." block, exit status 2
