"""The distillation job on Ray Train + DeepSpeed (gloo, 2 CPU workers): rank agreement, MLflow
contents, ZeRO-2 with S3 checkpoints and an injected worker failure, resume_from, reproducible
runs (stopped and resumed ones too), bad inputs."""

import json
import logging
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from distillery.platform.io import storage
from distillery.platform.config.sections import load_config
from distillery.platform.distill.driver import run_distill
from distillery.platform.engine.checkpoints import find_latest_checkpoint
from distillery.platform.config.distill import DistillConfig
from distillery.platform.cache.feature_cache import FingerprintMismatchError

REPO = Path(__file__).resolve().parent.parent


def tiny_config(tmp_path, synthetic_data, *overrides, cache=None):
    return load_config(DistillConfig, REPO / "configs" / "distill_tiny.yaml", [
        f"data.root={synthetic_data}", f"cache.uri={cache or tmp_path / 'cache'}",
        f"output.storage_path={tmp_path / 'train'}", f"output.local_dir={tmp_path / 'local'}",
        "output.name=run", *overrides])


def last_state(run_path: str) -> dict:
    return json.loads(storage.read_text(storage.join(find_latest_checkpoint(run_path), "distillery_state.json")))


@pytest.fixture(scope="module")
def two_worker_run(ray_local, synthetic_data, tiny_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    # Every step's losses logged: the reproducibility test compares them step by step.
    cfg = tiny_config(tmp, synthetic_data, "train.log_every=1", cache=tiny_cache)
    return cfg, run_distill(cfg), tmp


def checkpoint_ap(cfg, checkpoint: str) -> float:
    """COCO AP on the val split of a checkpoint's EMA weights (the exported model), scored in this
    process, on one rank, by the job's own eval code."""
    import torch

    from distillery.platform.serving.export import load_inference_model
    from distillery.platform.engine.worker import evaluate_on_ranks

    model = load_inference_model(cfg, 6, checkpoint)
    val_annotations, val_images = cfg.data.split_paths("val")
    return evaluate_on_ranks(model, val_annotations, val_images, cfg.student.input_size, cfg.train.eval_batch_size,
                             rank=0, world=1, device=torch.device("cpu"))["AP"]


def test_ranks_agree_and_gam_adapts(two_worker_run):
    cfg, summary, tmp = two_worker_run
    state = last_state(summary["run_storage"])
    assert state["epoch"] == cfg.train.epochs - 1
    ranks = state["ranks"]
    assert len(ranks["lambda"]) == 2 and ranks["lambda"][0] == ranks["lambda"][1]
    # Data parallel: weights, buffers (BatchNorm running statistics) and the EMA copy that is
    # evaluated and exported are the same on both ranks.
    for key in ("weights_checksum", "buffers_checksum", "ema_weights_checksum", "ema_buffers_checksum"):
        assert ranks[key][0] == ranks[key][1], (key, ranks[key])
    # GAM ran every epoch, on every rank alike, and moved lambda by its rule.
    from distillery.platform.distill.driver import resolve_gam
    from distillery.students.gam import gam_update

    g = resolve_gam(cfg)
    history = state["gam_history"]
    assert [h["epoch"] for h in history] == list(range(cfg.train.epochs))
    for h in history:
        assert 0 < h["ratio"] < 1
        assert h["lambda_after"] == pytest.approx(gam_update(h["lambda_before"], h["ratio"], g["rho"], g["delta"]))
    # The AP the job reports is the AP of the model it checkpointed (every rank scored its val
    # shard with the same EMA model, BatchNorm statistics included). This run's 12 steps leave AP
    # at chance level; that the job learns is tests/test_learning.py's run (AP above the untrained
    # student's on the same val split).
    reported = state["metrics"]["AP"]
    assert checkpoint_ap(cfg, find_latest_checkpoint(summary["run_storage"])) == pytest.approx(reported, rel=1e-3,
                                                                                               abs=1e-6)


def test_mlflow_run_contents(two_worker_run):
    cfg, summary, tmp = two_worker_run
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.data.params["student.name"] == "rtdetrv4_tiny"
    assert run.data.params["teacher_mode"] == "cached"
    assert "distillery.teacher_fingerprint" in run.data.tags and "distillery.cache_manifest_sha256" in run.data.tags
    for key in ("epoch/AP", "epoch/lambda", "epoch/aifi_ratio", "train/loss", "train/loss_detection",
                "train/loss_dsi"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "epoch/lambda")) == cfg.train.epochs
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots", "export"} <= names
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/model.onnx", "export/weights.safetensors", "export/meta.json"} <= exported
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/gam.png",
                                                                                "plots/augment_preview.png"}
    assert Path(summary["run_storage"], "plots", "augment_preview.png").stat().st_size > 1000
    # Artifacts live beside the sqlite store, not in ./mlruns of the directory the job started in.
    assert run.info.artifact_uri.startswith((tmp / "local" / "mlflow-artifacts").as_uri()), run.info.artifact_uri
    # The logged model is a runnable predictor: image in, boxes/scores/labels out.
    mlflow.set_tracking_uri(summary["tracking_uri"])
    model = mlflow.pyfunc.load_model(summary["model_uri"])
    import numpy as np

    out = model.predict(np.zeros((2, 96, 80, 3), dtype=np.uint8))
    assert out["boxes"].shape[:1] == (2,) and out["boxes"].shape[-1] == 4
    assert out["scores"].shape == out["labels"].shape == out["boxes"].shape[:2]
    assert set(np.unique(out["labels"])) <= {1, 3, 4, 7, 9, 12}
    names = dict(zip(cfg_categories(cfg)["category_ids"], cfg_categories(cfg)["names"]))
    assert [names[i] for i in out["labels"][0]] == out["names"][0].tolist()


def cfg_categories(cfg) -> dict:
    from distillery.platform.datasets.coco import load_coco

    ann, images = cfg.data.split_paths("train")
    return load_coco(ann, images, check_images="none").categories.to_dict()


def test_readme_model_load_snippet_runs(two_worker_run, tmp_path):
    """The README's day, steps 5 and after: `python jobs/promote.py --run-id <run>` and then the
    README's model-load block, each as written, in a fresh process, from a directory whose
    runs/mlflow.db is the store the job logged to."""
    import os
    import re
    import subprocess
    import sys

    cfg, summary, tmp = two_worker_run
    (tmp_path / "runs").symlink_to(tmp / "local")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    promote = subprocess.run([sys.executable, str(REPO / "jobs" / "promote.py"), "--run-id", summary["run_id"]],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert promote.returncode == 0, promote.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"<!-- model-load snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(f"'{name}'" in run.stdout for name in cfg_categories(cfg)["names"]), run.stdout
    assert not (tmp_path / "mlruns").exists()


def test_resume_from_continues_the_run(two_worker_run, synthetic_data, tiny_cache, caplog):
    """Resume a copy of the run whose newest checkpoint has a truncated DeepSpeed file: the driver
    skips it, naming the file, and the run continues from the intact one before it."""
    import logging
    import shutil

    cfg, summary, tmp = two_worker_run
    copy = tmp / "copy-with-corrupt-newest"
    shutil.copytree(summary["run_storage"], copy)
    newest = Path(find_latest_checkpoint(str(copy)))
    assert json.loads((newest / "distillery_state.json").read_text())["epoch"] == 1
    model_file = newest / "ds" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="distillery.platform.engine.checkpoints"):
        resumed = run_distill(tiny_config(tmp, synthetic_data, "train.epochs=3", "output.name=resumed",
                                          f"output.resume_from={copy}", "tracking.log_model=false",
                                          cache=tiny_cache))
    assert any(str(model_file) in r.getMessage() for r in caplog.records), caplog.text
    state = last_state(resumed["run_storage"])
    assert state["epoch"] == 2
    history = state["gam_history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # GAM state came back with the checkpoint
    assert history[2]["lambda_before"] == history[1]["lambda_after"]


def test_zero2_s3_checkpoints_and_worker_failure(ray_local, moto_s3, synthetic_data, tiny_cache, tmp_path):
    """ZeRO-2, S3 run storage and a killed worker, on the DEIMv2 recipe with AdaRoute (a frozen ViT
    with adapters whose expert centre is shared across layers): it trains, checkpoints and
    restores under DeepSpeed like the RT-DETRv4 student, with DSI + GAM from the same cache."""
    storage_path = f"s3://{moto_s3['bucket']}/distill"
    cfg = tiny_config(tmp_path, synthetic_data, "deepspeed.zero_stage=2", f"output.storage_path={storage_path}",
                      "debug.kill={rank: 1, step: 6}", "train.max_failures=1", "tracking.log_model=false",
                      "student.name=deimv2_tiny", "student.peft={method: adaroute, rank: 8}",
                      "augment.copyblend_prob=0.5", cache=tiny_cache)
    summary = run_distill(cfg)
    client = MlflowClient(summary["tracking_uri"])
    metrics = client.get_run(summary["run_id"]).data.metrics
    assert 0 < metrics["model/params_trainable"] < metrics["model/params_total"]
    run_path = summary["run_storage"]
    assert run_path.startswith("s3://")
    assert storage.exists(storage.join(run_path, "fault_injected"))  # the worker really was killed
    state = last_state(run_path)
    assert state["epoch"] == cfg.train.epochs - 1
    assert [h["epoch"] for h in state["gam_history"]] == [0, 1]  # epoch 0 restored, epoch 1 redone
    # Under ZeRO-2 each rank holds a slice of the gradients: the shares come from the sum of the
    # local slices over ranks, so they are still a partition of the whole gradient.
    shares = state["gam_history"][-1]["shares"]
    assert 0 < shares["aifi"] < 1 and abs(sum(shares.values()) - 1) < 1e-6
    assert state["ranks"]["lambda"][0] == state["ranks"]["lambda"][1]
    for key in ("weights_checksum", "buffers_checksum", "ema_weights_checksum", "ema_buffers_checksum"):
        assert state["ranks"][key][0] == state["ranks"][key][1], (key, state["ranks"][key])


def test_bad_inputs_fail_before_training(ray_local, synthetic_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from: run path .*nope does not exist"):
        run_distill(tiny_config(tmp_path, synthetic_data, f"output.resume_from={tmp_path / 'nope'}"))
    # A cache made by another teacher is refused with both fingerprints.
    run_cfg = tiny_config(tmp_path, synthetic_data, "teacher.seed=7", "train.epochs=1")
    from distillery.platform.cache.job import CacheFeaturesConfig, run_cache_job

    run_cache_job(load_config(CacheFeaturesConfig, None, [
        f"data.root={synthetic_data}", f"cache.uri={tmp_path / 'cache'}", "teacher.allow_random_init=true",
        "teacher.input_size=128",
        "teacher.model_kwargs={embed_dim: 32, depth: 1, num_heads: 2}", "cache.shard_size=8"]))
    with pytest.raises(FingerprintMismatchError, match="random-init:seed=7"):
        run_distill(run_cfg)
    assert not (tmp_path / "train" / "run").exists()  # nothing was started


# Timings differ from run to run (epoch/..., and best/... for the best epoch); nothing else a run
# logs may.
TIMING_METRICS = ("epoch_seconds", "images_per_second")


def metric_histories(tracking_uri: str, run_id: str) -> dict[str, dict[int, float]]:
    """Every metric a run logged to MLflow (per-step train/* losses, lr and lambda; per-epoch
    epoch/* AP, GAM, mean loss; best/*), as {name: {step: value}}, timings left out."""
    client = MlflowClient(tracking_uri)
    names = client.get_run(run_id).data.metrics
    return {name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
            for name in names if name.rpartition("/")[2] not in TIMING_METRICS}


def checkpoint_of_epoch(run_storage: str, epoch: int) -> Path:
    for state in Path(run_storage).glob("checkpoint_*/distillery_state.json"):
        if json.loads(state.read_text())["epoch"] == epoch:
            return state.parent
    raise AssertionError(f"{run_storage} has no checkpoint of epoch {epoch}")


def checkpoint_weights(directory: Path) -> dict:
    """A checkpoint's trained weights (DeepSpeed's module state) and EMA weights."""
    import torch

    from distillery.platform.engine.checkpoints import deepspeed_safe_globals

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        module = torch.load(directory / "ds" / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=True)["module"]
    ema = torch.load(directory / "distillery_state.pt", map_location="cpu", weights_only=True)["ema"]["module"]
    return {**{f"model.{k}": v for k, v in module.items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def assert_same_histories(a: dict, b: dict, expected_steps: list[int], epochs: list[int]) -> None:
    """``b``'s per-step losses at exactly ``expected_steps`` and its per-epoch metrics at exactly
    ``epochs`` equal ``a``'s, value for value."""
    assert sorted(b["train/loss"]) == expected_steps and sorted(b["epoch/AP"]) == epochs
    for name in sorted(a.keys() & b.keys()):
        if name.startswith(("train/", "epoch/")):
            assert {s: a[name][s] for s in b[name]} == b[name], name


def test_runs_are_reproducible_and_resume_equals_uninterrupted(two_worker_run, synthetic_data, tiny_cache):
    """Same config, same seed: the same run, and a run stopped and resumed is the run that never
    stopped. A second run of two_worker_run's config (2 workers), killed in its second epoch
    (``train.max_failures=0``: the run fails), logs the same per-step losses, learning rates and
    lambdas and the same first-epoch AP and GAM record, and its first checkpoint holds bitwise the
    same weights and EMA weights; resumed from that checkpoint with ``output.resume_from``, it
    logs the second epoch's steps and metrics alike and ends with bitwise the final weights of
    the run that never stopped. (RNGs are seeded per (seed, rank, epoch), the ingest hands every
    rank the same rows in the same order, and the checkpoint brings back the optimizer, LR
    schedule, EMA and GAM.)"""
    import ray.train

    cfg, summary, tmp = two_worker_run
    steps = 24 // (cfg.train.batch_size * cfg.train.num_workers)  # per epoch (24 train images)
    reference = metric_histories(summary["tracking_uri"], summary["run_id"])
    assert sorted(reference["train/loss"]) == list(range(1, cfg.train.epochs * steps + 1))

    stopped = tiny_config(tmp, synthetic_data, "train.log_every=1", "output.name=stopped",
                          "tracking.log_model=false", "train.max_failures=0",
                          f"debug.kill={{rank: 1, step: {steps + 1}}}", cache=tiny_cache)
    with pytest.raises(ray.train.TrainingFailedError):
        run_distill(stopped)
    stopped_storage = str(tmp / "train" / "stopped")
    assert json.loads(Path(find_latest_checkpoint(stopped_storage), "distillery_state.json").read_text())["epoch"] == 0
    client = MlflowClient(summary["tracking_uri"])
    [stopped_run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                       filter_string="attributes.run_name = 'stopped'")
    assert stopped_run.info.status == "FAILED"
    first_epoch = metric_histories(summary["tracking_uri"], stopped_run.info.run_id)
    first_epoch["train/loss"] = {s: v for s, v in first_epoch["train/loss"].items() if s <= steps}
    assert_same_histories(reference, first_epoch, list(range(1, steps + 1)), [0])
    assert_same_weights(checkpoint_weights(checkpoint_of_epoch(summary["run_storage"], 0)),
                        checkpoint_weights(checkpoint_of_epoch(stopped_storage, 0)))

    resumed = run_distill(tiny_config(tmp, synthetic_data, "train.log_every=1", "output.name=resumed-stopped",
                                      "tracking.log_model=false", f"output.resume_from={stopped_storage}",
                                      cache=tiny_cache))
    assert_same_histories(reference, metric_histories(resumed["tracking_uri"], resumed["run_id"]),
                          list(range(steps + 1, 2 * steps + 1)), [1])
    assert_same_weights(checkpoint_weights(checkpoint_of_epoch(summary["run_storage"], 1)),
                        checkpoint_weights(checkpoint_of_epoch(resumed["run_storage"], 1)))


def test_fixed_dsi_weight_through_the_job_config(caplog):
    """``gam.enabled=false`` is the job's fixed lambda: the controller the job builds keeps
    ``gam.lambda0`` every epoch; a weight of 0 with a teacher is said out loud, without one it is not."""
    from distillery.platform.distill.driver import resolve_gam
    from distillery.students.gam import GAMController

    recipe = REPO / "configs" / "distill_tiny.yaml"
    g = resolve_gam(load_config(DistillConfig, recipe, ["gam.enabled=false", "gam.lambda0=5"]))
    assert (g["enabled"], g["lambda0"]) == (False, 5.0)
    gam = GAMController(**g)
    assert [gam.end_epoch(e) for e in range(3)] == [5.0, 5.0, 5.0]
    with caplog.at_level(logging.WARNING, logger="distillery.platform.distill.driver"):
        resolve_gam(load_config(DistillConfig, recipe, ["gam.enabled=false", "gam.lambda0=0"]))
        assert "NOT being distilled" in caplog.text
        caplog.clear()
        resolve_gam(load_config(DistillConfig, recipe, ["gam.enabled=false", "gam.lambda0=0", "teacher_mode=none"]))
        assert "NOT being distilled" not in caplog.text
