"""The teacher-pretraining job on the training engine (the Ray Train workers of
:mod:`~distillery.platform.teacher_pretrain.driver`).

1. build: the timm DINOv3 ViT as the frozen teacher builds it (``model.seed``, or
   ``model.init_weights``), run with Meta's bf16-rounded RoPE periods so that its Meta-layout
   file loads back into the same model; a linear patch head; AdamW and the warm-up + cosine
   schedule of the one-process builder, in a DeepSpeed engine. A fresh run evaluates the model
   once before training (``initial/*``, kept in every checkpoint's record);
2. each step: the ingest's images resized to the teacher's input with their per-patch classes
   (:mod:`.patch_data`), random flips, the dense objective
   (:func:`~distillery.teachers.dense_pretrain.dense_patch_loss`) through the engine's step;
3. each epoch: the evaluation (rank 0, sent to the others): a linear probe of the frozen patch
   features fitted on the first ``eval.probe_images`` train images and scored on the val split
   (``balanced_accuracy``, the spec's best metric; ``accuracy``), and the trained head's own
   balanced accuracy on the val split; every checkpoint adds the ViT in Meta's layout (``teacher.pth``).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distillery.platform.engine.trainer import Built, EpochEnd, TrainingJob, WorkerContext
from distillery.platform.engine.worker import deepspeed_engine, derived_seed, lockstep, shard_batches
from distillery.platform.io.weights_source import resolve_weights_source
from distillery.platform.teacher_pretrain.config import TeacherPretrainConfig
from distillery.platform.teacher_pretrain.patch_data import batch_patches, load_patch_split
from distillery.platform.teacher_pretrain.spec import SPEC, TEACHER_FILE, TeacherPretrainRecord, TeacherPretrainRun
from distillery.teachers.dense_pretrain import (balanced_accuracy, dense_lr_factor, dense_param_groups,
                                                dense_patch_logits, dense_patch_loss, linear_probe, random_flips)
from distillery.teachers.dinov3 import IMAGENET_MEAN, IMAGENET_STD, build_dinov3_vit, normalise_and_pool, patch_grid
from distillery.teachers.dinov3_weights import load_teacher_weights, set_rope_periods, to_meta_state_dict

__all__ = ["DensePatchCriterion", "DensePatchModel", "TeacherPretrainJob", "build_vit", "probe_metrics"]


def build_vit(cfg: TeacherPretrainConfig, load_weights: bool = True) -> nn.Module:
    """The ViT to train: built as the teacher builds it, from ``model.init_weights`` when given,
    with bf16-rounded RoPE periods (as :func:`~distillery.teachers.dense_pretrain.train_dense_teacher`)."""
    m = cfg.model
    vit = build_dinov3_vit(m.model_name, m.model_kwargs, seed=m.seed)
    if m.init_weights and load_weights:
        load_teacher_weights(vit, resolve_weights_source(m.init_weights)[0])
    set_rope_periods(vit, vit.rope.periods.to(torch.bfloat16).float())
    return vit


class DensePatchModel(nn.Module):
    """The ViT and its per-patch head: ``forward`` gives the head's logits (the engine's step);
    :meth:`features` the teacher's frozen patch grid (what the distillation reads)."""

    def __init__(self, vit: nn.Module, head: nn.Linear, input_size: int, pool: int, grid: int):
        super().__init__()
        self.vit, self.head, self.input_size, self.pool, self.grid = vit, head, input_size, pool, grid
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, targets: Any = None) -> dict[str, torch.Tensor]:
        return {"logits": dense_patch_logits(self.vit, self.head, images, self.mean, self.std, self.pool, self.grid)}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N, C, grid, grid) float32 patch grids of (N, 3, S, S) uint8 images (on this model's device)."""
        device, dtype = self.mean.device, next(self.vit.parameters()).dtype
        out = []
        for i in range(0, len(images), batch_size):
            x = normalise_and_pool(images[i:i + batch_size].to(device).float().div(255.0), self.mean, self.std,
                                   self.pool)
            out.append(patch_grid(self.vit, x.to(dtype), (self.grid, self.grid)).float().cpu())
        return torch.cat(out)


class DensePatchCriterion(nn.Module):
    """The dense objective as the engine's criterion: ``{"loss_patch": ...}``."""

    def __init__(self, class_weights: list[float]):
        super().__init__()
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))

    def forward(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss_patch": dense_patch_loss(outputs["logits"].float(), targets, self.class_weights)}


def probe_metrics(model: DensePatchModel, probe: tuple[torch.Tensor, torch.Tensor],
                  val: tuple[torch.Tensor, torch.Tensor], num_classes: int, *, probe_steps: int,
                  batch_size: int) -> dict[str, float]:
    """The job's evaluation of ``model``: a linear probe of its frozen patch features (fitted on
    ``probe``, scored on ``val``: ``balanced_accuracy``, ``accuracy``, ``probe_train_balanced_accuracy``)
    and its own head's ``head_balanced_accuracy`` on ``val``."""
    was = model.training
    model.eval()
    try:
        val_features = model.features(val[0], batch_size)
        result = linear_probe(model.features(probe[0], batch_size), probe[1], val_features, val[1], num_classes,
                              steps=probe_steps)
        with torch.no_grad():
            patches = val_features.permute(0, 2, 3, 1).reshape(-1, val_features.shape[1])
            predicted = F.linear(patches, model.head.weight.float().cpu(), model.head.bias.float().cpu()).argmax(1)
    finally:
        model.train(was)
    return {"balanced_accuracy": result["balanced_accuracy"], "accuracy": result["accuracy"],
            "probe_train_balanced_accuracy": result["train_balanced_accuracy"],
            "head_balanced_accuracy": balanced_accuracy(predicted, val[1].reshape(-1), num_classes)}


class TeacherPretrainJob(TrainingJob):
    spec = SPEC

    def __init__(self, cfg: TeacherPretrainConfig, run: TeacherPretrainRun, ctx: WorkerContext):
        super().__init__(cfg, run, ctx)
        self.dtype = torch.bfloat16 if (ctx.use_gpu and cfg.deepspeed.bf16) else torch.float32
        m = cfg.model
        self.teacher_keys = {"model_name": m.model_name, "model_kwargs": dict(m.model_kwargs),
                             "input_size": m.input_size, "pool": m.pool}
        self.initial_metrics: dict[str, float] | None = None
        self._eval_sets: tuple | None = None   # (probe, val) images and labels, loaded on first use

    @property
    def input_size(self) -> int:
        return self.cfg.model.input_size

    def build(self, restoring: bool) -> Built:
        cfg, run = self.cfg, self.run
        vit = build_vit(cfg, load_weights=not restoring)   # a restored checkpoint holds the weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.model.seed + 2)
            head = nn.Linear(int(vit.embed_dim), run.num_classes)
        model = DensePatchModel(vit, head, cfg.model.input_size, cfg.model.pool, run.grid).to(self.ctx.device)
        o, total = cfg.optim, max(run.steps_per_epoch * cfg.train.epochs, 1)

        def optimizer_and_scheduler(module: DensePatchModel):
            optimizer = torch.optim.AdamW(dense_param_groups(module.vit, module.head, o.weight_decay), lr=o.lr,
                                          betas=tuple(o.betas))
            return optimizer, torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: dense_lr_factor(s, total, o.warmup_steps))

        engine = deepspeed_engine(model, cfg, self.ctx.use_gpu, optimizer_and_scheduler)
        if not restoring:
            self.initial_metrics = self.evaluate(engine.module)
            if self.ctx.logger is not None:
                self.ctx.logger.log({f"initial/{k}": v for k, v in self.initial_metrics.items()}, 0)
        return Built(engine=engine, criterion=DensePatchCriterion(run.class_weights).to(self.ctx.device))

    def on_restore(self, built: Built, directory: str, record: TeacherPretrainRecord) -> None:
        self.initial_metrics = record.initial_metrics

    def step_batches(self, epoch: int, max_steps: int | None = None) -> Iterator[dict[str, Any]]:
        cfg, ctx = self.cfg, self.ctx
        micro_steps = max_steps if max_steps is not None else self.micro_steps_per_epoch()
        flips = torch.Generator().manual_seed(derived_seed("flip", cfg.train.seed, ctx.rank, epoch))
        rows = shard_batches(ctx.shard, cfg.train, epoch, ctx.rank)
        for batch in lockstep(rows, ctx.device, micro_steps):
            images, labels = batch_patches(batch, self.input_size, self.run.grid)
            images = images.float().div_(255.0)
            if cfg.train.flip:
                images, labels = random_flips(images, labels, flips)
            yield {"images": images.to(ctx.device, self.dtype), "targets": labels.to(ctx.device)}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """:func:`probe_metrics` on rank 0, sent to every rank."""
        metrics: dict[str, float] = {}
        if self.ctx.rank == 0:
            if self._eval_sets is None:
                r, e = self.run, self.cfg.eval
                self._eval_sets = (load_patch_split(r.probe_annotations, r.probe_images, self.input_size, r.grid,
                                                    e.probe_images),
                                   load_patch_split(r.val_annotations, r.val_images, self.input_size, r.grid))
            metrics = probe_metrics(model, *self._eval_sets, self.run.num_classes,
                                    probe_steps=self.cfg.eval.probe_steps, batch_size=self.cfg.train.eval_batch_size)
        if dist.is_initialized() and self.ctx.world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def record(self, end: EpochEnd, ranks: dict[str, list]) -> TeacherPretrainRecord:
        return TeacherPretrainRecord(epoch=end.epoch, global_step=end.global_step, metrics=end.metrics, ranks=ranks,
                                     initial_metrics=self.initial_metrics, teacher=self.teacher_keys)

    def write_files(self, directory: str, built: Built, end: EpochEnd) -> None:
        """Rank 0: the ViT in Meta's layout (float32 weights whatever the engine ran in)."""
        if self.ctx.rank != 0:
            return
        state = {k: (v.float() if v.is_floating_point() and k != "rope_embed.periods" else v)
                 for k, v in to_meta_state_dict(built.engine.module.vit).items()}
        torch.save(state, f"{directory}/{TEACHER_FILE}")
