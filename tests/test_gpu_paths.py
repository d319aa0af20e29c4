"""Code paths that only run on a GPU node, tested where they can be.

Tests marked ``gpu`` need a CUDA device and skip on CPU with the reason (``pytest -m gpu`` runs
them; ``benchmarks/gpu_suite.py`` runs them first when a GPU is there): bf16 autocast
forward/backward of a tiny student, SyncBatchNorm under an NCCL process group, an NCCL
all-reduce through the training loop's own helpers, and GPU actor placement in the cache job.
Their CPU analogues run everywhere: the gloo backend keeps BatchNorm, the NCCL conversion keeps
every parameter and buffer, and bf16 autocast works on CPU too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distillery.platform.engine.batchnorm import batchnorm_for_backend
from distillery.students import build_criterion, build_student
from distillery.students.training import compute_losses

REPO = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def tiny_student(**kw) -> nn.Module:
    torch.manual_seed(0)
    return build_student("rtdetrv4_tiny", num_classes=3, num_queries=12, num_decoder_layers=2, teacher_dim=16,
                         eval_spatial_size=64, **kw)


def batch(device: torch.device, b: int = 1, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    targets = [{"labels": torch.randint(0, 3, (3,), generator=g).to(device),
                "boxes": (torch.rand(3, 4, generator=g) * 0.3 + 0.3).to(device)} for _ in range(b)]
    return {"images": torch.rand(b, 3, size, size, generator=g).to(device), "targets": targets,
            "teacher_grid": torch.randn(b, 16, size // 32, size // 32, generator=g).to(device)}


def bf16_step(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward/backward under bf16 autocast; returns the loss and the parameters' gradients."""
    data = batch(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        result = compute_losses(model.train(), build_criterion(num_classes=3), data["images"], data["targets"],
                                teacher_grid=data["teacher_grid"], dsi_weight=1.0)
    result.total.backward()
    return result.total, [p.grad for p in model.parameters() if p.requires_grad]


def batchnorms(model: nn.Module) -> tuple[int, int]:
    sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    plain = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                for m in model.modules())
    return plain, sync


# --------------------------------------------------------------------------- CPU analogues

def test_gloo_keeps_batchnorm():
    model = tiny_student()
    plain, sync = batchnorms(model)
    assert plain > 0 and sync == 0
    assert batchnorm_for_backend(model, "gloo") is model
    assert batchnorms(model) == (plain, 0)


def test_nccl_conversion_keeps_parameters_and_buffers():
    """Under NCCL every BatchNorm becomes a SyncBatchNorm with the same names and values, so a
    checkpoint loads into either form (the conversion itself needs no process group)."""
    model = tiny_student()
    plain, _ = batchnorms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = batchnorm_for_backend(model, "nccl")
    assert batchnorms(converted) == (0, plain)
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # eval on CPU (export, prediction) works with SyncBatchNorm modules
        out = converted.eval()(x)["pred_logits"]
        ref = tiny_student().eval()(x)["pred_logits"]
    assert torch.allclose(out, ref, atol=1e-5)


def test_bf16_autocast_step_on_cpu():
    loss, grads = bf16_step(tiny_student(), torch.device("cpu"))
    assert torch.isfinite(loss)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------- GPU only

@pytest.fixture()
def nccl_group(tmp_path):
    """A one-rank NCCL process group in this process (what Ray Train sets up on a GPU worker)."""
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_step_on_cuda():
    device = torch.device("cuda")
    loss, grads = bf16_step(tiny_student().to(device), device)
    assert torch.isfinite(loss)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@needs_cuda
def test_syncbatchnorm_under_nccl(nccl_group):
    """A converted student trains under NCCL (bf16), and with one rank its batch statistics equal
    plain BatchNorm's."""
    device = torch.device("cuda")
    sync_model = batchnorm_for_backend(tiny_student(), "nccl").to(device)
    plain_model = tiny_student().to(device)
    assert batchnorms(sync_model)[1] > 0
    loss, grads = bf16_step(sync_model, device)
    ref_loss, _ = bf16_step(plain_model, device)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.allclose(loss.float(), ref_loss.float(), rtol=1e-2)
    sync_bn = next(m for m in sync_model.modules() if isinstance(m, nn.SyncBatchNorm))
    assert int(sync_bn.num_batches_tracked) == 1


@pytest.mark.gpu
@needs_cuda
def test_nccl_all_reduce_through_the_training_helpers(nccl_group):
    from distillery.platform.engine.worker import all_ranks, sum_across_ranks

    device = torch.device("cuda")
    t = sum_across_ranks(torch.tensor([1.5, 2.0], device=device))
    assert t.device.type == "cuda" and t.tolist() == [1.5, 2.0]
    assert all_ranks(True, device) is True and all_ranks(False, device) is False


@pytest.mark.gpu
@needs_cuda
def test_cache_job_places_the_teacher_actor_on_the_gpu(synthetic_data, tmp_path):
    """On a cluster with a GPU, the cache job's teacher actors ask Ray for one GPU each (and so
    see the device), and the teacher runs in bf16."""
    import ray
    from ray.util.state import list_actors

    from distillery.platform.cache.job import CacheFeaturesConfig, CacheSettings, run_cache_job
    from distillery.platform.config.sections import load_config
    from distillery.platform.config.distill import DistillConfig

    cfg = load_config(DistillConfig, REPO / "configs" / "distill_tiny.yaml", [f"data.root={synthetic_data}"])
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        summary = run_cache_job(CacheFeaturesConfig(
            data=cfg.data, teacher=cfg.teacher, ray=cfg.ray, storage=cfg.storage,
            cache=CacheSettings(uri=str(tmp_path / "cache"), dtype=cfg.cache.dtype,
                                shard_size=cfg.cache.shard_size, splits=["train"])))
        actors = [a for a in list_actors(detail=True, limit=1000) if "TeacherActor" in str(a.class_name)
                  or "MapWorker" in str(a.class_name)]
    finally:
        ray.shutdown()
    assert actors, "no teacher actor in Ray's actor list"
    assert any(float((a.required_resources or {}).get("GPU", 0)) >= 1 for a in actors), \
        json.dumps([{"class": a.class_name, "resources": a.required_resources} for a in actors])
    manifest = json.loads((tmp_path / "cache" / "train" / "manifest.json").read_text())
    assert "bfloat16" in json.dumps(manifest) or "bfloat16" in json.dumps(summary, default=str)
