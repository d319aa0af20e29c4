"""Config loading: YAML + dotted overrides, validated by pydantic, errors name the key path."""

import pytest
from pydantic import Field, SecretStr

from distillery.platform.cache.job import CacheFeaturesConfig
from distillery.platform.config.sections import (ConfigError, StrictModel, apply_overrides, config_hash,
                                        flatten_config, load_config, parse_job_args)


class Inner(StrictModel):
    lr: float = Field(1e-3, gt=0)
    layers: int = 2
    token: SecretStr = SecretStr("")


class Root(StrictModel):
    name: str = "x"
    inner: Inner = Inner()


def test_embedded_default_when_no_file():
    cfg = load_config(Root)
    assert cfg == Root()


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\ninner:\n  lr: 0.5\n")
    cfg = load_config(Root, f, ["inner.layers=7", "name=z"])
    assert (cfg.name, cfg.inner.lr, cfg.inner.layers) == ("z", 0.5, 7)


def test_unknown_key_names_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lr: 0.5\n  leyers: 3\n")
    with pytest.raises(ConfigError, match=r"inner\.leyers: unknown key"):
        load_config(Root, f)
    with pytest.raises(ConfigError, match=r"inner\.nope: unknown key"):
        load_config(Root, None, ["inner.nope=1"])


def test_wrong_type_and_impossible_value_name_path():
    with pytest.raises(ConfigError, match=r"inner\.layers: .*integer"):
        load_config(Root, None, ["inner.layers=many"])
    with pytest.raises(ConfigError, match=r"inner\.lr: .*greater than 0"):
        load_config(Root, None, ["inner.lr=-1"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["inner.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Root, bad)


def test_cli_exits_with_message(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_job_args(Root, ["inner.bogus=1"])
    assert exc.value.code == 2
    assert "inner.bogus: unknown key" in capsys.readouterr().err


def test_flatten_masks_secrets_and_hash_is_stable():
    cfg = load_config(Root, None, ["inner.token=supersecret"])
    flat = flatten_config(cfg)
    assert flat["inner.token"] == "**********"
    assert "supersecret" not in str(flat) and "supersecret" not in config_hash(cfg)
    assert config_hash(cfg) == config_hash(load_config(Root, None, ["inner.token=other"]))
    assert config_hash(cfg) != config_hash(load_config(Root, None, ["inner.layers=3"]))


def test_job_config_validates_nested_sections():
    cfg = load_config(CacheFeaturesConfig, None, ["cache.dtype=int8", "teacher.input_size=320"])
    assert cfg.cache.dtype == "int8" and cfg.teacher.input_size == 320
    with pytest.raises(ConfigError, match=r"cache\.dtype"):
        load_config(CacheFeaturesConfig, None, ["cache.dtype=int4"])
    with pytest.raises(ConfigError, match=r"cache\.shard_size"):
        load_config(CacheFeaturesConfig, None, ["cache.shard_size=0"])


def test_partial_section_keeps_embedded_default_values():
    class WithFactory(StrictModel):
        inner: Inner = Field(default_factory=lambda: Inner(layers=9))

    cfg = load_config(WithFactory, None, ["inner.lr=0.5"])
    assert cfg.inner.layers == 9 and cfg.inner.lr == 0.5
    job = load_config(CacheFeaturesConfig, None, ["teacher.input_size=320"])
    assert job.teacher.allow_random_init is True  # the embedded default's choice survives
