"""The MoE-tuning job on the training engine (the Ray Train workers of :mod:`~distillery.platform.moe.driver`).

Its phases, builder and hooks, in the order they run:
    1. the engine phase ``dense`` (only without a base checkpoint,
       :mod:`~distillery.platform.moe.dense_phase`): the dense base trained for
       ``base.dense_steps`` steps in engine epochs with checkpoints, saved to the run storage
       (``dense_base/model.safetensors``); the phase ``train`` starts by evaluating the dense base,
       trained or given (``base/AP``);
    2. decomposition: every decoder FFN -> ``copies * granularity`` experts
       (:func:`~distillery.students.open_vocab.moe_tune_decoder`), each layer then mapped onto
       DeepSpeed's MoE layer with Dynamic-DINO's gate and ``ep_size`` expert parallelism
       (:func:`~distillery.platform.moe.expert_parallel.to_deepspeed_moe`); expert parameters get
       their own optimizer groups, so DeepSpeed reduces their gradients over the
       expert-data-parallel group only. The whole detector's outputs on a few val images are
       compared before and after (``moe/step0_max_abs_diff``: 0 up to rounding);
    3. epochs of the engine's step: detection loss (DEIM criterion over the prompt vocabulary)
       plus the MoE layers' weighted load-balancing loss (``loss_aux``);
    4. before evaluation the experts are gathered from all ranks into a plain MoE detector
       (:func:`~distillery.platform.moe.expert_parallel.gather_moe_ffn`), which is evaluated with
       every token's routing recorded for the expert analysis; each checkpoint adds the
       consolidated ``model.safetensors``, the analysis and the raw outputs on the probe images.
    On restore the probe outputs are recomputed after loading and compared with the recorded ones
    (``restore/max_abs_diff``). What one end-of-epoch hook computes for a later one (the evaluated
    model, the probe outputs, the analysis) travels in the engine's ``EpochEnd``; what the job
    keeps across epochs is its record fields and, between the phases, the dense base.

Evaluation runs on the gathered plain model rather than through DeepSpeed's all-to-all: it is the
same function (tested in ``tests/test_moe_deepspeed.py``), needs no lockstep between ranks with
different numbers of val images, and records routing traces.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from distillery.data.augment import Augmenter
from distillery.data.sample import collate
from distillery.platform.config.augment import runtime_augment_config
from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.datasets.coco import load_coco, load_image_resized
from distillery.platform.engine.ingest import rows_to_samples
from distillery.platform.engine.trainer import Built, EpochEnd, Phase, TrainingJob, WorkerContext
from distillery.platform.engine.worker import deepspeed_engine, derived_seed, gather_floats, lockstep, shard_batches
from distillery.platform.io import storage
from distillery.platform.moe.analysis import analysis_metrics, expert_analysis
from distillery.platform.moe.dense_phase import dense_phase, finish_dense_phase
from distillery.platform.moe.expert_parallel import DeepSpeedMoEFFN, gather_moe_ffn, to_deepspeed_moe
from distillery.platform.moe.model_files import build_detector, save_tuned_model, weights_from_bytes
from distillery.platform.moe.spec import (ANALYSIS_JSON, DENSE_PHASE, MODEL_FILE, PROBE_FILE, SPEC, MoETuneRecord,
                                         MoETuneRun)
from distillery.students.criterion import build_criterion, criterion_options
from distillery.students.moe import MoEFFN, collect_aux_loss
from distillery.students.open_vocab import moe_tune_decoder
from distillery.students.optim import build_lr_scheduler, build_param_groups

__all__ = ["MoETuneJob"]

log = logging.getLogger(__name__)


class MoETuneJob(TrainingJob):
    spec = SPEC

    def __init__(self, cfg: MoETuneConfig, run: MoETuneRun, ctx: WorkerContext):
        super().__init__(cfg, run, ctx)
        self.text = torch.tensor(run.text_embeddings, dtype=torch.float32)
        self.dtype = torch.bfloat16 if (ctx.use_gpu and cfg.deepspeed.bf16) else torch.float32
        self.augmenter = Augmenter(runtime_augment_config(cfg.train.augment(), cfg.model.input_size), seed=cfg.train.seed * 1000 + ctx.rank)
        val = load_coco(run.val_annotations, run.val_images, check_images="none")
        self.probe_images = torch.stack([torch.from_numpy(load_image_resized(r.uri, cfg.model.input_size))
                                         for r in val.records[:cfg.train.probe_images]]).float().div_(255.0)
        self.probe_images = self.probe_images.to(ctx.device)
        self.record_fields: dict[str, Any] = {"base_metrics": None, "step0": None, "restore_checks": [],
                                              "moe_layers": [], "parameter_counts": run.parameter_counts}
        self.plain: torch.nn.Module | None = None     # the plain twin evaluation reads the gathered weights into
        self.dense_base: torch.nn.Module | None = None  # the dense phase's result, for the MoE phase's build

    @property
    def input_size(self) -> int:
        return self.cfg.model.input_size

    @property
    def moe(self) -> bool:
        return self.cfg.moe.enabled

    # ------------------------------------------------------------------ build

    def dense_model(self) -> torch.nn.Module:
        r = self.run
        return build_detector(self.cfg.model.name, r.phrases, self.text, self.input_size, r.build_options).to(
            self.ctx.device)

    def criterion(self) -> torch.nn.Module:
        return build_criterion(num_classes=len(self.run.phrases), **criterion_options(self.cfg.model.name))

    def phases(self) -> list[Phase]:
        """``dense`` (without a given base), then ``train``: MoE-tuning (or dense fine-tuning)."""
        tune = Phase("train", self.cfg.train.epochs, self.build, eval_every=self.cfg.train.eval_every)
        return [tune] if self.run.base_uri else [dense_phase(self), tune]

    def end_phase(self, phase: Phase, built: Built) -> None:
        if phase.name == DENSE_PHASE:
            self.dense_base = finish_dense_phase(self, built)

    def build(self, restoring: bool) -> Built:
        """The ``train`` phase: the dense base (given, or the dense phase's), evaluated, decomposed
        into experts; a restored checkpoint holds everything instead."""
        criterion = self.criterion()
        model = self.dense_base if self.dense_base is not None and not restoring else self.dense_model()
        dense_probe = None
        if not restoring:
            if self.dense_base is None:
                model.load_state_dict(weights_from_bytes(storage.read_bytes(self.run.base_uri), self.run.base_uri),
                                      strict=True)
            self._evaluate_base(model)
            dense_probe = probe_outputs(model, self.probe_images) if self.moe else None
        if self.moe:
            self._decompose(model)
        engine = self.engine_for(model, lr=self.cfg.optim.lr, backbone_lr=self.cfg.optim.backbone_lr,
                                 warmup_steps=self.cfg.optim.warmup_steps,
                                 total_steps=self.run.steps_per_epoch * self.cfg.train.epochs,
                                 flat_fraction=self.cfg.optim.flat_fraction, moe=self.moe)
        if dense_probe is not None:
            self._check_step0(engine, dense_probe)
        if self.moe:
            self.plain = build_detector(self.cfg.model.name, self.run.phrases, self.text, self.input_size,
                                        self.run.build_options, {**self.run.moe_meta, "record_routing": True})
            self.plain = self.plain.to(self.ctx.device).eval()
        return Built(engine=engine, criterion=criterion, aux_loss=collect_aux_loss)

    def engine_for(self, model, *, lr: float, backbone_lr: float, warmup_steps: int, total_steps: int,
                   flat_fraction: float, moe: bool):
        """A DeepSpeed engine with AdamW over our groups (expert params in their own groups when
        ``moe``) and a per-step LR schedule."""
        o = self.cfg.optim

        def optimizer_and_scheduler(module):
            groups = build_param_groups(module, lr, backbone_lr, o.weight_decay)
            for g in groups:
                g.pop("param_names")
            if moe:
                groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
            flat = int(flat_fraction * total_steps)
            scheduler = build_lr_scheduler(optimizer, steps_per_epoch=1, epochs=max(total_steps, 1),
                                           flat_epochs=min(flat, total_steps), no_aug_epochs=0,
                                           warmup_steps=warmup_steps, min_ratio=o.min_lr_ratio)
            return optimizer, scheduler

        return deepspeed_engine(model, self.cfg, self.ctx.use_gpu, optimizer_and_scheduler)

    def _evaluate_base(self, model: torch.nn.Module) -> None:
        metrics = self.evaluate(model)
        self.record_fields["base_metrics"] = metrics
        if self.ctx.logger is not None:
            self.ctx.logger.log({f"base/{k}": v for k, v in metrics.items()}, 0)

    def _decompose(self, model: torch.nn.Module) -> None:
        """Decoder FFNs -> MoE layers on DeepSpeed's expert-parallel MoE."""
        m = self.cfg.moe
        torch.manual_seed(self.cfg.train.seed)   # one router init for every rank (DeepSpeed broadcasts it anyway)
        names = moe_tune_decoder(model, m.copies, m.granularity, capacity_factor=m.capacity_factor,
                                 aux_loss_weight=m.aux_loss_weight)
        for name in names:
            layer = model.get_submodule(name)
            layer.linear1 = to_deepspeed_moe(layer.linear1, ep_size=m.ep_size, use_our_gate=m.use_our_gate,
                                             capacity_factor=m.capacity_factor,
                                             eval_capacity_factor=m.eval_capacity_factor,
                                             aux_loss_weight=m.aux_loss_weight).to(self.ctx.device)
        self.record_fields["moe_layers"] = names

    def _check_step0(self, engine, dense_probe: dict[str, torch.Tensor]) -> None:
        """The whole detector through the expert-parallel layers vs the dense one, on every rank."""
        per_rank = self._per_rank(max_abs_diff(probe_outputs(engine.module, self.probe_images), dense_probe))
        self.record_fields["step0"] = {"max_abs_diff": max(per_rank), "per_rank": per_rank}
        if self.ctx.logger is not None:
            self.ctx.logger.log({"moe/step0_max_abs_diff": max(per_rank)}, 0)

    def _per_rank(self, value: float) -> list[float]:
        return [v[0] for v in gather_floats([value], self.ctx.device)]

    # ------------------------------------------------------------------ restore and batches

    def on_restore(self, built: Built, directory: str, record: MoETuneRecord) -> None:
        """Carry the record over; every rank recomputes the recorded probe outputs (an
        expert-parallel forward: all ranks take part) and compares."""
        recorded = torch.load(Path(directory) / PROBE_FILE, map_location="cpu", weights_only=True)
        self.record_fields.update(base_metrics=record.base_metrics, step0=record.step0,
                                  restore_checks=list(record.restore_checks))
        per_rank = self._per_rank(max_abs_diff(probe_outputs(built.engine.module, recorded["images"].to(
            self.ctx.device)), recorded))
        self.record_fields["restore_checks"].append({"phase": record.phase, "epoch": record.epoch,
                                                     "max_abs_diff": max(per_rank), "per_rank": per_rank})
        if max(per_rank) > 1e-4:
            log.warning("outputs after restoring %s differ from the recorded ones by %s (per rank)", directory,
                        per_rank)
        if self.ctx.logger is not None:
            self.ctx.logger.log({"restore/max_abs_diff": max(per_rank)}, record.global_step)

    def step_batches(self, epoch: int, max_steps: int | None = None) -> Iterator[dict[str, Any]]:
        steps = self.micro_steps_per_epoch() if max_steps is None else min(self.micro_steps_per_epoch(), max_steps)
        self.augmenter.rng.seed(derived_seed("augment", self.cfg.train.seed, self.ctx.rank, epoch))  # as distill's
        rows = shard_batches(self.ctx.shard, self.cfg.train, epoch, self.ctx.rank)
        for batch in lockstep(rows, self.ctx.device, steps):
            b = collate(self.augmenter.batch(rows_to_samples(batch, None), 0), f5_hw=None)
            targets = [{k: v.to(self.ctx.device) for k, v in tg.items() if k != "image_id"} for tg in b["targets"]]
            yield {"images": b["images"].to(self.ctx.device, self.dtype), "targets": targets}

    # ------------------------------------------------------------------ epoch end

    def shared_parameters(self, module: torch.nn.Module) -> Iterator[torch.Tensor]:
        """Data parallel outside the experts: each rank holds its own expert shards."""
        return (p for p in module.parameters() if not is_moe_param(p))

    def _experts(self, end: EpochEnd) -> bool:
        """Whether ``end``'s model has experts (the MoE phase of an MoE run)."""
        return self.moe and end.phase.name != DENSE_PHASE

    def before_evaluation(self, built: Built, end: EpochEnd) -> None:
        """With experts: every rank's gathered into the plain twin, which is evaluated and saved."""
        if self._experts(end):
            end.model = consolidate(built.engine.module, self.plain)
            for layer in moe_layers(self.plain).values():
                layer.pop_routing_trace()

    def after_evaluation(self, end: EpochEnd) -> None:
        """The expert analysis of the evaluation's routing (rank 0): its metrics, and ``analysis``."""
        if not (end.evaluating and self._experts(end)):
            return
        traces = gather_traces({n: layer.pop_routing_trace() for n, layer in moe_layers(self.plain).items()},
                               self.ctx.world)
        if self.cfg.analysis.enabled and self.ctx.rank == 0:
            end.outputs["analysis"] = expert_analysis(traces, self.cfg.moe.num_experts,
                                                      self.cfg.analysis.stable_threshold)
            end.metrics.update(analysis_metrics(end.outputs["analysis"]))

    def rank_values(self, built: Built, end: EpochEnd) -> dict[str, float]:
        """The outputs on the probe images (kept as ``probe`` for the checkpoint)."""
        probe = end.outputs["probe"] = probe_outputs(built.engine.module, self.probe_images)
        return {"probe_checksum": float(probe["pred_logits"].double().sum())}

    def record(self, end: EpochEnd, ranks: dict[str, list]) -> MoETuneRecord:
        return MoETuneRecord(epoch=end.epoch, global_step=end.global_step, metrics=end.metrics, ranks=ranks,
                             **self.record_fields)

    def write_files(self, directory: str, built: Built, end: EpochEnd) -> None:
        """Rank 0: the probe outputs, the evaluated (consolidated) model, the expert analysis."""
        if self.ctx.rank != 0:
            return
        directory = Path(directory)
        torch.save({"images": self.probe_images.cpu(), **end.outputs["probe"]}, directory / PROBE_FILE)
        r = self.run
        save_tuned_model(end.model, directory / MODEL_FILE,
                         {"name": self.cfg.model.name, "build_options": r.build_options, "input_size": self.input_size,
                          "moe": r.moe_meta if self._experts(end) else None, "category_ids": r.category_ids,
                          "phase": end.phase.name, "epoch": end.epoch})
        if "analysis" in end.outputs:
            (directory / ANALYSIS_JSON).write_text(json.dumps(end.outputs["analysis"]))

    def metric_name(self, key: str) -> str:
        return key if key == "epoch" or key.startswith("analysis/") else f"epoch/{key}"


# ---------------------------------------------------------------------- model helpers

def moe_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (MoEFFN, DeepSpeedMoEFFN))}


def gather_traces(traces: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Every rank's routing traces of its val shard, concatenated in rank order."""
    if not (dist.is_initialized() and world > 1):
        return traces
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, {k: v.numpy() for k, v in traces.items()})
    return {k: torch.cat([torch.from_numpy(p[k]) for p in parts]) for k in traces}


@torch.no_grad()
def probe_outputs(module: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode outputs on the probe images (a collective for an expert-parallel model: all ranks call)."""
    was = module.training
    module.eval()
    try:
        out = module(images.to(next(module.parameters()).dtype))
    finally:
        module.train(was)
    return {k: out[k].detach().float().cpu() for k in ("pred_logits", "pred_boxes")}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in ("pred_logits", "pred_boxes"))


def consolidate(module: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """Copy ``module``'s weights into the plain detector ``plain``, gathering every rank's experts.

    A collective over each expert-parallel group: every rank calls it, in the same order.
    """
    ds_layers = {n: m for n, m in module.named_modules() if isinstance(m, DeepSpeedMoEFFN)}
    state = {k: v for k, v in module.state_dict().items()
             if not any(k.startswith(prefix + ".") for prefix in ds_layers)}
    for prefix, layer in ds_layers.items():
        gathered = gather_moe_ffn(layer)
        state.update({f"{prefix}.{k}": v for k, v in gathered.state_dict().items()})
    plain.load_state_dict(state, strict=True)
    return plain
