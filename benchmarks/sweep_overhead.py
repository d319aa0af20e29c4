"""Tune overhead: N tiny distillation trainings through a Tune sweep vs the same N back to back.

    python benchmarks/sweep_overhead.py [--trials 2] [--epochs 1]

Both sides run the same job function with the same configs, one trial at a time (Tune with
max_concurrent_trials=1, FIFO, no calibration), in one Ray instance, alternating which side
goes first. Prints one JSON line; ``overhead`` = tune wall / direct wall - 1 (goal < 0.15).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distillery.platform.config.sections import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()

    import ray

    from distillery.platform.distill.driver import prepare_inputs, run_distill
    from distillery.platform.config.distill import DistillConfig
    from distillery.tuning.sweep import run_sweep
    from distillery.tuning.sweep_config import SweepConfig

    repo = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    lrs = [4e-4 * (1 + 0.25 * i) for i in range(args.trials)]
    trial = [f"data.root={tmp / 'data'}", f"cache.uri={tmp / 'cache'}", "train.num_workers=1",
             f"train.epochs={args.epochs}", "optim.no_aug_epochs=0", "tracking.num_val_images=0",
             "tracking.log_model=false"]
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    base = load_config(DistillConfig, repo / "configs/distill_tiny.yaml", trial)
    prepare_inputs(base)  # data + cache once, outside both timings

    def direct() -> float:
        t0 = time.perf_counter()
        for i, lr in enumerate(lrs):
            cfg = load_config(DistillConfig, repo / "configs/distill_tiny.yaml",
                              [*trial, f"optim.lr={lr}", f"output.storage_path={tmp / 'direct'}",
                               f"output.name=d{i}-{time.time_ns()}", f"output.local_dir={tmp}",
                               f"tracking.tracking_uri={tracking}"])
            run_distill(cfg)
        return time.perf_counter() - t0

    def tuned() -> float:
        cfg = load_config(SweepConfig, None, [
            "trial.job=distill", f"trial.config={repo / 'configs/distill_tiny.yaml'}",
            f"trial.overrides={json.dumps(trial)}", "sweep.gam=space",
            f"sweep.space={{optim.lr: {{type: grid, values: {json.dumps(lrs)}}}}}",
            "sweep.num_samples=1", "sweep.max_concurrent_trials=1", "sweep.scheduler.type=fifo",
            f"sweep.storage_path={tmp / 'sweeps'}", f"sweep.name=s{time.time_ns()}",
            f"output.local_dir={tmp}", f"tracking.tracking_uri={tracking}"])
        t0 = time.perf_counter()
        run_sweep(cfg)
        return time.perf_counter() - t0

    walls = {"direct": [], "tune": []}
    for order in (("direct", "tune"), ("tune", "direct")):
        for side in order:
            walls[side].append(direct() if side == "direct" else tuned())
    d, t = sum(walls["direct"]), sum(walls["tune"])
    print(json.dumps({"benchmark": "sweep_overhead", "trials": args.trials, "epochs": args.epochs,
                      "direct_s": [round(w, 1) for w in walls["direct"]],
                      "tune_s": [round(w, 1) for w in walls["tune"]],
                      "overhead": round(t / d - 1, 4), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
