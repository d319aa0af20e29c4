"""The teacher-pretraining job on the engine (``jobs/pretrain_teacher.py --engine``), end to end at
tiny size (configs/teacher_pretrain_tiny.yaml: a 2-block, 64-wide DINOv3 at 128 px, 32 synthetic
train images, 12 val, 1 worker, 2 epochs of 8 steps): it trains (the val probe beats the untrained
teacher's, measured here), its teacher file loads through the distillation job's teacher loader
with the features of the trained model, its checkpoints name the job and a run resumes from them.

The margin asked for is well inside the one measured at this size: the val balanced accuracy after
training minus the untrained model's, +0.092 +- 0.018 over model/train seeds 0-3 (smallest +0.070;
seed 0, this test's: 0.507 -> 0.603).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from distillery.platform.cache.job import build_teacher
from distillery.platform.config.sections import TeacherConfig, load_config
from distillery.platform.distill.spec import SPEC as DISTILL_SPEC
from distillery.platform.engine.checkpoints import (DS_MODEL_FILE, DS_TAG, STATE_JSON, CheckpointError,
                                                    deepspeed_safe_globals, read_record)
from distillery.platform.teacher_pretrain.config import TeacherPretrainConfig
from distillery.platform.teacher_pretrain.driver import run_teacher_pretrain
from distillery.platform.teacher_pretrain.job import DensePatchModel, build_vit, probe_metrics
from distillery.platform.teacher_pretrain.patch_data import load_patch_split
from distillery.platform.teacher_pretrain.spec import SPEC, TEACHER_FILE

REPO = Path(__file__).resolve().parent.parent


def tiny_config(tmp: Path, *overrides: str) -> TeacherPretrainConfig:
    return load_config(TeacherPretrainConfig, REPO / "configs" / "teacher_pretrain_tiny.yaml", [
        f"data.root={tmp / 'data'}", f"output.storage_path={tmp / 'runs'}", f"output.local_dir={tmp}",
        "output.name=pretrain", *overrides])


@pytest.fixture(scope="module")
def pretrained(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher_pretrain_job")
    cfg = tiny_config(tmp)
    return cfg, run_teacher_pretrain(cfg)


def _model(cfg: TeacherPretrainConfig, num_classes: int, state: dict | None = None) -> DensePatchModel:
    """The job's model as its workers build it (untrained; an 8x8 grid), or with a checkpoint's weights."""
    vit = build_vit(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model.seed + 2)
        head = torch.nn.Linear(int(vit.embed_dim), num_classes)
    model = DensePatchModel(vit, head, cfg.model.input_size, cfg.model.pool, grid=8)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def test_the_job_trains_a_teacher_the_distillation_loads(pretrained):
    cfg, s = pretrained
    data = cfg.data.model_copy(update={"root": str(Path(cfg.output.local_dir) / "data")})
    grid, classes = 8, 7   # 128 px / patch 16; six synthetic categories + the background
    probe = load_patch_split(*data.split_paths("train"), 128, grid, cfg.eval.probe_images)
    val = load_patch_split(*data.split_paths("val"), 128, grid)
    measure = dict(probe_steps=cfg.eval.probe_steps, batch_size=cfg.train.eval_batch_size)

    # It trains: the untrained model, measured here, is the job's own "before"; the best epoch beats it.
    untrained = probe_metrics(_model(cfg, classes), probe, val, classes, **measure)
    assert untrained == pytest.approx(s["initial_metrics"], abs=1e-6)
    best = s["best_metrics"]
    print(f"val balanced accuracy: untrained {untrained['balanced_accuracy']:.3f}, "
          f"trained {best['balanced_accuracy']:.3f} (epoch {s['checkpoint_epoch'] + 1})")
    assert best["balanced_accuracy"] > untrained["balanced_accuracy"] + 0.02, (untrained, best)
    assert best["head_balanced_accuracy"] > untrained["head_balanced_accuracy"]
    assert s["metrics"]["global_step"] == 16 and s["metrics"]["epoch"] == 1

    # The best checkpoint: its record names the job; another job's spec refuses it.
    checkpoint = Path(s["best_checkpoint"])
    assert json.loads((checkpoint / STATE_JSON).read_text())["kind"] == "teacher_pretrain"
    record = read_record(checkpoint, SPEC)
    assert record.epoch == s["checkpoint_epoch"] and record.initial_metrics == s["initial_metrics"]
    with pytest.raises(CheckpointError, match="written by the teacher_pretrain job"):
        read_record(checkpoint, DISTILL_SPEC)

    # Its teacher file (Meta's layout, copied to the run storage) loads through the distillation and
    # cache jobs' teacher loader and gives exactly the checkpoint's model's patch features.
    assert s["teacher"]["weights"] == str(Path(s["run_storage"]) / TEACHER_FILE)
    assert (checkpoint / TEACHER_FILE).read_bytes() == Path(s["teacher"]["weights"]).read_bytes()
    trained = _model(cfg, classes, _ds_module_state(checkpoint)).eval()
    teacher = build_teacher(TeacherConfig(**s["teacher"]).model_dump(), "float32")
    assert teacher.fingerprint["rope_periods"] == "checkpoint"
    images = val[0][:4]
    torch.testing.assert_close(teacher(images.float() / 255.0), trained.features(images, 4), rtol=0, atol=0)
    assert probe_metrics(trained, probe, val, classes, **measure)["balanced_accuracy"] == \
        pytest.approx(best["balanced_accuracy"], abs=1e-6)

    # The MLflow run: the job's tag, the before and after, the exported teacher.
    client = MlflowClient(s["tracking_uri"])
    run = client.get_run(s["run_id"])
    assert run.data.tags["distillery.job"] == "teacher_pretrain" and run.info.status == "FINISHED"
    assert run.data.metrics["initial/balanced_accuracy"] == pytest.approx(untrained["balanced_accuracy"])
    assert run.data.metrics["best/balanced_accuracy"] == pytest.approx(best["balanced_accuracy"])
    assert {a.path for a in client.list_artifacts(s["run_id"], "export")} == {"export/teacher.pth",
                                                                             "export/teacher.json"}


def _ds_module_state(checkpoint: Path) -> dict:
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(checkpoint / DS_TAG / DS_MODEL_FILE, map_location="cpu", weights_only=True)["module"]


def test_a_run_resumes_from_its_checkpoint(pretrained):
    cfg, s = pretrained
    tmp = Path(cfg.output.local_dir)
    resumed = run_teacher_pretrain(tiny_config(tmp, "train.epochs=3", "output.name=resumed",
                                               f"output.resume_from={s['run_storage']}"))
    assert resumed["metrics"]["epoch"] == 2 and resumed["metrics"]["global_step"] == 24   # one more epoch of 8
    assert resumed["initial_metrics"] == s["initial_metrics"]   # carried over, not measured again
    record = read_record(resumed["last_checkpoint"], SPEC)
    assert record.epoch == 2 and record.global_step == 24
    # The best so far came along: the resumed run's is the better of both runs' epochs.
    best = max(s["best_metrics"]["balanced_accuracy"], resumed["metrics"]["balanced_accuracy"])
    assert resumed["metrics"]["best_balanced_accuracy"] == pytest.approx(best)
