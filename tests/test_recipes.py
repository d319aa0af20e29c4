"""Every YAML recipe under configs/ validates against its job's config model."""

from pathlib import Path

import pytest

from distillery.platform.cache.job import CacheFeaturesConfig
from distillery.platform.config.sections import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def model_for(path: Path):
    if path.name.startswith("cache_features"):
        return CacheFeaturesConfig
    if path.name.startswith(("distill", "rtdetrv4", "deimv2", "finetune")):
        from distillery.platform.config.distill import DistillConfig

        return DistillConfig
    if path.name.startswith("moe_tune"):
        from distillery.platform.config.moe import MoETuneConfig

        return MoETuneConfig
    if path.name.startswith("sweep"):
        from distillery.tuning.sweep_config import SweepConfig

        return SweepConfig
    return None


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_validates(path):
    model = model_for(path)
    assert model is not None, f"{path.name}: no job config model is known for this recipe name"
    load_config(model, path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("sweep*.yaml")), ids=lambda p: p.name)
def test_sweep_recipe_trials_validate(path):
    """A sweep recipe's trial job config (recipe + fixed overrides) and its search space validate."""
    from distillery.tuning.space import check_space
    from distillery.tuning.sweep import job_entry
    from distillery.tuning.sweep_config import SweepConfig

    cfg = load_config(SweepConfig, path)
    model, _ = job_entry(cfg.trial.job)
    trial_config = CONFIGS.parent / cfg.trial.config if cfg.trial.config else None
    load_config(model, trial_config, cfg.trial.overrides)
    if cfg.sweep.space:
        check_space(cfg.sweep.space, model, trial_config, cfg.trial.overrides)
