"""Dynamic-DINO MoE-tuning of an open-vocabulary detector with Ray Train + DeepSpeed expert parallelism.

    python jobs/moe_tune.py [--config configs/X.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/moe_tune.py --config configs/moe_tune_tiny.yaml

With no --config it runs the embedded default: the synthetic dataset, a small open-vocabulary
detector whose dense base is trained first in the same job, then MoE-tuned (N=16 copies,
granularity k=2, top-2 routing) on 2 CPU workers with ep_size=2; MLflow in a sqlite file under
runs/. `base.checkpoint=...` starts from a dense checkpoint instead (a file, a checkpoint
directory, a run path, or models:/<name>@<alias>).
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from distillery.platform.config.sections import parse_job_args  # noqa: E402
from distillery.platform.errors import exit_on_user_error  # noqa: E402
from distillery.platform.config.moe import MoETuneConfig  # noqa: E402
from distillery.platform.moe.driver import run_moe_tune  # noqa: E402


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_args(MoETuneConfig, argv, description=__doc__.split("\n\n")[0])
    s = run_moe_tune(cfg)
    m = s.get("best_metrics") or s["metrics"]
    base = s.get("base_metrics") or {}
    print(f"val AP {m.get('AP', float('nan')):.3f}  AP50 {m.get('AP50', float('nan')):.3f}  "
          f"(best checkpoint: epoch {s.get('checkpoint_epoch')}; dense base AP {base.get('AP', float('nan')):.3f})")
    if s.get("step0"):
        print(f"step-0 max |MoE - dense| on the probe images: {s['step0']['max_abs_diff']:.2e}")
    a = s.get("analysis")
    if a:
        print(f"stable partners per expert: shallow layers {a['shallow_mean_stable_partners']:.2f}, "
              f"deep layers {a['deep_mean_stable_partners']:.2f}  (figures: {', '.join(s['analysis_figures'])})")
    print(f"MLflow run: {s['run_id']}  (tracking URI {s['tracking_uri']}, experiment {s['experiment']})")
    print(f"  view it: mlflow ui --backend-store-uri {s['tracking_uri']}")
    print(f"checkpoints: {s['run_storage']}  (best: {s['best_checkpoint']})")
    print(f"wall time: {s['wall_seconds']} s")
    print(json.dumps({k: v for k, v in s.items() if k != "analysis"}, default=str))
    return s


if __name__ == "__main__":
    exit_on_user_error(main)  # a user error: one "error: ..." block, exit status 2
