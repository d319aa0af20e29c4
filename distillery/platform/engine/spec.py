"""A job on the engine, described by one frozen object: :class:`JobSpec`.

The engine runs any job a spec describes and knows none by name: a job package (``distill/``,
``moe/``) builds its spec in its ``spec.py`` (the one place its kind is spelled) and
``distillery.platform.jobs`` registers it with one line. The idea is torchtitan's ``TrainSpec``
(one object per model family naming its builders); here a spec names a job's classes and, as
``"module:attribute"`` paths loaded on use, its worker-side job (which loads DeepSpeed: the driver
checks its inputs first) and its driver steps (run inside the engine's one set-up,
:func:`~distillery.platform.engine.driver.run_training_job`).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (annotations only: the checkpoint module imports this one)
    from distillery.platform.engine.checkpoints import CheckpointRecord
    from distillery.platform.engine.run_spec import RunDescription

__all__ = ["JobSpec", "load_attribute"]


def load_attribute(path: str) -> Any:
    """The object a ``"package.module:attribute"`` path names."""
    module, _, attribute = path.partition(":")
    if not module or not attribute:
        raise ValueError(f"{path!r} is not a 'package.module:attribute' path")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class JobSpec:
    """Everything the engine and the platform need to know about one training job."""

    name: str                              # the job kind: checkpoint records, MLflow tags, trial.job of a sweep
    config_class: type                     # the job's pydantic config (one per job)
    run_class: type[RunDescription]        # what its driver hands every worker
    record_class: type[CheckpointRecord]   # its checkpoints' distillery_state.json
    job: str                               # "module:Class" of its TrainingJob (the workers' builder and hooks)
    driver: str                            # "module:Class" of its JobDriver (its steps in the driver's set-up)
    description: str = ""
    best_metric: str = "AP"                # the val metric (higher is better) that ranks its checkpoints

    @property
    def run_prefix(self) -> str:
        """The run folder's name prefix when ``output.name`` is unset."""
        return self.name.replace("_", "-")

    def job_class(self) -> type:
        return load_attribute(self.job)

    def run_function(self):
        """``run(cfg, *, callbacks=None, parent_run_id=None, extra_tags=None) -> summary``: the job
        as its CLI and a sweep's trial run it."""
        from distillery.platform.engine.driver import run_training_job  # (it imports this module)

        return functools.partial(run_training_job, self)
