"""The sweep job's configuration (``jobs/sweep.py``).

A sweep runs one job (the distillation job, or the MoE-tuning job) many times. ``trial`` names
that job's recipe and fixed overrides; ``sweep.space`` the dotted keys Tune samples. The
embedded default is ``gam: auto`` on the embedded distillation default, shortened to 4 epochs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from distillery.platform.config.sections import (JobConfig, LocalPath, OutputSettings, RecipePath, StrictModel,
                                                 TrackingSettings)
from distillery.platform.distill.spec import SPEC as DISTILL
from distillery.platform.jobs import job_spec
from distillery.tuning.space import ParamSpec

__all__ = ["SweepConfig"]


class TrialSettings(StrictModel):
    job: str = DISTILL.name   # a registered job's kind (distillery.platform.jobs)
    config: RecipePath = None  # the job's YAML recipe; None: its embedded default
    overrides: list[str] = Field(default_factory=lambda: ["train.epochs=4", "optim.flat_epochs=2",
                                                          "optim.no_aug_epochs=1",
                                                          "augment.policy_epochs=[1,2,3]",
                                                          "augment.mixup_epochs=[1,2]",
                                                          "augment.multiscale_stop_epoch=3"])

    @field_validator("job")
    @classmethod
    def _registered(cls, job: str) -> str:
        job_spec(job)   # a ValueError naming the known jobs
        return job


class GamAutoSettings(StrictModel):
    """``gam: auto``: calibrate at a fixed lambda, then centre rho on the measured AIFI share."""

    calibration_epochs: PositiveInt = 2
    fixed_lambda: float | None = Field(None, gt=0)  # None: the student size's default DSI weight
    rho_spread: float = Field(0.2, gt=0, lt=1)  # rho sampled in share * [1 - spread, 1 + spread]
    delta_fraction: tuple[float, float] = (0.05, 0.15)  # delta sampled in this fraction of rho

    @model_validator(mode="after")
    def _fraction(self) -> "GamAutoSettings":
        lo, hi = self.delta_fraction
        if not 0 < lo < hi < 1:
            raise ValueError(f"sweep.gam_auto.delta_fraction must satisfy 0 < low < high < 1, got {self.delta_fraction}")
        return self


class SchedulerSettings(StrictModel):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: PositiveInt = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = Field(2.0, gt=1)


class SweepDebugSettings(StrictModel):
    # Simulate Ctrl+C once this many trials have finished (tests the --resume path).
    interrupt_after_trials: int | None = Field(None, ge=1)


class SweepSettings(StrictModel):
    name: str | None = None
    storage_path: LocalPath = "runs/sweeps"
    metric: str = "AP"
    mode: Literal["max", "min"] = "max"
    # auto: a calibration run measures the AIFI share, then rho and delta are sampled around it
    # (plus whatever `space` adds); space: only `space` (e.g. gam.rho/gam.delta ranges by hand).
    gam: Literal["auto", "space"] = "auto"
    gam_auto: GamAutoSettings = Field(default_factory=GamAutoSettings)
    # Empty by default: recipes add keys (a YAML mapping merges into this one, it never removes).
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    num_samples: PositiveInt = 4
    max_concurrent_trials: PositiveInt | None = None  # None: as many as the cluster's CPUs/GPUs allow
    search: Literal["random", "optuna"] = "random"
    seed: int = 0
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)


class SweepConfig(JobConfig):
    trial: TrialSettings = Field(default_factory=TrialSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    tracking: TrackingSettings = Field(default_factory=lambda: TrackingSettings(experiment="distillery-sweeps"))
    output: OutputSettings = Field(default_factory=OutputSettings)
    debug: SweepDebugSettings = Field(default_factory=SweepDebugSettings)

    @model_validator(mode="after")
    def _auto_owns_the_band(self) -> "SweepConfig":
        if self.sweep.gam == "auto":
            taken = sorted({"gam.rho", "gam.delta"} & set(self.sweep.space))
            if taken:
                raise ValueError(f"sweep.gam is 'auto': it sets {taken} itself; remove them from sweep.space")
        if self.sweep.search == "optuna":
            grids = sorted(k for k, p in self.sweep.space.items() if p.type == "grid")
            if grids:  # Optuna samples; it cannot enumerate a grid
                raise ValueError(f"sweep.search is 'optuna' but {grids} use type 'grid': use 'choice', "
                                 "or search: random")
        return self
