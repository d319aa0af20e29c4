"""The distillation job on the training engine: a DINOv3 teacher distilled into an RT-DETRv4 /
DEIMv2 / AdaRoute student (``student.name`` selects it) with DSI + GAM, DEIM's augmentation
schedule and an EMA of the weights (what is evaluated and exported).

GAM is this job's: its controller reads the gradients in the step (:meth:`DistillJob.train_step`),
updates lambda at the epoch end (:meth:`DistillJob.end_of_epoch`) and is saved in every checkpoint
as the component ``gam``. The loop is the engine's
(:class:`~distillery.platform.engine.trainer.Trainer`), which loads this class from
:data:`~distillery.platform.distill.spec.SPEC`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import torch
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from distillery.data.augment import Augmenter
from distillery.data.sample import collate
from distillery.platform.config.augment import runtime_augment_config
from distillery.platform.config.distill import DistillConfig
from distillery.platform.engine.ingest import rows_to_samples
from distillery.platform.distill.teacher_signal import teacher_signal
from distillery.platform.distill.preview import log_augment_preview
from distillery.platform.distill.spec import SPEC, DistillRecord, DistillRun
from distillery.platform.engine.trainer import Built, EpochEnd, TrainingJob, WorkerContext, engine_step
from distillery.platform.engine.worker import (deepspeed_engine, derived_seed, lockstep, shard_batches,
                                               sum_across_ranks)
from distillery.platform.io import storage
from distillery.platform.io.weights_source import student_weight_kwargs, weights_file_errors
from distillery.platform.serving.predict import MODEL_JSON
from distillery.students import RTDETRv4Criterion, build_criterion, build_student
from distillery.students.ema import ModelEMA
from distillery.students.gam import GAMController
from distillery.students.optim import build_lr_scheduler, build_optimizer
from distillery.students.training import StepResult

__all__ = ["DistillJob"]

log = logging.getLogger(__name__)


class DistillJob(TrainingJob):
    spec = SPEC

    def __init__(self, cfg: DistillConfig, run: DistillRun, ctx: WorkerContext):
        super().__init__(cfg, run, ctx)
        self.teacher = teacher_signal(cfg)
        self.augmenter = Augmenter(runtime_augment_config(cfg.augment, cfg.student.input_size), seed=cfg.train.seed * 1000 + ctx.rank)
        self.views = self.teacher.cache_views(self.augmenter.cfg)
        self.view_samples, self.samples_seen = 0, 0
        self.monitor: SystemMetricsMonitor | None = None
        self.preview_due = False
        self.gam: GAMController | None = None
        self.criterion: RTDETRv4Criterion | None = None

    @property
    def input_size(self) -> int:
        return self.cfg.student.input_size

    # ------------------------------------------------------------------ build

    def build(self, restoring: bool) -> Built:
        cfg, run, ctx = self.cfg, self.run, self.ctx
        model = self._student()
        if ctx.rank == 0:
            self._describe_run(model)
        engine = deepspeed_engine(model, cfg, ctx.use_gpu, self._optimizer_and_scheduler)
        self.model_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        ema = ModelEMA(engine.module, decay=cfg.optim.ema_decay, warmups=cfg.optim.ema_warmups)
        g = run.gam
        gam = GAMController(lambda0=g.lambda0, rho=g.rho, delta=g.delta, default_weight=g.default_weight,
                            stop_epoch=g.stop_epoch, rule=g.rule, enabled=g.enabled) \
            if run.teacher_dim is not None else None
        self.gam = gam
        self.teacher.start(ctx.device, run.teacher_dtype)
        self.preview_due = (ctx.rank == 0 and not restoring and cfg.tracking.augment_preview > 0
                            and self.teacher.previews)
        self._start_system_metrics()
        # The size's official losses and matcher change (criterion_options), the recipe's criterion section on top.
        self.criterion = build_criterion(num_classes=run.num_classes, **cfg.criterion_options())
        return Built(engine=engine, criterion=self.criterion, ema=ema,
                     components={"gam": gam} if gam is not None else {})

    def _student(self) -> torch.nn.Module:
        cfg, run = self.cfg, self.run
        with weights_file_errors():  # a weights file that does not fit fails the same on every retry
            return build_student(cfg.student.name, num_classes=run.num_classes,
                                 eval_spatial_size=cfg.student.input_size,
                                 dsi=run.teacher_dim is not None, teacher_dim=run.teacher_dim,
                                 peft=cfg.student.peft.kwargs(),
                                 **student_weight_kwargs(cfg.student, run.categories["names"]),
                                 **cfg.student.overrides)

    def _optimizer_and_scheduler(self, model: torch.nn.Module):
        o = self.cfg.optim
        optimizer = build_optimizer(model, lr=o.lr, backbone_lr=o.backbone_lr, weight_decay=o.weight_decay,
                                    betas=o.betas, **o.param_group_rules(self.cfg.student.name))
        scheduler = build_lr_scheduler(optimizer, steps_per_epoch=self.run.steps_per_epoch,
                                       epochs=self.cfg.train.epochs, flat_epochs=o.flat_epochs,
                                       no_aug_epochs=o.no_aug_epochs, warmup_steps=o.warmup_steps,
                                       min_ratio=o.min_lr_ratio, indexing="official")
        return optimizer, scheduler

    def _describe_run(self, model: torch.nn.Module) -> None:
        """Rank 0: what loading student.weights did, and what jobs/predict.py needs to rebuild the
        student from the run storage."""
        cfg, run = self.cfg, self.run
        if getattr(model, "weights_report", None) is not None:
            self._record_weights_report(model.weights_report)
        storage.write_text(storage.join(run.run_storage, MODEL_JSON), json.dumps(
            {"student": cfg.student.name, "input_size": cfg.student.input_size, "overrides": cfg.student.overrides,
             "peft": cfg.student.peft.kwargs(), "categories": run.categories}, indent=1))

    def _record_weights_report(self, report) -> None:
        """Re-initialised class tensors and kept rows: the log and the MLflow run (tags for the
        counts, weights_report.json for the names)."""
        log.info("student.weights: %s", report.summary())
        if not self.run.run_id:
            return
        client, run_id = MlflowClient(self.run.tracking_uri), self.run.run_id
        summary = report.as_dict()
        for key in ("layout", "loaded", "num_reinitialised", "checkpoint_num_classes", "model_num_classes"):
            client.set_tag(run_id, f"distillery.weights.{key}", str(summary[key]))
        client.set_tag(run_id, "distillery.weights.class_rows_copied", str(len(report.class_rows_copied)))
        client.log_dict(run_id, summary, "weights_report.json")

    def _start_system_metrics(self) -> None:
        if self.ctx.logger is None or not self.cfg.tracking.system_metrics:
            return
        try:
            self.monitor = SystemMetricsMonitor(self.run.run_id, sampling_interval=5, samples_before_logging=1,
                                                tracking_uri=self.run.tracking_uri)
            self.monitor.start()
        except Exception as exc:  # system metrics are nice to have, never a reason to fail
            log.warning("system metrics disabled: %s", exc)

    def start_metrics(self, built: Built) -> dict[str, float]:
        """What trains (PEFT freezes the ViT backbone) vs what is deployed."""
        module = built.engine.module
        return {"model/params_total": float(sum(p.numel() for p in module.parameters())),
                "model/params_trainable": float(sum(p.numel() for p in module.parameters() if p.requires_grad)),
                "model/params_inference": float(module.num_inference_parameters())}

    # ------------------------------------------------------------------ batches

    def step_batches(self, epoch: int, max_steps: int | None = None) -> Iterator[dict[str, Any]]:
        self.criterion.set_epoch(epoch)  # the epoch start: DEIMv2's matcher change reads it
        return self._epoch_batches(epoch, max_steps)

    def _epoch_batches(self, epoch: int, max_steps: int | None) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        limit = cfg.debug.max_steps_per_epoch
        if limit is not None:
            limit *= cfg.deepspeed.gradient_accumulation_steps
            max_steps = limit if max_steps is None else min(limit, max_steps)
        self.view_samples, self.samples_seen = 0, 0
        # Mosaic and Mixup partners, crops, flips, multi-scale sizes: drawn per (seed, rank, epoch).
        self.augmenter.rng.seed(derived_seed("augment", cfg.train.seed, self.ctx.rank, epoch))
        rows = shard_batches(self.ctx.shard, cfg.train, epoch, self.ctx.rank)
        for batch in lockstep(rows, self.ctx.device, max_steps):
            yield self._step_batch(batch, epoch)

    def _step_batch(self, batch, epoch: int) -> dict[str, Any]:
        cfg, augmenter = self.cfg, self.augmenter
        # Cached views serve the strong-augmentation epochs only: one view per image and epoch,
        # chosen from (seed, epoch, image id) alone, so ranks and restarts agree.
        view_epoch = epoch - augmenter.cfg.policy_epochs[0] if self.views > 1 and augmenter.strong(epoch) else None
        plain_or_views = rows_to_samples(batch, self.run.cache_meta, view_epoch=view_epoch, seed=cfg.train.seed)
        self.view_samples += sum(s.view > 0 for s in plain_or_views)
        self.samples_seen += len(plain_or_views)
        if self.preview_due:
            self.preview_due = False
            log_augment_preview(plain_or_views, augmenter, cfg.tracking.augment_preview, cfg.train.seed,
                                self.run, self.ctx.logger)
        samples = augmenter.batch(plain_or_views, epoch)
        b = collate(samples, f5_hw=None)
        images = b["images"].to(self.ctx.device)
        targets = [{k: v.to(self.ctx.device) for k, v in t.items() if k != "image_id"} for t in b["targets"]]
        return {"images": images.to(self.model_dtype), "targets": targets,
                **self.teacher.batch_inputs(samples, images)}

    def train_step(self, built: Built, batch: dict[str, Any]) -> StepResult:
        """The engine's step, with GAM reading this rank's gradients at accumulation boundaries."""
        return engine_step(built.engine, built.criterion, batch, gam=self.gam)

    def step_values(self) -> dict[str, float]:
        return {"lambda": self.gam.current_lambda} if self.gam is not None else {}

    # ------------------------------------------------------------------ epoch end

    def end_of_epoch(self, epoch: int) -> dict[str, Any]:
        """GAM's rank-synchronous update (one all-reduce of the epoch's norm sums) and its metrics."""
        gam = self.gam
        if gam is None:
            return {}
        lam_before = gam.current_lambda
        out: dict[str, Any] = {"lambda": gam.end_epoch(epoch, all_reduce=sum_across_ranks),
                               "lambda_before": lam_before}
        if gam.history:
            out["aifi_ratio"] = gam.history[-1].get("ratio", 0.0)
            for name, share in (gam.last_shares or {}).items():
                out[f"share_{name}"] = share
        return out

    def rank_values(self, built: Built, end: EpochEnd) -> dict[str, float]:
        """GAM's lambda, which every rank must agree on."""
        return {"lambda": float(self.gam.current_lambda)} if self.gam is not None else {}

    def after_evaluation(self, end: EpochEnd) -> None:
        if self.views > 1:  # this rank's share of samples served by an exact cached view
            end.metrics["cached_view_fraction"] = self.view_samples / max(self.samples_seen, 1)

    def record(self, end: EpochEnd, ranks: dict[str, list]) -> DistillRecord:
        gam = self.gam
        return DistillRecord(epoch=end.epoch, global_step=end.global_step, metrics=end.metrics, ranks=ranks,
                             gam_history=gam.history if gam is not None else [])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
