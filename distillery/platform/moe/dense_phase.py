"""The MoE-tuning job's dense phase: without a base checkpoint, the dense detector is trained from
scratch for ``base.dense_steps`` steps (data parallel, DeepSpeed, the engine's step) before it is
decomposed into experts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from distillery.platform.engine.norm_sync import average_norm_statistics
from distillery.platform.engine.trainer import engine_step
from distillery.platform.io import storage
from distillery.platform.moe.model_files import save_tuned_model
from distillery.platform.moe.spec import DENSE_BASE_DIR, MODEL_FILE

__all__ = ["train_dense_base"]

DENSE_PASS_OFFSET = 10_000   # the dense phase's shuffle seeds never meet the MoE epochs'


def train_dense_base(job, model: torch.nn.Module, criterion: torch.nn.Module) -> torch.nn.Module:
    """Train ``model`` for ``base.dense_steps`` steps; return a fresh dense model holding the result
    (the engine that trained it registered hooks on its module; the MoE engine starts from a clean
    one). Rank 0 stores it in the run storage. ``job``: the :class:`~distillery.platform.moe.job.MoETuneJob`."""
    cfg = job.cfg
    steps = cfg.base.dense_steps
    engine = job.engine_for(model, lr=cfg.base.lr, backbone_lr=cfg.base.backbone_lr,
                            warmup_steps=cfg.base.warmup_steps, total_steps=steps, flat_fraction=1.0, moe=False)
    engine.train()
    done, pass_id = 0, 0
    while done < steps:
        before = done
        for batch in job.step_batches(DENSE_PASS_OFFSET + pass_id, max_steps=steps - done):
            result = engine_step(engine, criterion, batch)
            done += 1
            if job.ctx.logger is not None and done % cfg.train.log_every == 0:
                job.ctx.logger.log({"dense/loss": float(result.total.detach()), "dense/lr": engine.get_lr()[0]}, done)
        if done == before:
            raise RuntimeError("dense phase: no training batch (the train split is smaller than "
                               "train.batch_size x train.num_workers)")
        pass_id += 1
    average_norm_statistics(engine.module)
    fresh = job.dense_model()
    fresh.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    engine.destroy()
    del engine
    if job.ctx.rank == 0:
        _store(fresh, job, steps)
    return fresh


def _store(model: torch.nn.Module, job, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        save_tuned_model(model, path, {"name": job.cfg.model.name, "build_options": job.run.build_options,
                                       "input_size": job.input_size, "moe": None, "dense_steps": steps})
        storage.write_bytes(storage.join(job.run.run_storage, DENSE_BASE_DIR, MODEL_FILE), path.read_bytes())
