"""Dynamic-DINO's MoE-tuning in miniature: dense fine-tuning vs MoE N=16/k=2 vs N=8/k=4, paired by seed.

    python benchmarks/moe_ablation.py [--seeds N] [--quick] [--out FILE] [--work-dir DIR]
        [--tracking-uri URI] [--jobs J] [--threads T]

Prints one JSON document; each of its ``rows`` (``dense``, ``moe_n16_k2``, ``moe_n8_k4``) has
``name``, ``ap_mean``, ``ap_std``, ``ap50_mean``, ``ap50_std``, ``seeds``, per-seed APs, the mean
per-epoch AP curve, ``wall_s``, ``img_s``, total and active parameters, and (MoE rows)
``vs_dense``: the difference to dense fine-tuning paired by seed with its 95% t-interval.

Per seed (single process, ``distillery.students.fit.fit``: AdamW groups, flat-cosine schedule,
clipping at 0.1, EMA):

1. **dense base**: the open-vocabulary detector on ``rtdetrv4_tiny`` parts (region-text head over
   the 6 synthetic class names, hashing phrase encoder), built after ``torch.manual_seed(seed)``
   and trained 240 steps of batch 8 (lr 1e-3) on the synthetic shapes (192 train images at
   128 px); its EMA weights are the base.
2. **three arms from that base**, each 144 steps (6 epochs of 24) at lr 2e-4 (backbone 1e-4,
   the MoE job's fine-tuning rates), with the same batches and the same RNG state: dense
   fine-tuning; MoE with every decoder FFN split into N=16 copies at granularity k=2
   (``moe_tune_decoder``: 32 experts of half width, top-2) and N=8, k=4 (32 experts of a quarter
   width, top-4), load-balancing loss 0.01. Top-k equals the granularity, so every arm runs the
   dense FFN's FLOPs per token: the active parameters are equal (up to the routers). Each MoE
   arm starts as the dense base exactly (the decomposition reproduces its outputs).
3. after every tuning epoch the EMA weights are scored on 128 val images (COCO AP,
   ``distillery.evaluation``); the table's AP is the last epoch's.

Augmentation: the fine-tuning recipe's (``AugmentSettings.flips_only``: horizontal flips, the
resize), through the distillation job's batch path (``distill_ablations.step_batches``). The
seed sets the base's initialisation, every batch order and the tuning's RNG. Sizes: about 700
steps and 19 evaluations per seed, about 330 CPU-s; 5 seeds two at a time (``--jobs 2``) about
15 minutes on 2 idle cores. ``--quick``: a plumbing run (1 seed, a few steps), not a claim.

MLflow (``--tracking-uri``, default ``sqlite:///<work-dir>/mlflow.db``): a parent run with the
summary and the AP-curve plot, one child run per (arm, seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.distill_ablations import step_batches  # noqa: E402
from benchmarks.paired import (BaseSettings, EpochScorer, add_common_args, common_setup, log_runs,  # noqa: E402
                              paired_difference, plot_curves, row_summary, run_all)
from distillery.platform.config.augment import AugmentSettings, runtime_augment_config  # noqa: E402
from distillery.platform.config.sections import DataConfig  # noqa: E402
from distillery.platform.io import storage  # noqa: E402

MODEL = "rtdetrv4_tiny"
ARMS = {"dense": None, "moe_n16_k2": (16, 2), "moe_n8_k4": (8, 4)}  # name -> (copies N, granularity k)
TEXT_DIM = 64


@dataclass(frozen=True)
class Settings(BaseSettings):
    base_epochs: int = 10
    base_lr: float = 1e-3
    base_backbone_lr: float = 5e-4
    tune_epochs: int = 6
    tune_lr: float = 2e-4
    tune_backbone_lr: float = 1e-4
    warmup_steps: int = 10
    aux_loss_weight: float = 0.01
    flip_prob: float = 0.5


QUICK = Settings(train=16, val=8, batch=4, steps_per_epoch=2, base_epochs=1, tune_epochs=2, warmup_steps=1,
                 ema_warmups=2, eval_batch=8)


def run_seed(seed: int, settings: Settings, data: DataConfig, threads: int) -> list[dict[str, Any]]:
    """The dense base of ``seed``, then every arm fine-tuned from it; one result per arm."""
    import torch

    from distillery.data.augment import Augmenter
    from distillery.platform.datasets.formats import load_split
    from distillery.platform.distill.teacher_signal import NoTeacher
    from distillery.students.fit import fit
    from distillery.students.moe import collect_aux_loss, moe_parameter_counts
    from distillery.students.open_vocab import build_open_vocab, build_open_vocab_criterion, moe_tune_decoder
    from distillery.students.text import HashingPhraseEncoder

    torch.set_num_threads(threads)
    s = settings
    device = torch.device("cpu")
    train = load_split(data, "train")
    augment = runtime_augment_config(AugmentSettings.flips_only(s.flip_prob), s.size)

    def batches(stream: int):
        return step_batches(train, seed=seed * 100 + stream, batch=s.batch, steps_per_epoch=s.steps_per_epoch,
                            augmenter=Augmenter(augment, seed=seed * 100 + stream), signal=NoTeacher(None),
                            cache_uri=None, device=device)

    def seeded(value: int) -> None:
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)

    t0 = time.perf_counter()
    seeded(seed)
    base = build_open_vocab(MODEL, list(train.categories.names), encoder=HashingPhraseEncoder(dim=TEXT_DIM),
                            eval_spatial_size=s.size)
    criterion = build_open_vocab_criterion(base)
    base_steps = s.base_epochs * s.steps_per_epoch
    fitted = fit(base, criterion, batches(0), steps=base_steps, lr=s.base_lr, backbone_lr=s.base_backbone_lr,
                 warmup_steps=s.warmup_steps, ema_decay=s.ema_decay, ema_warmups=s.ema_warmups)
    base.load_state_dict(fitted.ema.module.state_dict())  # the EMA weights (the EMA copy itself is frozen)
    base_scorer = EpochScorer(data, s.size, s.eval_batch, base_steps, f"dense base seed {seed}")
    base_scorer(0, fitted)
    base_ap = base_scorer.curve[0]
    base_s = time.perf_counter() - t0

    results = []
    for name, split in ARMS.items():
        t1 = time.perf_counter()
        model = copy.deepcopy(base).train()
        if split is not None:
            moe_tune_decoder(model, *split, aux_loss_weight=s.aux_loss_weight)
        counts = moe_parameter_counts(model)
        scorer = EpochScorer(data, s.size, s.eval_batch, s.steps_per_epoch, f"{name} seed {seed}")

        seeded(seed + 1)  # the same RNG state (denoising draws) for every arm
        steps = s.tune_epochs * s.steps_per_epoch
        result = fit(model, criterion, batches(1), steps=steps, lr=s.tune_lr, backbone_lr=s.tune_backbone_lr,
                     warmup_steps=s.warmup_steps, ema_decay=s.ema_decay, ema_warmups=s.ema_warmups,
                     steps_per_epoch=s.steps_per_epoch, aux_loss=collect_aux_loss if split else None,
                     on_epoch_end=scorer)
        train_seconds = result.seconds - scorer.seconds
        curve = scorer.curve
        results.append({"row": name, "seed": seed, "ap": curve[-1]["AP"], "ap50": curve[-1]["AP50"],
                        "epochs": curve, "base_ap": round(base_ap["AP"], 4), "base_s": round(base_s, 1),
                        "wall_s": round(time.perf_counter() - t1, 1), "train_s": round(train_seconds, 1),
                        "img_s": round(steps * s.batch / train_seconds, 2), "params_total": counts["total"],
                        "params_active": counts["active"],
                        "params": {"copies": split[0] if split else 1, "granularity": split[1] if split else 1}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "runs/moe_ablation")
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings()
    t0 = time.perf_counter()
    seeds, jobs, work, tracking_uri, data = common_setup(args, settings.train, settings.val, settings.size,
                                                         settings.data_seed)
    per_seed = run_all(partial(run_seed, settings=settings, data=data, threads=args.threads), seeds, jobs,
                       work / "runs.jsonl", key=lambda seed: f"seed{seed}", resume=args.resume,
                       salt=repr((settings, data, args.threads)))
    results = [r for runs in per_seed for r in runs]

    by_row = {name: [r for r in results if r["row"] == name] for name in ARMS}
    ap = {name: {r["seed"]: r["ap"] for r in runs} for name, runs in by_row.items()}
    table = []
    for name, runs in by_row.items():
        entry = {**row_summary(name, runs), "params_total": runs[0]["params_total"],
                 "params_active": runs[0]["params_active"], **runs[0]["params"]}
        if name != "dense":
            entry["vs_dense"] = paired_difference(ap[name], ap["dense"])
        table.append(entry)
    base_ap = [runs[0]["base_ap"] for runs in per_seed]

    plot = work / "moe_ablation.png"
    plot_curves(by_row, plot, f"MoE-tuning from a dense {MODEL} base, {settings.tune_epochs * settings.steps_per_epoch}"
                              f" steps of {settings.batch}, {len(seeds)} seed(s), {settings.val} val images")
    document = {"benchmark": "moe_ablation", "quick": args.quick, "model": MODEL, "seeds": seeds,
                "settings": asdict(settings), "base_ap_per_seed": base_ap, "rows": table, "runs": results,
                "jobs": jobs, "threads": args.threads, "cpu_count": os.cpu_count(), "plot": str(plot),
                "tracking_uri": tracking_uri, "wall_s": round(time.perf_counter() - t0, 1)}
    document["mlflow_parent_run_id"] = log_runs(
        tracking_uri, "moe-ablation", "moe_ablation",
        {"model": MODEL, "seeds": len(seeds), "tune_steps": settings.tune_epochs * settings.steps_per_epoch,
         "base_steps": settings.base_epochs * settings.steps_per_epoch, "quick": args.quick},
        results, document, [str(plot)])
    text = json.dumps(document)
    if args.out:
        storage.write_text(str(Path(args.out).resolve()), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
