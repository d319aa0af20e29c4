"""The MoE-tuning job on Ray Train + DeepSpeed (gloo, 2 CPU workers, ep_size=2): dense base trained in the
job, step-0 equivalence through DeepSpeed's expert-parallel layer, expert shards in checkpoints, resume
with identical outputs, MLflow contents (metrics, analysis figures), base-model loading and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from distillery.platform.io import storage
from distillery.platform.config.sections import ConfigError, load_config
from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.moe.base_model import load_base_state
from distillery.platform.moe.driver import run_moe_tune
from distillery.platform.engine.checkpoints import find_latest_checkpoint
from distillery.platform.moe.spec import MODEL_FILE, PROBE_FILE
from distillery.platform.moe.model_files import load_tuned_model, save_tuned_model

REPO = Path(__file__).resolve().parent.parent
# Enough dense steps, at batch 4 per worker, for the tiny detector to learn the synthetic shapes.
LEARNING_OVERRIDES = ("base.dense_steps=80", "base.warmup_steps=5", "train.batch_size=4")


def tiny_config(tmp_path, synthetic_data, *overrides) -> MoETuneConfig:
    return load_config(MoETuneConfig, REPO / "configs" / "moe_tune_tiny.yaml", [
        f"data.root={synthetic_data}", f"output.storage_path={tmp_path / 'train'}",
        f"output.local_dir={tmp_path / 'local'}", f"text.cache_dir={tmp_path / 'phrases'}", "output.name=run",
        *overrides])


def last_state(run_path: str) -> tuple[dict, Path]:
    ckpt = Path(find_latest_checkpoint(run_path))
    return json.loads((ckpt / "distillery_state.json").read_text()), ckpt


def val_metrics(model: torch.nn.Module, cfg: MoETuneConfig) -> dict[str, float]:
    """COCO metrics on the val split of a detector, scored in this process, on one rank, by the
    job's own eval code."""
    from distillery.platform.engine.worker import evaluate_on_ranks

    val_annotations, val_images = cfg.data.split_paths("val")
    return evaluate_on_ranks(model, val_annotations, val_images, cfg.model.input_size, cfg.train.eval_batch_size,
                             rank=0, world=1, device=torch.device("cpu"))


def val_ap(model_file: Path, cfg: MoETuneConfig) -> float:
    return val_metrics(load_tuned_model(model_file), cfg)["AP"]


def untrained_detector(dense_file: Path, cfg: MoETuneConfig) -> torch.nn.Module:
    """The dense detector as rank 0 builds it before its first step (the job seeds every rank with
    train.seed + rank; DeepSpeed broadcasts rank 0's weights): same vocabulary, same architecture."""
    import random

    import numpy as np

    from distillery.platform.moe.model_files import build_detector

    trained = load_tuned_model(dense_file)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return build_detector(cfg.model.name, list(trained.phrases), trained.text_embeddings.detach().clone(),
                          cfg.model.input_size, trained.build_options()).eval()


# The dense phase: 40 epochs of 2 steps, a checkpoint every 20 epochs (after steps 40 and 80).
DENSE_KILL_STEP = 45


@pytest.fixture(scope="module")
def tuned(ray_local, synthetic_data, tmp_path_factory):
    """An 80-step dense phase (the embedded default's path, long enough to learn: see
    test_the_job_learns), then 2 epochs of MoE-tuning with expert parallelism. Worker 0 is killed at
    dense step 45, so Ray Train restarts the workers from the dense phase's step-40 checkpoint;
    worker 1 at the first step of MoE epoch 1, so they restart from the MoE epoch-0 checkpoint."""
    tmp = tmp_path_factory.mktemp("moe_tune")
    kills = f"debug.kill=[{{rank: 1, step: 3}}, {{rank: 0, step: {DENSE_KILL_STEP}, phase: dense}}]"
    return run_moe_tune(tiny_config(tmp, synthetic_data, *LEARNING_OVERRIDES, "base.checkpoint_every=20", kills,
                                    "train.max_failures=2")), tmp


def test_the_job_learns(tuned, synthetic_data):
    """The tuned model (dense phase + MoE-tuning) against the untrained dense detector, both scored
    on the val split (8 images the job never trained on)."""
    summary, tmp = tuned
    cfg = tiny_config(tmp, synthetic_data, *LEARNING_OVERRIDES)
    _, ckpt = last_state(summary["run_storage"])
    trained = val_metrics(load_tuned_model(ckpt / MODEL_FILE), cfg)
    untrained = val_metrics(untrained_detector(Path(summary["run_storage"]) / "dense_base" / MODEL_FILE, cfg), cfg)
    print(f"MoE val AP50 untrained {untrained['AP50']:.4f} AP {untrained['AP']:.4f}; "
          f"tuned AP50 {trained['AP50']:.4f} AP {trained['AP']:.4f}")
    # Measured (2-core CPU, repeated runs give the same numbers): untrained AP50 0.003; tuned after
    # 40 dense steps 0.0002 (boxes not yet formed), 60 steps 0.13, 80 steps (this run) 0.25. The
    # margin is 10x the untrained level and an eighth of the tuned one.
    assert trained["AP50"] > untrained["AP50"] + 0.03, (trained, untrained)


def test_expert_parallel_run_starts_from_the_dense_model_and_trains(tuned, synthetic_data):
    summary, tmp = tuned
    state, ckpt = last_state(summary["run_storage"])
    assert state["epoch"] == 1 and state["global_step"] == 4
    # Step 0: the whole detector through DeepSpeed's MoE layers (4 experts per rank, all-to-all
    # over 2 ranks) gives the dense detector's outputs.
    assert state["step0"]["max_abs_diff"] < 1e-5 and len(state["step0"]["per_rank"]) == 2
    # The APs the job reports are those of the models it saved: the dense base and, after
    # MoE-tuning, the consolidated model (every rank scored its val shard with the same model).
    cfg = tiny_config(tmp, synthetic_data)
    assert val_ap(Path(summary["run_storage"]) / "dense_base" / MODEL_FILE, cfg) == pytest.approx(
        state["base_metrics"]["AP"], rel=1e-3, abs=1e-6)
    assert val_ap(ckpt / MODEL_FILE, cfg) == pytest.approx(state["metrics"]["AP"], rel=1e-3, abs=1e-6)
    # Data parallel outside the experts: every rank holds the same non-expert weights and computes
    # the same outputs.
    ranks = state["ranks"]
    for key in ("weights_checksum", "buffers_checksum"):   # non-expert weights; buffers
        assert len(ranks[key]) == 2 and ranks[key][0] == ranks[key][1], (key, ranks[key])
    assert ranks["probe_checksum"][0] == pytest.approx(ranks["probe_checksum"][1], rel=1e-6)
    # Expert shards: each rank saved its own 4 experts of each layer, and its optimizer states.
    ds = ckpt / "ds"
    experts = sorted(p.name for p in ds.glob("layer_*_expert_*_model_states.pt"))
    assert experts == sorted(f"layer_{l}_expert_{e}_mp_rank_00_model_states.pt" for l in range(2) for e in range(8))
    assert {p.name for p in ds.glob("expp_rank_*_optim_states.pt")} == {
        "expp_rank_0_mp_rank_00_optim_states.pt", "expp_rank_1_mp_rank_00_optim_states.pt"}

    # The consolidated plain model (all ranks' experts gathered) is the expert-parallel model.
    model = load_tuned_model(ckpt / MODEL_FILE)
    probe = torch.load(ckpt / PROBE_FILE, weights_only=True)
    with torch.no_grad():
        out = model(probe["images"])
    for key in ("pred_logits", "pred_boxes"):
        assert (out[key] - probe[key]).abs().max().item() < 1e-5, key

    # The dense base the job trained first is in the run storage; training moved the experts
    # away from their copies of it.
    dense = load_tuned_model(Path(summary["run_storage"]) / "dense_base" / MODEL_FILE)
    assert not any(".w1" in k for k in dense.state_dict())
    from distillery.students.open_vocab import moe_tune_decoder

    moe_tune_decoder(dense, 4, 2)
    start, now = dense.decoder.layers[0].linear1, model.decoder.layers[0].linear1
    assert not torch.allclose(start.w1, now.w1) and now.router.piece_weight.abs().sum() > 0


def test_mlflow_run_has_metrics_and_expert_analysis(tuned):
    summary, tmp = tuned
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.data.params["moe.ep_size"] == "2" and run.data.params["moe.granularity"] == "2"
    assert run.data.tags["distillery.job"] == "moe_tune"
    for key in ("epoch/AP", "train/loss", "train/loss_detection", "train/loss_aux", "train/lr", "dense/loss", "base/AP",
                "moe/step0_max_abs_diff", "analysis/layer0/load_cv", "analysis/deep_mean_stable_partners",
                "best/AP"):
        assert key in run.data.metrics, key
    names = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert names == {f"analysis/{n}" for n in ("expert_load.png", "coactivation_layer0.png",
                                               "coactivation_layer1.png", "stable_partners.png",
                                               "expert_analysis.json")}
    local = Path(client.download_artifacts(run.info.run_id, "analysis", str(tmp / "artifacts")))
    for png in local.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    analysis = json.loads((local / "expert_analysis.json").read_text())
    for name, layer in analysis["layers"].items():
        # 8 val images x 30 queries, each routed to k=2 of 8 experts.
        assert layer["tokens"] == 240 and sum(layer["load"]) == 480, name
        assert [row[i] for i, row in enumerate(layer["coactivation"])] == layer["load"]
    assert analysis["shallow_layers"] == ["decoder.layers.0.linear1"]
    assert analysis["deep_layers"] == ["decoder.layers.1.linear1"]
    exported = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/weights.safetensors", "export/meta.json"} <= exported


def test_worker_failures_restore_each_phase_where_it_stopped(tuned):
    summary, _ = tuned
    for marker in ("fault_injected", "fault_injected_dense"):   # both workers really died
        assert storage.exists(storage.join(summary["run_storage"], marker)), marker
    state, _ = last_state(summary["run_storage"])
    assert state["phase"] == "train" and state["phase_index"] == 1
    assert state["epoch"] == 1 and state["global_step"] == 4   # epoch 0 restored, epoch 1 redone
    # Each restore recomputed the outputs recorded with its checkpoint, on both ranks, exactly: in
    # the MoE phase each rank reloaded its own expert shards (and the shared states).
    checks = state["restore_checks"]
    assert [(c["phase"], c["epoch"]) for c in checks] == [("dense", 19), ("train", 0)], checks
    assert all(len(c["per_rank"]) == 2 and c["max_abs_diff"] <= 1e-6 for c in checks), checks
    assert state["step0"]["max_abs_diff"] < 1e-5   # carried over by the checkpoint
    client = MlflowClient(summary["tracking_uri"])
    assert client.get_run(summary["run_id"]).data.metrics["restore/max_abs_diff"] <= 1e-6
    # The dense phase went on from its step-40 checkpoint, not from scratch: steps 41-45 ran twice
    # and gave the same losses (the resumed run draws what the first one drew), the others once.
    history: dict[int, list[float]] = {}
    for m in client.get_metric_history(summary["run_id"], "dense/loss"):
        history.setdefault(m.step, []).append(m.value)
    assert sorted(history) == list(range(1, 81))
    twice = {step for step, values in history.items() if len(values) == 2}
    assert twice == set(range(41, DENSE_KILL_STEP + 1)) and all(len(v) <= 2 for v in history.values()), history
    for step in twice:
        assert history[step][0] == pytest.approx(history[step][1], rel=1e-6), (step, history[step])


def test_base_checkpoint_sources(tuned, tmp_path):
    summary, _ = tuned
    dense_file = Path(summary["run_storage"]) / "dense_base" / MODEL_FILE
    dense = load_tuned_model(dense_file)
    expected = dense.state_dict()

    state, _ = load_base_state(str(dense_file))
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    torch.save({"model": {f"module.{k}": v for k, v in expected.items()}}, tmp_path / "dense.pt")
    state, _ = load_base_state(str(tmp_path / "dense.pt"))
    assert set(state) == set(expected)

    # From the registry: models:/<name>@<alias> -> the version's run -> export/weights.safetensors.
    client = MlflowClient(summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    exp = client.get_experiment_by_name(summary["experiment"]).experiment_id
    run = client.create_run(exp, run_name="dense-base")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "weights.safetensors").write_bytes(dense_file.read_bytes())
    client.log_artifact(run.info.run_id, str(tmp_path / "export" / "weights.safetensors"), "export")
    client.create_registered_model("ov-dense")
    version = client.create_model_version("ov-dense", f"runs:/{run.info.run_id}/export", run_id=run.info.run_id)
    client.set_registered_model_alias("ov-dense", "base", version.version)
    state, source = load_base_state("models:/ov-dense@base", tracking_uri=summary["tracking_uri"],
                                    local_dir=str(tmp_path))
    assert set(state) == set(expected) and "version 1" in source
    with pytest.raises(FileNotFoundError, match="not found in the registry"):
        load_base_state("models:/ov-dense@nope", tracking_uri=summary["tracking_uri"], local_dir=str(tmp_path))

    # A distillation-job checkpoint (closed-set RT-DETRv4): its EMA weights, the parts that fit.
    from distillery.platform.moe.base_model import load_into
    from distillery.students import build_student

    student = build_student("rtdetrv4_tiny", num_classes=6, teacher_dim=32, eval_spatial_size=128)
    (tmp_path / "distill_ckpt").mkdir()
    torch.save({"ema": {"module": student.state_dict(), "updates": 10}, "epoch": 3},
               tmp_path / "distill_ckpt" / "distillery_state.pt")
    state, source = load_base_state(str(tmp_path / "distill_ckpt"))
    assert "EMA" in source
    with pytest.raises(ValueError, match="set base.strict=false"):
        load_into(dense, state, strict=True, source=source)
    report = load_into(dense, state, strict=False, source=source)
    assert any(k.startswith("dsi.") for k in report["unexpected"])
    assert any("dec_score_head" in k for k in report["missing"])   # the region-text heads stay as they were
    assert torch.equal(dense.state_dict()["backbone.body.stem.stem1.conv.weight"],
                       student.state_dict()["backbone.body.stem.stem1.conv.weight"])

    # A checkpoint directory of the job itself holds an MoE model: refused as a dense base.
    with pytest.raises(ValueError, match="already an MoE model"):
        load_base_state(summary["last_checkpoint"])


def test_bad_inputs_fail_before_any_worker(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match="moe.granularity \\(3\\) must divide the decoder FFN width 128"):
        tiny_config(tmp_path, synthetic_data, "moe.granularity=3")
    with pytest.raises(ConfigError, match="moe.ep_size \\(3\\) must divide the number of experts"):
        tiny_config(tmp_path, synthetic_data, "moe.ep_size=3")
    with pytest.raises(ConfigError, match="model.overrides: unknown key"):
        tiny_config(tmp_path, synthetic_data, "model.overrides={num_classes: 3}")
    with pytest.raises(ConfigError, match="no dense model to tune"):
        tiny_config(tmp_path, synthetic_data, "base.dense_steps=0")
    with pytest.raises(FileNotFoundError, match="base.checkpoint .*nope.safetensors does not exist"):
        run_moe_tune(tiny_config(tmp_path, synthetic_data, f"base.checkpoint={tmp_path / 'nope.safetensors'}"))
    # A checkpoint of another architecture is refused (strict), naming what does not fit.
    from distillery.students.open_vocab import build_open_vocab

    other = build_open_vocab("rtdetrv4_tiny", ["a", "b"], phrase_embeddings=torch.randn(2, 32),
                             eval_spatial_size=128, num_decoder_layers=3)
    save_tuned_model(other, tmp_path / "other.safetensors", {"name": "rtdetrv4_tiny", "moe": None,
                                                             "build_options": {}, "input_size": 128})
    with pytest.raises(ValueError, match="does not fit the model .*unexpected \\['decoder.dec_bbox_head.2"):
        run_moe_tune(tiny_config(tmp_path, synthetic_data, f"base.checkpoint={tmp_path / 'other.safetensors'}"))
    assert not (tmp_path / "train" / "run").exists()   # nothing was started
    assert storage.exists(str(tmp_path / "phrases"))     # the vocabulary was embedded once, on the driver
