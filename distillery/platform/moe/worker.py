"""The MoE-tuning Ray Train worker
    1. dense phase (only without a base checkpoint and without a checkpoint to resume): DeepSpeed
       data parallelism for ``base.dense_steps`` steps; the result is saved to the run storage
       (``dense_base/model.safetensors``) and evaluated (``base/AP``);
    2. decomposition: every decoder FFN -> ``copies * granularity`` experts
       (:func:`~distillery.students.open_vocab.moe_tune_decoder`), each layer then mapped onto
       DeepSpeed's MoE layer with Dynamic-DINO's gate and ``ep_size`` expert parallelism
       (:func:`~distillery.platform.moe.expert_parallel.to_deepspeed_moe`); the optimizer's parameter
       groups are split into expert / non-expert groups
       (``split_params_into_different_moe_groups_for_optimizer``) so that DeepSpeed reduces expert
       gradients over the expert-data-parallel group only. The whole detector's outputs on a few
       val images are compared before and after (``moe/step0_max_abs_diff``: 0 up to rounding);
    3. epochs of training: detection loss (DEIM criterion over the prompt vocabulary) plus the
       weighted load-balancing loss of every MoE layer;
    4. per epoch: the experts are gathered from all ranks into a plain MoE detector
       (:func:`~distillery.platform.moe.expert_parallel.gather_moe_ffn`), evaluated with pycocotools
       over the prompt vocabulary (val images sharded over ranks), with every token's routing
       recorded for the expert analysis (load histogram, co-activation matrix, stable partners per
       layer, :func:`expert_analysis`); then a checkpoint: DeepSpeed's (non-expert states once,
       each rank's expert shards ``layer_<l>_expert_<e>_...``, per-rank optimizer states), the
       consolidated ``model.safetensors``, RNG states, and the raw outputs on the probe images.
    On restore (worker failure or ``output.resume_from``) the probe outputs are recomputed after
    loading and compared with the recorded ones (``restore/max_abs_diff``).

Evaluation runs on the gathered plain model rather than through DeepSpeed's all-to-all: it is the
same function (tested in ``tests/test_moe_deepspeed.py``), needs no lockstep between ranks with
different numbers of val images, and records routing traces.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.engine.batchnorm import batchnorm_for_backend
from distillery.platform.engine.norm_sync import average_norm_statistics
from distillery.platform.engine.progress import (
    ProgressPrinter,
    loss_terms,
    quiet_worker_noise,
)
from distillery.platform.engine.worker import DS_TAG, EXTRA_STATE, STATE_JSON
from distillery.platform.io import storage
from distillery.platform.moe.analysis import analysis_metrics, expert_analysis
from distillery.platform.moe.model_files import (
    ANALYSIS_JSON,
    MODEL_FILE,
    PROBE_FILE,
    _weights_from_bytes,
    build_detector,
    save_tuned_model,
)

log = logging.getLogger(__name__)

# =========================================================================== worker

class _BatchStream:
    """Training batches from this worker's Ray Data shard, ranks kept in lockstep.

    Every forward of an expert-parallel model is a collective (all-to-all), and every step an
    all-reduce: all ranks must take the same number of steps, so a pass ends for everyone as soon
    as one rank runs out (``_all_ranks``).
    """

    def __init__(self, shard, cfg: MoETuneConfig, rank: int, device: torch.device, dtype: torch.dtype):
        from distillery.data.augment import AugmentConfig, Augmenter

        self.shard, self.cfg, self.rank, self.device, self.dtype = shard, cfg, rank, device, dtype
        never = 10 ** 9   # fine-tuning: no strong augmentation, no Mixup, no multi-scale
        self.augmenter = Augmenter(AugmentConfig(size=cfg.model.input_size, policy_epochs=(never, never, never),
                                                 mixup_epochs=(never, never), multiscale_stop_epoch=0,
                                                 flip_prob=cfg.train.flip_prob), seed=cfg.train.seed * 1000 + rank)

    def epoch(self, pass_id: int, max_steps: int) -> Iterator[dict[str, Any]]:
        from distillery.data.sample import collate
        from distillery.platform.datasets.ingest import rows_to_samples
        from distillery.platform.engine.worker import _all_ranks

        t = self.cfg.train
        batches = self.shard.iter_batches(batch_size=t.batch_size, batch_format="numpy", drop_last=True,
                                          local_shuffle_buffer_size=t.shuffle_buffer or None,
                                          local_shuffle_seed=t.seed * 7919 + pass_id * 31 + self.rank)
        iterator = iter(batches)
        taken = 0
        while True:
            batch = next(iterator, None) if taken < max_steps else None
            if not _all_ranks(batch is not None, self.device):
                break
            samples = self.augmenter.batch(rows_to_samples(batch, None), 0)
            b = collate(samples, f5_hw=None)
            targets = [{k: v.to(self.device) for k, v in tg.items() if k != "image_id"} for tg in b["targets"]]
            taken += 1
            yield {"images": b["images"].to(self.device, self.dtype), "targets": targets}
        for _ in iterator:   # drain, so that the next pass starts cleanly
            pass


def _moe_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from distillery.platform.moe.expert_parallel import DeepSpeedMoEFFN
    from distillery.students.moe import MoEFFN

    return {n: m for n, m in module.named_modules() if isinstance(m, (MoEFFN, DeepSpeedMoEFFN))}


def _aux_loss(module: torch.nn.Module) -> torch.Tensor | None:
    losses = [m.aux_loss for m in _moe_modules(module).values() if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def _step(engine, criterion, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One optimizer step: detection loss over the prompt vocabulary + the MoE load-balancing loss."""
    out = engine(batch["images"], batch["targets"])
    det = criterion(out, batch["targets"])
    loss_det = torch.stack(list(det.values())).sum()
    aux = _aux_loss(engine.module)
    total = loss_det if aux is None else loss_det + aux.to(loss_det.dtype)
    engine.backward(total)
    engine.step()
    parts = {"loss": total.detach(), "loss_detection": loss_det.detach()}
    if aux is not None:
        parts["loss_aux"] = aux.detach()
    return parts


def _ds_engine(model, cfg: MoETuneConfig, use_gpu: bool, *, lr: float, backbone_lr: float, warmup_steps: int,
               total_steps: int, flat_steps: int, moe: bool):
    """DeepSpeed engine with AdamW (our groups; expert params in their own groups when ``moe``)."""
    import deepspeed

    from distillery.platform.engine.worker import (
        _safe_checkpoint_engine,
        build_deepspeed_config,
    )
    from distillery.students.optim import build_lr_scheduler, build_param_groups

    model = batchnorm_for_backend(model, "nccl" if use_gpu else "gloo")  # the recipes' sync_bn
    groups = build_param_groups(model, lr, backbone_lr, cfg.optim.weight_decay)
    for g in groups:
        g.pop("param_names")
    if moe:
        from deepspeed.moe.utils import (
            split_params_into_different_moe_groups_for_optimizer,
        )

        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    scheduler = build_lr_scheduler(optimizer, steps_per_epoch=1, epochs=max(total_steps, 1),
                                   flat_epochs=min(flat_steps, total_steps), no_aug_epochs=0,
                                   warmup_steps=warmup_steps, min_ratio=cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg, use_gpu), dist_init_required=False)
    engine.checkpoint_engine = _safe_checkpoint_engine()
    return engine


@torch.no_grad()
def _probe(module: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode outputs on the probe images (a collective for an expert-parallel model: all ranks call)."""
    was = module.training
    module.eval()
    try:
        out = module(images.to(next(module.parameters()).dtype))
    finally:
        module.train(was)
    return {k: out[k].detach().float().cpu() for k in ("pred_logits", "pred_boxes")}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in ("pred_logits", "pred_boxes"))


def _consolidate(module: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """Copy ``module``'s weights into the plain detector ``plain``, gathering every rank's experts.

    A collective over each expert-parallel group: every rank calls it, in the same order.
    """
    from distillery.platform.moe.expert_parallel import DeepSpeedMoEFFN, gather_moe_ffn

    ds_layers = {n: m for n, m in module.named_modules() if isinstance(m, DeepSpeedMoEFFN)}
    state = {k: v for k, v in module.state_dict().items()
             if not any(k.startswith(prefix + ".") for prefix in ds_layers)}
    for prefix, layer in ds_layers.items():
        gathered = gather_moe_ffn(layer)
        state.update({f"{prefix}.{k}": v for k, v in gathered.state_dict().items()})
    plain.load_state_dict(state, strict=True)
    return plain


def _gather_traces(traces: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    if not (dist.is_initialized() and world > 1):
        return traces
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, {k: v.numpy() for k, v in traces.items()})
    return {k: torch.cat([torch.from_numpy(p[k]) for p in parts]) for k in traces}


def _shared_checksum(module: torch.nn.Module) -> float:
    """float64 sum of this rank's non-expert parameters and floating-point buffers (equal on all ranks)."""
    from deepspeed.moe.utils import is_moe_param

    with torch.no_grad():
        values = [p.detach().double().sum() for p in module.parameters() if not is_moe_param(p)]
        values += [b.detach().double().sum() for b in module.buffers() if b.is_floating_point()]
    return float(torch.stack(values).sum())


def _all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [values]
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.tolist() for p in parts]


def moe_tune_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": MoETuneConfig as JSON, "run": run info}``."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from distillery.platform.datasets.coco import load_coco, load_image_resized
    from distillery.platform.engine.worker import (
        _inject_fault,
        _set_rng_state,
        evaluate_on_ranks,
        load_extra_state,
        setup_worker,
    )
    from distillery.platform.moe.expert_parallel import to_deepspeed_moe
    from distillery.students.criterion import build_criterion
    from distillery.students.open_vocab import moe_tune_decoder

    cfg = MoETuneConfig.model_validate(config["cfg"])
    run: dict[str, Any] = config["run"]
    rank, world, device, use_gpu = setup_worker(cfg)
    quiet_worker_noise()
    # DeepSpeed's communication layer over the process group Ray Train created (needed before
    # the MoE layers are built: they ask for their expert-parallel group).
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", dist_init_required=False, verbose=False)

    phrases = run["phrases"]
    text = torch.tensor(run["text_embeddings"], dtype=torch.float32)
    m = cfg.moe

    def dense_model():
        return build_detector(cfg.model.name, phrases, text, cfg.model.input_size, run["build_options"]).to(device)

    criterion = build_criterion(num_classes=len(phrases))
    dtype = torch.bfloat16 if (use_gpu and cfg.deepspeed.bf16) else torch.float32
    stream = _BatchStream(ray.train.get_dataset_shard("train"), cfg, rank, device, dtype)
    val = load_coco(run["val_annotations"], run["val_images"], check_images="none")
    probe_images = torch.stack([torch.from_numpy(load_image_resized(r.uri, cfg.model.input_size))
                                for r in val.records[:cfg.train.probe_images]]).float().div_(255.0).to(device)

    logger = None
    if rank == 0 and run.get("run_id"):
        from distillery.platform.tracking.runs import MetricsLogger

        logger = MetricsLogger(run["tracking_uri"], run["run_id"])

    def evaluate(module) -> dict[str, float]:
        return evaluate_on_ranks(module, run["val_annotations"], run["val_images"], cfg.model.input_size,
                                 cfg.train.eval_batch_size, rank, world, device)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and run.get("resume_checkpoint"):
        checkpoint = ray.train.Checkpoint(run["resume_checkpoint"])

    # --- 1. the dense base (not needed when a checkpoint is restored: it holds everything)
    model = dense_model()
    base_metrics, step0 = None, None
    if checkpoint is None:
        if run.get("base_uri"):
            weights = _weights_from_bytes(storage.read_bytes(run["base_uri"]), run["base_uri"])
            model.load_state_dict(weights, strict=True)
        else:
            model = _dense_phase(model, dense_model, criterion, cfg, run, stream, use_gpu, logger, rank)
        base_metrics = evaluate(model)
        if logger is not None:
            logger.log({f"base/{k}": v for k, v in base_metrics.items()}, 0)
    dense_probe = _probe(model, probe_images) if checkpoint is None and m.enabled else None

    # --- 2. decomposition onto DeepSpeed's MoE layer with expert parallelism
    moe_names: list[str] = []
    if m.enabled:
        torch.manual_seed(cfg.train.seed)   # one router init for every rank (DeepSpeed broadcasts it anyway)
        moe_names = moe_tune_decoder(model, m.copies, m.granularity, capacity_factor=m.capacity_factor,
                                     aux_loss_weight=m.aux_loss_weight)
        for name in moe_names:
            layer = model.get_submodule(name)
            layer.linear1 = to_deepspeed_moe(layer.linear1, ep_size=m.ep_size, use_our_gate=m.use_our_gate,
                                             capacity_factor=m.capacity_factor,
                                             eval_capacity_factor=m.eval_capacity_factor,
                                             aux_loss_weight=m.aux_loss_weight).to(device)
    steps_per_epoch = run["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.train.epochs
    engine = _ds_engine(model, cfg, use_gpu, lr=cfg.optim.lr, backbone_lr=cfg.optim.backbone_lr,
                        warmup_steps=cfg.optim.warmup_steps, total_steps=total_steps,
                        flat_steps=int(cfg.optim.flat_fraction * total_steps), moe=m.enabled)
    if dense_probe is not None:
        # The whole detector through the expert-parallel layers vs the dense one, on every rank.
        per_rank = [d[0] for d in _all_gather_floats([_max_diff(_probe(engine.module, probe_images), dense_probe)],
                                                     device)]
        step0 = {"max_abs_diff": max(per_rank), "per_rank": per_rank}
        if logger is not None:
            logger.log({"moe/step0_max_abs_diff": step0["max_abs_diff"]}, 0)

    # The plain twin every evaluation reads the gathered weights into (records routing).
    plain = build_detector(cfg.model.name, phrases, text, cfg.model.input_size, run["build_options"],
                           {**run["moe_meta"], "record_routing": True} if m.enabled else None).to(device).eval()

    # --- restore
    start_epoch, global_step, restore_checks = 0, 0, []
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_path, _ = engine.load_checkpoint(directory, tag=DS_TAG)
            if load_path is None:
                raise FileNotFoundError(f"checkpoint {checkpoint.path} has no DeepSpeed checkpoint '{DS_TAG}'")
            shared, rng = load_extra_state(directory, rank)
            recorded = torch.load(Path(directory) / PROBE_FILE, map_location="cpu", weights_only=True)
            previous = json.loads((Path(directory) / STATE_JSON).read_text())
        start_epoch, global_step = int(shared["epoch"]) + 1, int(shared["global_step"])
        base_metrics, step0 = previous.get("base_metrics"), previous.get("step0")
        restore_checks = list(previous.get("restore_checks", []))
        # Every rank recomputes the recorded outputs (an expert-parallel forward: all ranks take part).
        diff = _max_diff(_probe(engine.module, recorded["images"].to(device)), recorded)
        per_rank = [d[0] for d in _all_gather_floats([diff], device)]
        restore_checks.append({"epoch": int(shared["epoch"]), "max_abs_diff": max(per_rank), "per_rank": per_rank})
        if max(per_rank) > 1e-4:
            log.warning("outputs after restoring %s differ from the recorded ones by %s (per rank)",
                        checkpoint.path, per_rank)
        if logger is not None:
            logger.log({"restore/max_abs_diff": max(per_rank)}, global_step)
        if rng is not None:
            _set_rng_state(rng)
        log.info("rank %d resumed from %s at epoch %d (step %d)", rank, checkpoint.path, start_epoch, global_step)

    # --- 3. training epochs
    micro_steps = steps_per_epoch * cfg.deepspeed.gradient_accumulation_steps
    progress = ProgressPrinter(cfg.train.epochs, micro_steps, every_steps=cfg.train.progress_every,
                               every_seconds=cfg.train.progress_seconds, world_size=world) if rank == 0 else None
    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        t_epoch, steps = time.perf_counter(), 0
        if progress is not None:
            progress.start_epoch_timer()
        for batch in stream.epoch(epoch, micro_steps):
            parts = _step(engine, criterion, batch)
            steps += 1
            global_step += 1
            if progress is not None and progress.due(steps):
                floats = dict(zip(parts, torch.stack(list(parts.values())).float().tolist()))
                progress.step(epoch, steps, steps * cfg.train.batch_size, sum(loss_terms(floats).values()), floats,
                              None)
            if logger is not None and global_step % cfg.train.log_every == 0:
                values = torch.stack(list(parts.values())).float().tolist()
                metrics = {f"train/{k}": v for k, v in zip(parts, values)}
                metrics["train/lr"] = engine.get_lr()[0]
                logger.log(metrics, global_step)
            kill = cfg.debug.kill
            if kill is not None and rank == kill.rank and global_step == kill.step:
                if logger is not None:
                    logger.flush()
                _inject_fault(run)
        if steps == 0:
            raise RuntimeError(f"epoch {epoch}: no training batch (the train split is smaller than "
                               f"train.batch_size x train.num_workers)")
        seconds = time.perf_counter() - t_epoch
        metrics: dict[str, Any] = {"epoch": epoch, "global_step": global_step, "epoch_seconds": seconds,
                                   "images_per_second": steps * cfg.train.batch_size * world / max(seconds, 1e-9)}

        # --- 4. evaluation on the gathered model, expert analysis, checkpoint
        average_norm_statistics(engine.module)
        evaluated = plain if m.enabled else engine.module
        if m.enabled:
            _consolidate(engine.module, plain)
            for layer in _moe_modules(plain).values():
                layer.pop_routing_trace()
        analysis = None
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics.update(evaluate(evaluated))
            if m.enabled:
                traces = _gather_traces({n: layer.pop_routing_trace() for n, layer in _moe_modules(plain).items()},
                                        world)
                if cfg.analysis.enabled and rank == 0:
                    analysis = expert_analysis(traces, m.num_experts, cfg.analysis.stable_threshold)
                    metrics.update(analysis_metrics(analysis))
        if progress is not None:
            progress.epoch_end(epoch, metrics, None)
        probe = _probe(engine.module, probe_images)
        ranks = {"shared_checksum": [c[0] for c in _all_gather_floats([_shared_checksum(engine.module)], device)],
                 "probe_checksum": [c[0] for c in _all_gather_floats([float(probe["pred_logits"].double().sum())],
                                                                     device)]}
        if logger is not None:
            logger.log({k if k == "epoch" or k.startswith("analysis/") else f"epoch/{k}": v
                        for k, v in metrics.items() if isinstance(v, (int, float))}, epoch)
            logger.flush()
        state = {"epoch": epoch, "global_step": global_step, "metrics": metrics, "ranks": ranks,
                 "base_metrics": base_metrics, "step0": step0, "restore_checks": restore_checks,
                 "moe_layers": moe_names, "parameter_counts": run["parameter_counts"]}
        meta = {"name": cfg.model.name, "build_options": run["build_options"], "input_size": cfg.model.input_size,
                "moe": run["moe_meta"], "category_ids": run["category_ids"], "epoch": epoch}
        _report_with_checkpoint(engine, evaluated, rank, state, meta, analysis, {"images": probe_images.cpu(), **probe})
    if logger is not None:
        logger.flush()


def _dense_phase(model, dense_model, criterion, cfg: MoETuneConfig, run: dict[str, Any], stream: _BatchStream,
                 use_gpu: bool, logger, rank: int):
    """Train the dense base from scratch for ``base.dense_steps`` steps (data parallel, DeepSpeed).

    Returns a fresh dense model holding the result (the engine that trained it registered hooks
    on its module; the MoE engine starts from a clean one). Rank 0 stores it in the run storage.
    """
    steps = cfg.base.dense_steps
    engine = _ds_engine(model, cfg, use_gpu, lr=cfg.base.lr, backbone_lr=cfg.base.backbone_lr,
                        warmup_steps=cfg.base.warmup_steps, total_steps=steps, flat_steps=steps, moe=False)
    engine.train()
    done, pass_id = 0, 0
    while done < steps:
        before = done
        for batch in stream.epoch(10_000 + pass_id, steps - done):
            parts = _step(engine, criterion, batch)
            done += 1
            if logger is not None and done % cfg.train.log_every == 0:
                logger.log({"dense/loss": float(parts["loss"]), "dense/lr": engine.get_lr()[0]}, done)
        if done == before:
            raise RuntimeError("dense phase: no training batch (the train split is smaller than "
                               "train.batch_size x train.num_workers)")
        pass_id += 1
    average_norm_statistics(engine.module)
    fresh = dense_model()
    fresh.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILE
            save_tuned_model(fresh, path, {"name": cfg.model.name, "build_options": run["build_options"],
                                           "input_size": cfg.model.input_size, "moe": None,
                                           "dense_steps": steps})
            storage.write_bytes(storage.join(run["run_storage"], "dense_base", MODEL_FILE), path.read_bytes())
    return fresh


def _report_with_checkpoint(engine, evaluated, rank: int, state: dict[str, Any], meta: dict[str, Any],
                            analysis: dict[str, Any] | None, probe: dict[str, torch.Tensor]) -> None:
    """One Ray Train checkpoint: every rank's DeepSpeed files and RNG state, rank 0's shared files."""
    import ray.train

    from distillery.platform.engine.worker import _rng_state

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        engine.save_checkpoint(tmp, tag=DS_TAG)   # every rank: its expert shards (+ non-expert states on rank 0)
        torch.save(_rng_state(), tmp_path / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save({"epoch": state["epoch"], "global_step": state["global_step"]}, tmp_path / EXTRA_STATE)
            torch.save(probe, tmp_path / PROBE_FILE)
            save_tuned_model(evaluated, tmp_path / MODEL_FILE, meta)
            if analysis is not None:
                (tmp_path / ANALYSIS_JSON).write_text(json.dumps(analysis))
            (tmp_path / STATE_JSON).write_text(json.dumps(state, default=float))
        metrics = {k: v for k, v in state["metrics"].items() if isinstance(v, (int, float)) and not
                   (isinstance(v, float) and math.isnan(v))}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
