"""The per-worker training loop that Ray Train runs (``TorchTrainer(train_worker, ...)``).

Each worker builds the student, wraps it in a DeepSpeed engine over the process group Ray Train
set up (gloo on CPU, NCCL on GPU), and runs the shared step function
(:func:`distillery.students.training.train_step`) on batches streamed from its Ray Data shard.
Per epoch: GAM's rank-synchronous update (one all-reduce of the per-step norm sums), COCO AP
of the EMA model on the val split (sharded over ranks, gathered on rank 0), and a Ray Train
checkpoint holding the DeepSpeed checkpoint plus GAM, EMA, epoch, step and RNG states.

Reading order: :func:`train_worker` top to bottom.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from distillery.platform.io import storage
from distillery.data.augment import AugmentConfig, Augmenter
from distillery.data.sample import collate
from distillery.data.views import view_recipe
from distillery.platform.engine.batchnorm import batchnorm_for_backend
from distillery.platform.engine.checkpoints import (DS_TAG, EXTRA_STATE, STATE_JSON, CheckpointError,
                                            deepspeed_safe_globals)
from distillery.platform.config.distill import DistillConfig
from distillery.platform.datasets.ingest import rows_to_samples
from distillery.platform.engine.norm_sync import average_norm_statistics
from distillery.platform.engine.preview import log_augment_preview
from distillery.platform.engine.progress import ProgressPrinter, quiet_worker_noise

__all__ = ["build_deepspeed_config", "load_extra_state", "train_worker"]

log = logging.getLogger(__name__)

# (File names of a checkpoint directory: distillery.platform.engine.checkpoints checks them on the driver.)
MODEL_JSON = "distillery_model.json"  # in the run storage: the student's name, input size, classes


# --------------------------------------------------------------------------- set-up helpers

def build_deepspeed_config(cfg: DistillConfig, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config from our YAML section: ZeRO stage, bf16 on GPU (fp32 on CPU), accumulation,
    clipping. The optimizer and LR schedule are ours (passed to ``deepspeed.initialize``)."""
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


def _safe_checkpoint_engine():
    """DeepSpeed's checkpoint engine with ``torch.load(weights_only=True)``.

    DeepSpeed loads its own checkpoint files with full unpickling; ours come from storage, so
    they are loaded with the restricted unpickler and an explicit allow-list of the few
    DeepSpeed/torch types its checkpoints hold.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__()
            # Zip archives (DeepSpeed's default is torch's legacy format): every record carries a
            # CRC-32, so the driver verifies a checkpoint end to end before resuming from it.
            self.zipfile_serialization = True

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except FileNotFoundError:
                    raise CheckpointError(f"checkpoint file {path} is missing") from None
                except Exception as exc:
                    raise CheckpointError(f"checkpoint file {path} cannot be loaded (truncated or corrupt?): "
                                          f"{type(exc).__name__}: {exc}") from None

    return SafeTorchCheckpointEngine()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def setup_worker(cfg) -> tuple[int, int, torch.device, bool]:
    """A Ray Train worker's common start (distillation and MoE-tuning jobs): threads from
    ``cfg.train.cpus_per_worker``, per-rank seeds, S3 settings. Returns (rank, world size,
    device, whether it is a GPU)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    _seed_everything(cfg.train.seed + rank)
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
    return rank, world, device, device.type == "cuda"


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))


def load_extra_state(directory: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(shared state written by rank 0, this rank's RNG state or None) from a checkpoint dir."""
    directory = Path(directory)
    shared_path = directory / EXTRA_STATE
    if not shared_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {EXTRA_STATE}: not a Distillery checkpoint, "
                              "or it was truncated")
    rng_path = directory / f"rng_rank{rank}.pt"
    return _load_state_file(shared_path), _load_state_file(rng_path) if rng_path.is_file() else None


def _load_state_file(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, garbage, a pickle outside the allow-list
        raise CheckpointError(f"checkpoint file {path} cannot be loaded (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """True while every rank still has a batch (keeps ranks in lockstep when one runs out)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _zero_local_grads(engine) -> Iterator[tuple[str, torch.Tensor]]:
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
    from distillery.evaluation.coco_eval import coco_evaluate
    from distillery.evaluation.loop import predict_coco_detections
    from distillery.platform.datasets.coco import load_coco, load_image_resized

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


def _record_weights_report(report, run: dict[str, Any]) -> None:
    """What loading student.weights did (re-initialised class tensors, kept rows): the log and
    the MLflow run (tags for the counts, weights_report.json for the names)."""
    log.info("student.weights: %s", report.summary())
    if not run.get("run_id"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run["tracking_uri"])
    summary = report.as_dict()
    for key in ("layout", "loaded", "num_reinitialised", "checkpoint_num_classes", "model_num_classes"):
        client.set_tag(run["run_id"], f"distillery.weights.{key}", str(summary[key]))
    client.set_tag(run["run_id"], "distillery.weights.class_rows_copied", str(len(report.class_rows_copied)))
    client.log_dict(run["run_id"], summary, "weights_report.json")


# --------------------------------------------------------------------------- the worker

def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": DistillConfig as JSON, "run": run info}``."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from distillery.platform.io.weights_source import student_weight_kwargs, weights_file_errors
    from distillery.students import build_criterion, build_student
    from distillery.students.ema import ModelEMA
    from distillery.students.gam import GAMController
    from distillery.students.optim import build_lr_scheduler, build_optimizer
    from distillery.students.training import train_step

    cfg = DistillConfig.model_validate(config["cfg"])
    run: dict[str, Any] = config["run"]
    rank, world, device, use_gpu = setup_worker(cfg)
    quiet_worker_noise()

    # --- model, loss, optimizer, engine
    teacher_dim = run["teacher_dim"]
    with weights_file_errors():  # a weights file that does not fit fails the same on every retry
        model = build_student(cfg.student.name, num_classes=run["num_classes"],
                              eval_spatial_size=cfg.student.input_size,
                              dsi=teacher_dim is not None, teacher_dim=teacher_dim, peft=cfg.student.peft.kwargs(),
                              **student_weight_kwargs(cfg.student, run["categories"]["names"]),
                              **cfg.student.overrides)
    model = batchnorm_for_backend(model, "nccl" if use_gpu else "gloo")  # the recipes' sync_bn
    if rank == 0 and getattr(model, "weights_report", None) is not None:
        _record_weights_report(model.weights_report, run)
    if rank == 0 and run.get("run_storage"):  # what jobs/predict.py needs to rebuild it from a run dir
        storage.write_text(storage.join(run["run_storage"], MODEL_JSON), json.dumps(
            {"student": cfg.student.name, "input_size": cfg.student.input_size, "overrides": cfg.student.overrides,
             "peft": cfg.student.peft.kwargs(), "categories": run["categories"]}, indent=1))
    criterion = build_criterion(num_classes=run["num_classes"])
    optimizer = build_optimizer(model, lr=cfg.optim.lr, backbone_lr=cfg.optim.backbone_lr,
                                weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    steps_per_epoch = run["steps_per_epoch"]
    scheduler = build_lr_scheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs,
                                   flat_epochs=cfg.optim.flat_epochs, no_aug_epochs=cfg.optim.no_aug_epochs,
                                   warmup_steps=cfg.optim.warmup_steps, min_ratio=cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg, use_gpu), dist_init_required=False)
    engine.checkpoint_engine = _safe_checkpoint_engine()
    model_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    ema = ModelEMA(engine.module, decay=cfg.optim.ema_decay, warmups=cfg.optim.ema_warmups)
    g = run["gam"]
    gam = GAMController(lambda0=g["lambda0"], rho=g["rho"], delta=g["delta"], default_weight=g["default_weight"],
                        stop_epoch=g["stop_epoch"], rule=g["rule"], enabled=g["enabled"]) \
        if teacher_dim is not None else None

    online_teacher = None
    if cfg.teacher_mode == "online":
        from distillery.platform.cache.job import build_teacher

        online_teacher = build_teacher(cfg.teacher.model_dump(), run["teacher_dtype"]).to(device)

    # --- restore (after a worker failure, or resume_from)
    start_epoch, global_step = 0, 0
    best: tuple[float, int] | None = None  # (best val AP so far, its epoch): "best" means best-epoch AP
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and run.get("resume_checkpoint"):
        checkpoint = ray.train.Checkpoint(run["resume_checkpoint"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_path, _ = engine.load_checkpoint(directory, tag=DS_TAG)
            if load_path is None:
                raise CheckpointError(f"checkpoint {checkpoint.path} has no DeepSpeed checkpoint '{DS_TAG}'")
            shared, rng = load_extra_state(directory, rank)
            best = _restored_best(directory)
        ema.load_state_dict(shared["ema"])
        if gam is not None and shared.get("gam") is not None:
            gam.load_state_dict(shared["gam"])
        start_epoch, global_step = int(shared["epoch"]) + 1, int(shared["global_step"])
        if rng is not None:
            _set_rng_state(rng)
        log.info("rank %d resumed from %s at epoch %d (step %d)", rank, checkpoint.path, start_epoch, global_step)

    # --- per-run helpers
    a = cfg.augment
    augmenter = Augmenter(AugmentConfig(
        size=cfg.student.input_size, policy_epochs=a.policy_epochs, mosaic_prob=a.mosaic_prob,
        mixup_prob=a.mixup_prob, mixup_epochs=a.mixup_epochs, photometric_prob=a.photometric_prob,
        iou_crop_prob=a.iou_crop_prob, flip_prob=a.flip_prob,
        copyblend_prob=a.copyblend_prob, copyblend_epochs=a.copyblend_epochs,
        multiscale_stop_epoch=a.multiscale_stop_epoch if a.multiscale else 0), seed=cfg.train.seed * 1000 + rank)
    cache_meta = run.get("cache_meta")
    cache_views = _check_cache_views(cfg, augmenter.cfg)
    logger = None
    monitor = None
    if rank == 0 and run.get("run_id"):
        from distillery.platform.tracking.runs import MetricsLogger

        logger = MetricsLogger(run["tracking_uri"], run["run_id"])
        if cfg.tracking.system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(run["run_id"], sampling_interval=5, samples_before_logging=1,
                                               tracking_uri=run["tracking_uri"])
                monitor.start()
            except Exception as exc:  # system metrics are nice to have, never a reason to fail
                log.warning("system metrics disabled: %s", exc)
        if start_epoch == 0:  # what trains (PEFT freezes the ViT backbone) vs what is deployed
            module = engine.module
            logger.log({"model/params_total": float(sum(p.numel() for p in module.parameters())),
                        "model/params_trainable": float(sum(p.numel() for p in module.parameters()
                                                            if p.requires_grad)),
                        "model/params_inference": float(module.num_inference_parameters())}, step=0)
    kill = cfg.debug.kill
    shard = ray.train.get_dataset_shard("train")
    progress = ProgressPrinter(cfg.train.epochs, steps_per_epoch, every_steps=cfg.train.progress_every,
                               every_seconds=cfg.train.progress_seconds, world_size=world) if rank == 0 else None
    preview_due = rank == 0 and start_epoch == 0 and cfg.tracking.augment_preview > 0 and cfg.teacher_mode == "cached"

    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        t_epoch = time.perf_counter()
        if progress is not None:
            progress.start_epoch_timer()
        images_seen, steps_in_epoch, view_samples = 0, 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-step sync
        batches = shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
                                     local_shuffle_seed=cfg.train.seed * 7919 + epoch * 31 + rank)
        iterator = iter(batches)
        while True:
            batch = next(iterator, None)
            limit = cfg.debug.max_steps_per_epoch
            if limit is not None and steps_in_epoch >= limit * cfg.deepspeed.gradient_accumulation_steps:
                batch = None
            if not _all_ranks(batch is not None, device):
                break
            # Cached views serve the strong-augmentation epochs only: one view per image and
            # epoch, chosen from (seed, epoch, image id) alone, so ranks and restarts agree.
            view_epoch = epoch - augmenter.cfg.policy_epochs[0] \
                if cache_views > 1 and augmenter.strong(epoch) else None
            plain_or_views = rows_to_samples(batch, cache_meta, view_epoch=view_epoch, seed=cfg.train.seed)
            view_samples += sum(s.view > 0 for s in plain_or_views)
            if preview_due:
                preview_due = False
                log_augment_preview(plain_or_views, augmenter, cfg.tracking.augment_preview, cfg.train.seed,
                                    run, logger)
            samples = augmenter.batch(plain_or_views, epoch)
            b = collate(samples, f5_hw=None)
            images = b["images"].to(device)
            f5_hw = (images.shape[-2] // 32, images.shape[-1] // 32)
            targets = [{k: v.to(device) for k, v in t.items() if k != "image_id"} for t in b["targets"]]
            step_batch: dict[str, Any] = {"images": images.to(model_dtype), "targets": targets}
            if cfg.teacher_mode == "cached":
                step_batch.update(_render_teacher(samples, f5_hw, device))
            elif cfg.teacher_mode == "online":
                size = online_teacher.input_size
                teacher_in = images if images.shape[-1] == size else torch.nn.functional.interpolate(
                    images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                step_batch["teacher_grid"] = online_teacher(teacher_in)

            result = train_step(engine, criterion, step_batch, backward=engine.backward, step=engine.step,
                                gam=gam, grads=lambda: _zero_local_grads(engine),
                                at_boundary=engine.is_gradient_accumulation_boundary)
            steps_in_epoch += 1
            images_seen += len(images)
            loss_sum += result.total.detach().double()
            if progress is not None and progress.due(steps_in_epoch):
                progress.step(epoch, steps_in_epoch, images_seen, float(result.total.detach()),
                              result.as_floats(), gam.current_lambda if gam is not None else None)
            if engine.is_gradient_accumulation_boundary() or cfg.deepspeed.gradient_accumulation_steps == 1:
                ema.update(engine.module)
            global_step += 1
            if logger is not None and global_step % cfg.train.log_every == 0:
                metrics = {f"train/{k}": v for k, v in result.as_floats().items()}
                metrics["train/lr"] = engine.get_lr()[0]
                metrics["train/lambda"] = gam.current_lambda if gam is not None else 0.0
                logger.log(metrics, global_step)
            if kill is not None and rank == kill.rank and global_step == kill.step:
                _inject_fault(run)
        # Drain what this rank has left so the next epoch's iterator starts cleanly.
        for _ in iterator:
            pass

        epoch_seconds = time.perf_counter() - t_epoch
        lam_before = gam.current_lambda if gam is not None else 0.0
        lam = gam.end_epoch(epoch, all_reduce=_sum_across_ranks) if gam is not None else 0.0
        metrics: dict[str, Any] = {"epoch": epoch, "global_step": global_step, "lambda": lam,
                                   "lambda_before": lam_before,
                                   "images_per_second": images_seen * world / max(epoch_seconds, 1e-9),
                                   "epoch_seconds": epoch_seconds}
        if cache_views > 1:  # this rank's share of samples served by an exact cached view
            metrics["cached_view_fraction"] = view_samples / max(images_seen, 1)
        if gam is not None and gam.history:
            metrics["aifi_ratio"] = gam.history[-1].get("ratio", 0.0)
            for name, share in (gam.last_shares or {}).items():
                metrics[f"share_{name}"] = share
        # One set of BatchNorm statistics for every rank before they evaluate and checkpoint.
        average_norm_statistics(engine.module, ema.module)
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            ap = evaluate_on_ranks(ema.module, run["val_annotations"], run["val_images"], cfg.student.input_size,
                                   cfg.train.eval_batch_size, rank, world, device)
            metrics.update(ap)
        best = _best_ap(best, metrics, epoch)
        if best is not None:
            metrics["best_AP"], metrics["best_epoch"] = best
        if progress is not None:
            progress.epoch_end(epoch, metrics, float(loss_sum) / max(steps_in_epoch, 1))
        consistency = _rank_consistency(engine.module, ema.module, lam, device)
        if logger is not None:
            logger.log({k if k in ("epoch",) else f"epoch/{k}": v for k, v in metrics.items()
                        if isinstance(v, (int, float))}, epoch)
            logger.flush()
        _report_with_checkpoint(engine, ema, gam, epoch, global_step, rank, metrics, consistency)

    if monitor is not None:
        monitor.finish()


def _best_ap(best: tuple[float, int] | None, metrics: dict[str, Any], epoch: int) -> tuple[float, int] | None:
    """The best val AP so far and its epoch, after this epoch's ``metrics`` (NaN and absent APs
    do not count)."""
    ap = metrics.get("AP")
    if isinstance(ap, float) and ap == ap and (best is None or ap > best[0]):
        return ap, epoch
    return best


def _restored_best(directory: str | Path) -> tuple[float, int] | None:
    state_file = Path(directory) / STATE_JSON
    metrics = json.loads(state_file.read_text()).get("metrics", {}) if state_file.is_file() else {}
    if "best_AP" in metrics and "best_epoch" in metrics:
        return float(metrics["best_AP"]), int(metrics["best_epoch"])
    return None


def _check_cache_views(cfg: DistillConfig, augment_cfg: AugmentConfig) -> int:
    """``cache.views`` against the cache's manifest (and, with views, the augmentation recipe
    the views were drawn with): a mismatch stops the worker before its first step."""
    if cfg.teacher_mode != "cached":
        return 1
    from distillery.platform.cache.feature_cache import FeatureCache

    cache = FeatureCache(storage.join(cfg.cache.uri, "train"))
    cache.check_views(cfg.cache.views, view_recipe(augment_cfg))
    return cache.views


def _render_teacher(samples, f5_hw: tuple[int, int], device: torch.device) -> dict[str, torch.Tensor]:
    from distillery.data.sample import render_features

    grids, masks = zip(*(render_features(s, f5_hw) for s in samples))
    return {"teacher_grid": torch.stack(grids).to(device), "teacher_mask": torch.stack(masks).to(device)}


def _inject_fault(run: dict[str, Any]) -> None:
    """Kill this worker process once (the marker makes the restarted run go on), after the
    checkpoints reported so far are registered."""
    import ray.train

    marker = storage.join(run["run_storage"], "fault_injected")
    if storage.exists(marker):
        return
    # Wait until Ray Train has committed every checkpoint this worker reported: killed earlier,
    # the restarted workers could start without the previous epoch's checkpoint (a race between
    # the kill and the controller registering the report, seen in about one test run in six).
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    storage.write_text(marker, "killed once by debug.kill\n")
    log.warning("debug.kill: killing worker process %d", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def _checksum(tensors) -> torch.Tensor:
    """float64 sum of ``tensors`` (0 for none)."""
    values = [t.detach().double().sum() for t in tensors]
    return torch.stack(values).sum() if values else torch.zeros((), dtype=torch.float64)


def _rank_consistency(module: torch.nn.Module, ema_module: torch.nn.Module, lam: float,
                      device: torch.device) -> dict[str, list]:
    """Every rank's lambda and float64 checksums of its weights, its buffers (BatchNorm running
    statistics) and its EMA copy's weights and buffers, gathered: data parallelism means they
    must agree (the EMA is what is evaluated and exported), and the checkpoint records it."""
    with torch.no_grad():
        values = [float(lam), _checksum(module.parameters()), _checksum(module.buffers()),
                  _checksum(ema_module.parameters()), _checksum(ema_module.buffers())]
    keys = ("lambda", "weights_checksum", "buffers_checksum", "ema_weights_checksum", "ema_buffers_checksum")
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return {k: [float(v)] for k, v in zip(keys, local.tolist())}
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return {k: [float(p[i]) for p in parts] for i, k in enumerate(keys)}


def _report_with_checkpoint(engine, ema, gam, epoch: int, global_step: int, rank: int,
                            metrics: dict[str, Any], consistency: dict[str, list]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        if rank == 0:
            shared = {"ema": ema.state_dict(), "gam": gam.state_dict() if gam is not None else None,
                      "epoch": epoch, "global_step": global_step}
            torch.save(shared, os.path.join(tmp, EXTRA_STATE))
            with open(os.path.join(tmp, STATE_JSON), "w") as fh:
                json.dump({"epoch": epoch, "global_step": global_step, "metrics": metrics, "ranks": consistency,
                           "lambda": gam.current_lambda if gam is not None else None,
                           "gam_history": gam.history if gam is not None else []}, fh, default=float)
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))
