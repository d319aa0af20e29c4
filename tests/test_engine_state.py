"""The engine's typed boundaries, without Ray: the run description through ``train_loop_config``,
the checkpoint record and engine state as written and read back (and as older runs wrote them),
the teacher signal chosen from ``teacher_mode``, the step's extension point for a job's own
loss (the MoE load-balancing loss), and the per-epoch seeds that make runs reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distillery.platform.config.distill import DistillConfig
from distillery.platform.config.sections import load_config
from distillery.platform.distill.teacher_signal import CachedTeacher, NoTeacher, OnlineTeacher, teacher_signal
from distillery.platform.distill.spec import SPEC as DISTILL, DistillRecord, DistillRun, GamSettings
from distillery.platform.engine.checkpoints import (ENGINE_STATE, STATE_JSON, CheckpointError, CheckpointRecord,
                                                    EngineState, best_checkpoint, load_engine_state, read_record,
                                                    save_checkpoint_files)
from distillery.platform.engine.run_spec import from_worker_config, worker_config
from distillery.platform.moe.spec import SPEC as MOE_TUNE, MoETuneRecord, MoETuneRun
from distillery.students.moe import MoEFFN, collect_aux_loss
from distillery.students.training import compute_losses


def test_run_description_crosses_train_loop_config_typed():
    cfg = load_config(DistillConfig, None, [])
    run = DistillRun(num_classes=3, categories={"category_ids": [1, 2, 5], "names": ["a", "b", "c"]},
                     gam=GamSettings(0.5, 0.3, 0.05, 1.0, 10, "paper", True), teacher_dim=32, teacher_dtype="float32",
                     steps_per_epoch=4, val_annotations="/v.json", val_images="/v", run_storage="/runs/x",
                     run_id="abc", tracking_uri="sqlite:///m.db")
    config = json.loads(json.dumps(worker_config(DISTILL, cfg, run)))   # what Ray Train carries: plain JSON
    cfg_back, run_back = from_worker_config(config, DISTILL)
    assert run_back == run and isinstance(run_back.gam, GamSettings) and cfg_back == cfg
    assert config["job"] == DISTILL.job   # the worker loads its job class from this path
    moe = MoETuneRun(phrases=["a"], text_embeddings=[[0.0, 1.0]], category_ids=[1], build_options={},
                     parameter_counts={"dense": {"total": 1}}, steps_per_epoch=1, val_annotations="a",
                     val_images="b", run_storage="c")
    assert MOE_TUNE.run_class.from_dict(json.loads(json.dumps(moe.to_dict()))) == moe
    with pytest.raises(TypeError, match="MoETuneRun"):   # a run description of another job
        worker_config(DISTILL, cfg, moe)


def test_the_best_checkpoint_is_the_first_of_the_highest_finite_ap():
    """One rule for the job's summary (Ray's best_checkpoints, equal APs in report order), the
    registry (which logs that checkpoint) and predict --model <run dir>."""
    assert best_checkpoint([("a", {"AP": 0.2}), ("b", {"AP": 0.3}), ("c", {"AP": 0.3}), ("d", {"AP": 0.1})]) == "b"
    assert best_checkpoint([("a", {"AP": float("nan")}), ("b", {"AP": 0.0}), ("c", {})]) == "b"
    assert best_checkpoint([("a", {"AP": float("nan")}), ("b", None), ("c", {"AP": True}), ("d", {"AP": "1"})]) is None
    assert best_checkpoint([]) is None


def test_checkpoint_files_round_trip_typed(tmp_path):
    state = EngineState(epoch=2, global_step=12, components={"ema": {"module": {"w": torch.ones(2)}, "updates": 12},
                                                             "gam": {"lambda": torch.tensor(0.5)}})
    record = DistillRecord(epoch=2, global_step=12, metrics={"AP": 0.1}, ranks={"weights_checksum": [1.0, 1.0]},
                           gam_history=[{"epoch": 0}])
    save_checkpoint_files(tmp_path, 0, state, record, DISTILL.name)
    save_checkpoint_files(tmp_path, 1, state, record, DISTILL.name)   # rank 1 writes its RNG states only
    loaded, rng = load_engine_state(tmp_path, rank=1)
    assert loaded.epoch == 2 and loaded.global_step == 12 and set(loaded.components) == {"ema", "gam"}
    assert torch.equal(loaded.components["ema"]["module"]["w"], torch.ones(2)) and "torch" in rng
    # Named components sit at the file's top level: what student.weights and predict read ("ema" -> "module").
    raw = torch.load(tmp_path / ENGINE_STATE, weights_only=True)
    assert sorted(raw) == ["ema", "epoch", "gam", "global_step"]
    assert read_record(tmp_path, DISTILL) == record
    assert json.loads((tmp_path / STATE_JSON).read_text())["kind"] == DISTILL.name
    assert type(read_record(tmp_path)) is CheckpointRecord and read_record(tmp_path).epoch == 2   # the engine's view
    # A checkpoint of another job is refused by name, not read as this job's.
    with pytest.raises(CheckpointError, match=f"written by the {DISTILL.name} job, not by {MOE_TUNE.name}"):
        read_record(tmp_path, MOE_TUNE)
    with pytest.raises(ValueError, match="may not be named"):
        EngineState(0, 0, {"epoch": {}}).to_file()


def test_records_written_before_kinds_are_read_as_the_resuming_jobs(tmp_path):
    (tmp_path / STATE_JSON).write_text(json.dumps({"epoch": 1, "global_step": 4, "metrics": {}, "ranks": {},
                                                   "step0": {"max_abs_diff": 0.0}, "restore_checks": [],
                                                   "moe_layers": ["l"], "parameter_counts": {}}))
    record = read_record(tmp_path, MOE_TUNE)
    assert isinstance(record, MoETuneRecord) and record.step0 == {"max_abs_diff": 0.0}
    (tmp_path / STATE_JSON).write_text(json.dumps({"epoch": 1, "global_step": 4, "metrics": {}, "ranks": {},
                                                   "lambda": 0.3, "gam_history": [{"epoch": 0}]}))
    assert read_record(tmp_path, DISTILL).gam_history == [{"epoch": 0}]
    # An engine state of the old layouts (no EMA, no GAM; or "gam": None) reads as one.
    torch.save({"epoch": 1, "global_step": 4}, tmp_path / ENGINE_STATE)
    assert load_engine_state(tmp_path, rank=0)[0] == EngineState(1, 4)
    torch.save({"epoch": 1, "global_step": 4, "ema": {"updates": 3}, "gam": None}, tmp_path / ENGINE_STATE)
    assert load_engine_state(tmp_path, rank=0)[0] == EngineState(1, 4, {"ema": {"updates": 3}})


@pytest.mark.parametrize("mode, kind, teacher, cache", [("none", NoTeacher, False, False),
                                                        ("cached", CachedTeacher, True, True),
                                                        ("online", OnlineTeacher, True, False)])
def test_teacher_signal_is_chosen_once_from_the_mode(mode, kind, teacher, cache):
    signal = teacher_signal(load_config(DistillConfig, None, [f"teacher_mode={mode}"]))
    assert type(signal) is kind and signal.mode == mode
    assert (signal.needs_teacher, signal.needs_cache) == (teacher, cache)


class _MoEModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = MoEFFN(8, 4, copies=2, granularity=2, aux_loss_weight=0.5)

    def forward(self, images, targets=None):
        return {"out": self.ffn(images)}


def test_the_step_adds_a_jobs_own_loss():
    torch.manual_seed(0)
    model = _MoEModel()
    images = torch.randn(3, 5, 8)

    def criterion(outputs, targets):
        return {"loss_mse": outputs["out"].pow(2).mean()}

    plain = compute_losses(model, criterion, images, [])
    with_aux = compute_losses(model, criterion, images, [], aux_loss=collect_aux_loss)
    aux = model.ffn.aux_loss
    assert "loss_aux" not in plain.parts and aux is not None and aux.item() > 0
    assert torch.allclose(with_aux.parts["loss_aux"], aux.detach())
    assert with_aux.total.item() == pytest.approx(plain.total.item() + aux.item(), rel=1e-6)
    with_aux.total.backward()
    assert model.ffn.router.piece_weight.grad is not None   # the balancing loss reaches the router


def test_epoch_seeds_depend_on_seed_rank_and_epoch_alone():
    """What an epoch draws (torch, NumPy, Python; the augmenter's stream) is fixed by (seed, rank,
    epoch): not by what was drawn before, so a resumed run draws as an uninterrupted one; and no
    two of those triples, nor two streams, share a seed."""
    import random

    import numpy as np

    from distillery.platform.engine.worker import derived_seed, seed_epoch

    def draws() -> tuple:
        return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()

    seed_epoch(3, 1, 5)
    first = draws()
    torch.rand(100), np.random.rand(7), random.random()  # what ran before must not matter
    seed_epoch(3, 1, 5)
    assert draws() == first
    triples = [(s, r, e) for s in range(3) for r in range(4) for e in range(40)]
    seeds = {derived_seed(stream, *t) for stream in ("torch", "augment", "shuffle") for t in triples}
    assert len(seeds) == 3 * len(triples)
    assert all(0 <= x < 2 ** 32 for x in seeds)  # a valid NumPy / Ray Data local_shuffle_seed
    seed_epoch(3, 0, 5)
    assert draws() != first


def test_checkpoints_of_a_run_in_phases_order_by_phase_then_epoch(tmp_path):
    """The MoE job's dense phase (index 0) writes epochs 0-5, then its MoE phase (index 1) epoch 0:
    resume takes the MoE one, and a record written before phases reads as phase None, index 0."""
    from distillery.platform.engine.checkpoints import DS_MODEL_FILE, DS_TAG, find_latest_checkpoint

    def write(name: str, phase: str | None, index: int, epoch: int) -> None:
        directory = tmp_path / name
        (directory / DS_TAG).mkdir(parents=True)
        torch.save({}, directory / DS_TAG / DS_MODEL_FILE)
        record = MoETuneRecord(epoch=epoch, global_step=2 * (epoch + 1), phase=phase, phase_index=index)
        save_checkpoint_files(directory, 0, EngineState(epoch, 2 * (epoch + 1)), record, MOE_TUNE.name)

    write("checkpoint_a", "dense", 0, 5)
    write("checkpoint_b", "train", 1, 0)
    write("checkpoint_c", "dense", 0, 3)
    assert find_latest_checkpoint(str(tmp_path), MOE_TUNE).endswith("checkpoint_b")
    record = read_record(tmp_path / "checkpoint_b", MOE_TUNE)
    assert (record.phase, record.phase_index, record.order()) == ("train", 1, (1, 0))
    data = json.loads((tmp_path / "checkpoint_a" / STATE_JSON).read_text())
    for key in ("phase", "phase_index"):
        del data[key]
    (tmp_path / "checkpoint_a" / STATE_JSON).write_text(json.dumps(data))
    assert read_record(tmp_path / "checkpoint_a", MOE_TUNE).order() == (0, 5)
