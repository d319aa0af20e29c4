"""Every YAML recipe under configs/ validates against its job's config model, and every job's
embedded default (onto which each recipe is merged) is the recorded one."""

import json
import os
from pathlib import Path

import pytest

from distillery.platform.cache.job import CacheFeaturesConfig
from distillery.platform.config.sections import flatten_config, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EMBEDDED_DEFAULTS = Path(__file__).resolve().parent / "fixtures" / "embedded_defaults.json"


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
    from distillery.platform.jobs import job_specs

    # Any other registered job's recipes are named after its kind (<kind>_*.yaml).
    return next((spec.config_class for spec in job_specs().values() if path.name.startswith(spec.name)), None)


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


def _embedded_defaults() -> dict[str, dict[str, str]]:
    from distillery.platform.jobs import job_specs
    from distillery.tuning.sweep_config import SweepConfig

    training_jobs = [spec.config_class for spec in job_specs().values()]   # every registered job's
    return {model.__name__: flatten_config(load_config(model))
            for model in (CacheFeaturesConfig, *training_jobs, SweepConfig)}


def test_embedded_defaults_are_the_recorded_ones():
    """Every key and default of every job. A recipe is a diff against its job's embedded default,
    so this also pins what each recipe loads to. After a deliberate change of a default, record
    it: DISTILLERY_RECORD_DEFAULTS=1 pytest tests/test_recipes.py -k embedded."""
    current = _embedded_defaults()
    if os.environ.get("DISTILLERY_RECORD_DEFAULTS"):
        EMBEDDED_DEFAULTS.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(EMBEDDED_DEFAULTS.read_text())
    for job, keys in recorded.items():
        now = current[job]
        differ = {k: (keys.get(k), now.get(k)) for k in keys.keys() | now.keys() if keys.get(k) != now.get(k)}
        assert not differ, f"{job}: (recorded, now) differ: {differ}"
    assert recorded.keys() == current.keys()


OFFICIAL_SIZES = [f"rtdetrv4_{s}" for s in ("s", "m", "l", "x")] + [
    f"deimv2_{s}" for s in ("atto", "femto", "pico", "n", "s", "m", "l", "x")]


@pytest.mark.parametrize("size", OFFICIAL_SIZES)
def test_each_official_size_has_a_recipe_that_builds_its_criterion(size):
    """configs/<size>.yaml trains that student with its official criterion (the recipe's criterion
    section spells out what the size's official settings already are), on 8 GPU workers, with the
    matcher change and the no-augmentation tail inside the run."""
    from distillery.platform.config.distill import DistillConfig
    from distillery.students import build_criterion, criterion_options

    cfg = load_config(DistillConfig, CONFIGS / f"{size}.yaml")
    assert cfg.student.name == size and cfg.train.num_workers == 8 and cfg.train.use_gpu is True
    options = cfg.criterion_options()
    assert options == criterion_options(size)
    criterion = build_criterion(80, **options)
    assert criterion.matcher.change_epoch == options.get("matcher_change_epoch")
    if criterion.matcher.change_epoch is not None:
        assert 0 < criterion.matcher.change_epoch < cfg.train.epochs
    assert cfg.optim.no_aug_epochs < cfg.train.epochs and cfg.optim.ema_decay == 0.9999
    assert cfg.augment.policy_epochs[-1] <= cfg.train.epochs - cfg.optim.no_aug_epochs  # strong ops end first
