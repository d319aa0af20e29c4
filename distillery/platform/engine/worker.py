"""What every Ray Train worker of the engine shares: its start (threads, seeds, S3), the DeepSpeed
engine over the process group Ray Train set up (gloo on CPU, NCCL on GPU), the collectives that
keep ranks in lockstep, GAM's view of ZeRO gradients, evaluation and the injected fault.

The loop itself is :class:`distillery.platform.engine.trainer.Trainer`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
from typing import Any, Callable, Iterator

import deepspeed
import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from distillery.evaluation.coco_eval import coco_evaluate
from distillery.evaluation.loop import predict_coco_detections
from distillery.platform.datasets.coco import load_coco, load_image_resized
from distillery.platform.engine.batchnorm import batchnorm_for_backend
from distillery.platform.engine.checkpoints import FAULT_MARKER, safe_checkpoint_engine
from distillery.platform.io import storage

__all__ = ["all_ranks", "build_deepspeed_config", "deepspeed_engine", "derived_seed", "evaluate_on_ranks",
           "gather_floats", "init_deepspeed_comm", "inject_fault", "lockstep", "seed_epoch", "setup_worker", "shard_batches",
           "sum_across_ranks", "zero_local_grads"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- set-up helpers

def build_deepspeed_config(cfg, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config from a job's YAML sections: ZeRO stage, bf16 on GPU (fp32 on CPU),
    accumulation, clipping. The optimizer and LR schedule are ours (passed to ``deepspeed.initialize``)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.deepspeed.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.clip_max_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bool(use_gpu and cfg.deepspeed.bf16)},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(dict(a.get(k, {})), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    return merge(ds, cfg.deepspeed.extra)


def deepspeed_engine(model: torch.nn.Module, cfg, use_gpu: bool,
                     optimizer_and_scheduler: Callable[[torch.nn.Module], tuple[Any, Any]]):
    """A DeepSpeed engine over ``model`` (BatchNorm -> SyncBatchNorm on NCCL, as the reference
    recipes' ``sync_bn``), with the optimizer and LR schedule built for the converted model,
    loading checkpoints with the restricted unpickler."""
    model = batchnorm_for_backend(model, "nccl" if use_gpu else "gloo")
    optimizer, scheduler = optimizer_and_scheduler(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg, use_gpu), dist_init_required=False)
    engine.checkpoint_engine = safe_checkpoint_engine()
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def derived_seed(stream: str, seed: int, rank: int, epoch: int) -> int:
    """A 32-bit seed for one random stream (``"torch"``, ``"augment"``, ``"shuffle"``) of one rank in
    one epoch: a hash of all four (a sum like ``seed * 7919 + epoch * 31 + rank`` gives epoch 1 of
    rank 0 the seed of epoch 0 of rank 31), and nothing else, so that a resumed run draws what an
    uninterrupted one draws from epoch k on, whatever was drawn before."""
    digest = hashlib.sha256(f"distillery-{stream}:{int(seed)}:{int(rank)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed torch, NumPy and Python's global RNGs for ``epoch`` of ``rank`` (the training engine does it at
    the start of every epoch): what they feed (torchvision's photometric distortion, the
    denoising queries, dropout) depends on (seed, rank, epoch) alone, not on what ran before, so
    a run resumed at epoch k draws as one that never stopped."""
    seed_everything(derived_seed("torch", seed, rank, epoch))


def setup_worker(cfg) -> tuple[int, int, torch.device, bool]:
    """A Ray Train worker's common start: threads from ``cfg.train.cpus_per_worker``, per-rank
    seeds, S3 settings, DeepSpeed's communication layer over Ray Train's process group. Returns
    (rank, world size, device, whether it is a GPU)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    seed_everything(cfg.train.seed + rank)
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
    use_gpu = device.type == "cuda"
    # Before any model is built: MoE layers ask it for their expert-parallel group.
    init_deepspeed_comm(use_gpu, dist_init_required=False)
    return rank, world, device, use_gpu


def init_deepspeed_comm(use_gpu: bool, **kwargs: Any) -> None:
    """``deepspeed.init_distributed`` (NCCL on GPU, gloo on CPU), without DeepSpeed's CPU
    shared-memory kernel: on CPU DeepSpeed would first JIT-compile it (about 90 CPU-seconds, once
    per user's torch-extensions cache: a fresh machine's first job paid it), yet it serves only
    DeepSpeed's inference and tensor-parallel all-reduce; training's all-reduces go through
    torch.distributed. DeepSpeed keeps one ``__compatible_ops__`` dict for the process, so marking
    the op incompatible there makes it fall back to the process group without building."""
    if not use_gpu:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False, **kwargs)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True while every rank still has a batch (keeps ranks in lockstep when one runs out)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def lockstep(batches, device: torch.device, max_steps: int | None = None) -> Iterator[Any]:
    """``batches`` while every rank still has one (at most ``max_steps``): every step is a
    collective (an all-reduce; an all-to-all with expert parallelism), so a pass ends for all
    ranks as soon as one runs out. Drains the rest, so that the next pass starts cleanly."""
    iterator = iter(batches)
    taken = 0
    while True:
        batch = next(iterator, None) if max_steps is None or taken < max_steps else None
        if not all_ranks(batch is not None, device):
            break
        taken += 1
        yield batch
    for _ in iterator:
        pass


def shard_batches(shard, train, epoch: int, rank: int) -> Iterator[dict[str, Any]]:
    """One pass over this rank's Ray Data shard (numpy batches of ``train.batch_size``, shuffled
    locally from (seed, rank, epoch)). The shard's rows come in a fixed order (the ingest runs
    with ``preserve_order``: :func:`~distillery.platform.engine.launch.fit_on_ray_train`), so the
    seeded shuffle gives the same batches in every run."""
    return shard.iter_batches(batch_size=train.batch_size, batch_format="numpy", drop_last=True,
                              local_shuffle_buffer_size=train.shuffle_buffer or None,
                              local_shuffle_seed=derived_seed("shuffle", train.seed, rank, epoch))


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (float64), in rank order."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [values]
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.tolist() for p in parts]


def zero_local_grads(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's gradients for GAM: ``param.grad`` without ZeRO; the local fp32 fragments of
    this rank's partition under ZeRO-1/2 (their L1 sums add up across ranks to the global one)."""
    if engine.zero_optimization_stage() == 0:
        for name, p in engine.module.named_parameters():
            if p.grad is not None:
                yield name, p.grad
        return
    # ZeRO-1/2 keep each rank's reduced gradient partition in the optimizer; a parameter's slice
    # of it is reachable through its hp mapping (None when this rank owns none of the parameter).
    # DeepSpeed's safe_get_full_grad would all-reduce every parameter separately: exactly the
    # per-step, per-parameter communication GAM avoids.
    for name, p in engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if not p.requires_grad or mapping is None:
            continue
        fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if fragment.numel() == p.numel() and address.numel != p.numel():
            fragment = fragment.narrow(0, address.start, address.numel)  # a full buffer: take our slice
        yield name, fragment


# --------------------------------------------------------------------------- evaluation

def evaluate_on_ranks(model: torch.nn.Module, val_ann: str, val_images: str, size: int, batch_size: int,
                      rank: int, world: int, device: torch.device, num_top: int = 100) -> dict[str, float]:
    """COCO AP of ``model`` on the val split: images sharded over ranks, detections gathered on
    rank 0, scored with pycocotools; every rank returns the same metrics. The model runs where
    its parameters are (``device`` is kept for the callers)."""
    dataset = load_coco(val_ann, val_images, check_images="none")

    def load_batch(records) -> torch.Tensor:
        return torch.stack([torch.from_numpy(load_image_resized(r.uri, size)) for r in records])

    detections = predict_coco_detections(model, dataset.records, load_batch, list(dataset.categories.category_ids),
                                         batch_size, num_top, shard_index=rank, shard_count=world)
    if dist.is_initialized() and world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, detections)
        detections = [d for part in gathered for d in part]
    metrics = coco_evaluate(dataset.coco_gt_dict(), detections) if rank == 0 else {}
    if dist.is_initialized() and world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return {k: float(v) for k, v in metrics.items()}


def inject_fault(run_storage: str, phase: str | None = None) -> None:
    """Kill this worker process once (the marker, one per named ``phase``, makes the restarted
    run go on), after the checkpoints reported so far are registered."""
    marker = storage.join(run_storage, FAULT_MARKER if phase is None else f"{FAULT_MARKER}_{phase}")
    if storage.exists(marker):
        return
    # Wait until Ray Train has committed every checkpoint this worker reported: killed earlier,
    # the restarted workers could start without the previous epoch's checkpoint (a race between
    # the kill and the controller registering the report, seen in about one test run in six).
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    storage.write_text(marker, "killed once by debug.kill\n")
    log.warning("debug.kill: killing worker process %d", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
