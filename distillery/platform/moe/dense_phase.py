"""The MoE-tuning job's dense phase: without a base checkpoint, the dense detector is first trained
from scratch for ``base.dense_steps`` steps, as engine epochs of the job's own data (data parallel,
DeepSpeed, the engine's step, a checkpoint every ``base.checkpoint_every`` epochs and at its end:
a failure restarts from the phase's last checkpoint), before it is decomposed into experts. Its
epochs log under ``dense/``."""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import torch

from distillery.platform.engine.trainer import Built, Phase
from distillery.platform.io import storage
from distillery.platform.moe.model_files import save_tuned_model
from distillery.platform.moe.spec import DENSE_BASE_DIR, DENSE_PHASE, MODEL_FILE

__all__ = ["dense_phase", "finish_dense_phase"]


def dense_phase(job) -> Phase:
    """The phase of ``job`` (a :class:`~distillery.platform.moe.job.MoETuneJob`): ``base.dense_steps``
    steps in epochs of the job's length (the last one shorter), evaluated by the MoE phase's start."""
    steps = job.cfg.base.dense_steps
    return Phase(DENSE_PHASE, math.ceil(steps / job.micro_steps_per_epoch()), functools.partial(_build, job),
                 max_steps=steps, checkpoint_every=job.cfg.base.checkpoint_every)


def _build(job, restoring: bool) -> Built:
    b = job.cfg.base
    engine = job.engine_for(job.dense_model(), lr=b.lr, backbone_lr=b.backbone_lr, warmup_steps=b.warmup_steps,
                            total_steps=b.dense_steps, flat_fraction=1.0, moe=False)
    return Built(engine=engine, criterion=job.criterion())


def finish_dense_phase(job, built: Built) -> torch.nn.Module:
    """A fresh dense model holding the trained weights (the engine registered hooks on its module;
    the MoE engine starts from a clean one); rank 0 stores it in the run storage
    (``dense_base/model.safetensors``). The dense engine is released."""
    fresh = job.dense_model()
    fresh.load_state_dict({k: v.float() for k, v in built.engine.module.state_dict().items()})
    built.engine.destroy()
    if job.ctx.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILE
            save_tuned_model(fresh, path, {"name": job.cfg.model.name, "build_options": job.run.build_options,
                                           "input_size": job.input_size, "moe": None,
                                           "dense_steps": job.cfg.base.dense_steps})
            storage.write_bytes(storage.join(job.run.run_storage, DENSE_BASE_DIR, MODEL_FILE), path.read_bytes())
    return fresh
