"""Config loading: YAML + dotted overrides, validated by pydantic, errors name the key path."""

from pathlib import Path

import pytest
from pydantic import Field, SecretStr

from distillery.data.augment import AugmentConfig
from distillery.data.views import view_recipe
from distillery.platform.cache.job import CacheFeaturesConfig
from distillery.platform.config.augment import NEVER, AugmentSettings, runtime_augment_config
from distillery.platform.config.cache import ViewRecipe
from distillery.platform.config.distill import DistillConfig
from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.config.sections import (ConfigError, StrictModel, apply_overrides, config_hash,
                                                 TeacherConfig, flatten_config, load_config, parse_job_args,
                                                 with_absolute_paths)
from distillery.tuning.sweep_config import SweepConfig


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


def test_pca_cache_settings_resolve_against_the_teacher_width():
    cfg = load_config(CacheFeaturesConfig, None, ["cache.dtype=pca", "cache.pca.dims=0.125"])
    assert cfg.cache.codec_spec(768) == {"dtype": "pca", "dims": 96, "bits": 8, "fit_images": 64}
    assert load_config(CacheFeaturesConfig, None, ["cache.dtype=pca"]).cache.codec_spec(32)["dims"] == 8
    assert load_config(CacheFeaturesConfig, None, ["cache.dtype=int8"]).cache.codec_spec(768) == {"dtype": "int8"}
    with pytest.raises(ValueError, match=r"cache\.pca\.dims=64 is more than the teacher's 32 channels"):
        load_config(CacheFeaturesConfig, None, ["cache.dtype=pca", "cache.pca.dims=64"]).cache.codec_spec(32)
    for bad in ("cache.pca.bits=3", "cache.pca.dims=-0.5", "cache.pca.fit_images=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(CacheFeaturesConfig, None, [bad])


def test_partial_section_keeps_embedded_default_values():
    class WithFactory(StrictModel):
        inner: Inner = Field(default_factory=lambda: Inner(layers=9))

    cfg = load_config(WithFactory, None, ["inner.lr=0.5"])
    assert cfg.inner.layers == 9 and cfg.inner.lr == 0.5
    job = load_config(CacheFeaturesConfig, None, ["teacher.input_size=320"])
    assert job.teacher.domain is not None and job.teacher.domain.steps == 600  # the embedded default's choice survives


# --------------------------------------------------------------------------- shared sections

def test_shared_sections_keep_each_jobs_defaults_and_keys():
    moe = load_config(MoETuneConfig, None, ["optim.weight_decay=0.01", "output.name=x", "tracking.tracking_uri=u"])
    assert (moe.optim.lr, moe.optim.warmup_steps, moe.optim.weight_decay) == (2e-4, 10, 0.01)
    assert (moe.output.storage_path, moe.tracking.experiment, moe.train.epochs) == ("runs/moe_tune", "distillery-moe", 4)
    distill = load_config(DistillConfig, None, ["optim.weight_decay=0.01"])
    assert (distill.optim.lr, distill.output.storage_path, distill.tracking.experiment) == (1e-3, "runs/train",
                                                                                            "distillery")
    assert load_config(SweepConfig).tracking.experiment == "distillery-sweeps"
    # A section shared by several jobs gives none of them another job's keys.
    for model, key in [(MoETuneConfig, "debug.max_steps_per_epoch"), (MoETuneConfig, "tracking.log_model"),
                       (MoETuneConfig, "optim.ema_decay"), (DistillConfig, "optim.flat_fraction"),
                       (DistillConfig, "cache.splits"), (SweepConfig, "output.storage_path")]:
        with pytest.raises(ConfigError, match=rf"{key.replace('.', chr(92) + '.')}: unknown key"):
            load_config(model, None, [f"{key}=1"])


# --------------------------------------------------------------------------- local paths

PATH_FIELDS = {  # every field marked as a local path, per job (a new one belongs here too)
    CacheFeaturesConfig: {"data.root", "teacher.weights", "cache.uri"},
    DistillConfig: {"data.root", "teacher.weights", "cache.uri", "output.local_dir", "output.storage_path",
                    "output.resume_from"},
    MoETuneConfig: {"data.root", "text.vocabulary", "text.cache_dir", "base.checkpoint", "output.local_dir",
                    "output.storage_path", "output.resume_from"},
    SweepConfig: {"trial.config", "sweep.storage_path", "output.local_dir"},
}


@pytest.mark.parametrize("model", list(PATH_FIELDS), ids=lambda m: m.__name__)
def test_marked_path_fields_resolve_against_distillery_home(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "w.pt").write_bytes(b"")
    relative = {key: "w.pt" if key.endswith("weights") else f"rel/{key}" for key in PATH_FIELDS[model]}
    relative.pop("trial.config", None)  # a recipe must exist to load: tested below
    cfg = load_config(model, None, [f"{k}={v}" for k, v in relative.items()])
    before, after = flatten_config(cfg), flatten_config(with_absolute_paths(cfg))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == set(relative)
    assert all(after[k] == str(tmp_path / "home" / v) for k, v in relative.items())
    assert flatten_config(cfg) == before  # the config given is not modified


def test_non_file_sources_and_recipes_keep_their_meaning(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    moe = with_absolute_paths(load_config(MoETuneConfig, None, ["base.checkpoint=models:/detector@champion",
                                                                 "output.storage_path=s3://bucket/runs",
                                                                 "text.cache_dir=null"]))
    assert (moe.base.checkpoint, moe.output.storage_path, moe.text.cache_dir) == (
        "models:/detector@champion", "s3://bucket/runs", None)
    # (constructed unvalidated: validation would try to reach the hub)
    cache = CacheFeaturesConfig.model_construct(
        teacher=TeacherConfig.model_construct(weights="hf-hub:timm/vit_small_patch16_dinov3"))
    assert with_absolute_paths(cache).teacher.weights == "hf-hub:timm/vit_small_patch16_dinov3"
    # A sweep's trial recipe travels with the code: it resolves against the current directory.
    recipe = Path("configs/distill_tiny.yaml")
    sweep = with_absolute_paths(load_config(SweepConfig, None, [f"trial.config={recipe}"]))
    assert sweep.trial.config == str(tmp_path / recipe)


# --------------------------------------------------------------------------- augmentation

def test_one_translation_of_the_augment_section():
    cfg = runtime_augment_config(AugmentSettings(copyblend_prob=0.2, mixup_epochs=(2, 5)), 320)
    assert cfg == AugmentConfig(size=320, policy_epochs=(3, 6, 9), mosaic_prob=0.5, mixup_prob=0.3,
                                mixup_epochs=(2, 5), photometric_prob=0.5, iou_crop_prob=0.8, flip_prob=0.5,
                                multiscale_stop_epoch=0, copyblend_prob=0.2, copyblend_epochs=(3, 9))
    assert runtime_augment_config(AugmentSettings(multiscale=True), 320).multiscale_stop_epoch == 9
    views = runtime_augment_config(ViewRecipe(zoom_out_ratio=(1.0, 2.0), flip_prob=0.3), 128)
    assert (views.size, views.zoom_out_ratio, views.flip_prob, views.photometric_prob) == (128, (1.0, 2.0), 0.3, 0.5)
    # The training side's view recipe is the one the cache job records for the same probabilities.
    settings = AugmentSettings(photometric_prob=0.4, iou_crop_prob=0.7, flip_prob=0.2)
    assert view_recipe(runtime_augment_config(settings, 256)) == view_recipe(
        runtime_augment_config(settings.view_recipe(), 256))


def test_fine_tuning_augments_with_flips_only():
    cfg = runtime_augment_config(load_config(MoETuneConfig, None, ["train.flip_prob=0.25"]).train.augment(), 256)
    assert (cfg.flip_prob, cfg.multiscale_stop_epoch, cfg.policy_epochs[0], cfg.mixup_epochs[0]) == (0.25, 0, NEVER,
                                                                                                     NEVER)


def test_the_job_criterion_is_the_sizes_official_one_with_the_recipes_overrides():
    """DistillConfig.criterion_options(): the student's official settings (students.criterion_options),
    the ``criterion`` section on top; the job builds its criterion from it and hands the matcher the
    epoch at each epoch start (DistillJob.step_batches)."""
    from distillery.platform.distill.job import DistillJob
    from distillery.students import build_criterion

    pico = load_config(DistillConfig, None, ["student.name=deimv2_pico"])
    assert pico.criterion_options() == {"local_losses": False, "use_union_set": False, "matcher_change_epoch": 450,
                                        "iou_order_alpha": 4.0}
    assert load_config(DistillConfig, None, []).criterion_options() == {}  # rtdetrv4_tiny: no matcher change
    recipe = load_config(DistillConfig, None, ["student.name=deimv2_pico", "criterion.matcher_change_epoch=3",
                                               "criterion.weight_dict={loss_bbox: 4.0}"])
    assert recipe.criterion_options()["matcher_change_epoch"] == 3
    assert recipe.criterion_options()["weight_dict"] == {"loss_bbox": 4.0}
    off = load_config(DistillConfig, None, ["student.name=deimv2_s", "criterion.change_matcher=false"])
    assert "matcher_change_epoch" not in off.criterion_options()
    with pytest.raises(ConfigError, match="change_matcher is true but neither"):
        load_config(DistillConfig, None, ["criterion.change_matcher=true"])
    with pytest.raises(ConfigError, match=r"criterion\.weight_dict.*loss_vfl"):
        load_config(DistillConfig, None, ["criterion.weight_dict={loss_vfl: 1.0}"])

    job = DistillJob.__new__(DistillJob)  # the epoch hook alone (no workers)
    job.cfg, job.criterion = recipe, build_criterion(3, **recipe.criterion_options())
    job.step_batches(2)
    assert not job.criterion.matcher.changed
    job.step_batches(3)
    assert job.criterion.matcher.changed
