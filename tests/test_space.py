"""Search spaces: YAML shapes, the checks that run before any trial, and Tune's translation."""

import pytest

from distillery.platform.config.sections import ConfigError, load_config
from distillery.platform.config.distill import DistillConfig
from distillery.tuning.space import ParamSpec, SpaceError, check_space, to_tune_space, trial_overrides
from distillery.tuning.sweep_config import SweepConfig


def spec(**kw):
    return ParamSpec.model_validate(kw)


def test_param_spec_shapes():
    assert spec(type="uniform", low=0.1, high=0.2).high == 0.2
    for bad, match in [({"type": "uniform", "low": 0.2, "high": 0.1}, "below high"),
                       ({"type": "loguniform", "low": 0.0, "high": 1.0}, "low must be > 0"),
                       ({"type": "choice", "values": []}, "non-empty"),
                       ({"type": "quniform", "low": 0, "high": 1}, "needs 'q'"),
                       ({"type": "normal", "low": 0, "high": 1}, "type")]:
        with pytest.raises(ValueError, match=match):
            spec(**bad)


def test_space_checks_name_the_key():
    with pytest.raises(SpaceError, match="empty"):
        check_space({}, DistillConfig, None, [])
    with pytest.raises(SpaceError, match="contradictory.*gam.delta can reach 0.006.*as low as 0.005"):
        check_space({"gam.rho": spec(type="uniform", low=0.005, high=0.01),
                     "gam.delta": spec(type="uniform", low=0.001, high=0.006)}, DistillConfig, None, [])
    with pytest.raises(SpaceError, match="(?s)'optim.learning_rate'.*unknown key"):
        check_space({"optim.learning_rate": spec(type="uniform", low=0.1, high=0.2)}, DistillConfig, None, [])
    with pytest.raises(SpaceError, match="'train.epochs' value 0"):
        check_space({"train.epochs": spec(type="choice", values=[4, 0])}, DistillConfig, None, [])
    with pytest.raises(SpaceError, match="also set by the sweep"):
        check_space({"gam.rho": spec(type="uniform", low=0.005, high=0.01)}, DistillConfig, None, [],
                    fixed={"gam.rho": 0.006})
    check_space({"gam.rho": spec(type="uniform", low=0.005, high=0.01),
                 "gam.delta": spec(type="uniform", low=0.0005, high=0.001),
                 "optim.lr": spec(type="loguniform", low=1e-4, high=1e-3)}, DistillConfig, None, [])


def test_trial_overrides_round_trip_through_the_job_config():
    params = {"gam.rho": 0.0061, "gam.delta": 0.0007, "train.epochs": 3, "gam.enabled": True}
    cfg = load_config(DistillConfig, None, trial_overrides(params) + ["optim.no_aug_epochs=1"])
    assert (cfg.gam.rho, cfg.gam.delta, cfg.train.epochs, cfg.gam.enabled) == (0.0061, 0.0007, 3, True)


def test_tune_space_translation():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = to_tune_space({"a": spec(type="uniform", low=0, high=1), "b": spec(type="loguniform", low=1e-4, high=1e-2),
                           "c": spec(type="randint", low=1, high=4), "d": spec(type="choice", values=[1, 2]),
                           "e": spec(type="grid", values=[8, 16])})
    assert isinstance(space["a"], Float) and isinstance(space["b"], Float) and isinstance(space["c"], Integer)
    assert isinstance(space["d"], Categorical) and space["e"] == {"grid_search": [8, 16]}


def test_sweep_config_rules():
    with pytest.raises(ConfigError, match="sweep.gam is 'auto'.*gam.rho"):
        load_config(SweepConfig, None, ["sweep.space={gam.rho: {type: uniform, low: 0.1, high: 0.2}}"])
    with pytest.raises(ConfigError, match="delta_fraction"):
        load_config(SweepConfig, None, ["sweep.gam_auto.delta_fraction=[0.2,0.1]"])
    with pytest.raises(ConfigError, match="sweep.scheduler.type"):
        load_config(SweepConfig, None, ["sweep.scheduler.type=hyperband"])


def test_optuna_search_takes_the_translated_space():
    """`sweep.search: optuna` gets the same translated space; Optuna proposes values inside it."""
    from ray.tune.search.optuna import OptunaSearch

    space = {"optim.lr": spec(type="loguniform", low=1e-4, high=1e-2), "moe.granularity": spec(type="choice", values=[1, 2, 4]),
             "gam.lambda0": spec(type="uniform", low=0.5, high=2.0)}
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("AP", "max", to_tune_space(space))
    for i in range(3):
        proposed = searcher.suggest(f"t{i}")
        assert 1e-4 <= proposed["optim.lr"] <= 1e-2 and proposed["moe.granularity"] in (1, 2, 4)
        assert 0.5 <= proposed["gam.lambda0"] <= 2.0
        searcher.on_trial_complete(f"t{i}", {"AP": 0.1 * i, "training_iteration": 1})
    with pytest.raises(ConfigError, match="optuna.*grid"):
        load_config(SweepConfig, None, ["sweep.search=optuna", "sweep.gam=space",
                                        "sweep.space={optim.lr: {type: grid, values: [1.0e-4, 2.0e-4]}}"])


def test_granularity_that_does_not_divide_the_ffn_is_refused_before_the_sweep():
    from pathlib import Path

    from distillery.platform.config.moe import MoETuneConfig

    tiny = Path(__file__).resolve().parent.parent / "configs" / "moe_tune_tiny.yaml"
    check_space({"moe.granularity": spec(type="choice", values=[1, 2, 4])}, MoETuneConfig, tiny, [])
    with pytest.raises(SpaceError, match=r"(?s)moe.granularity.*value 7.*must divide the decoder FFN width 128"):
        check_space({"moe.granularity": spec(type="choice", values=[2, 7])}, MoETuneConfig, tiny, [])
