"""A minimal single-process training loop for a student, in plain PyTorch, and batch prediction.

What it adds around :func:`~.training.train_step` (the one definition of a step, shared with the
Ray Train loop): AdamW with the recipe's parameter groups (:func:`~.optim.build_optimizer`), the
flat-cosine schedule (:func:`~.optim.build_lr_scheduler`), gradient clipping, an EMA of the
weights (:class:`~.ema.ModelEMA`) and, when given, a GAM controller that reads the gradients each
step and updates the DSI weight at each epoch's end. Used by tests, benchmarks and quick CPU
experiments; the distributed loop is ``distillery.platform.engine.trainer``.

A batch is what :func:`distillery.data.sample.collate` produces: a dict with ``images``
(B, 3, H, W) float in [0, 1], ``targets`` (list of ``{"labels", "boxes"}``, boxes normalised
cxcywh) and, for DSI, ``teacher_grid`` (B, C_t, h, w) and optionally ``teacher_mask``.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .ema import ModelEMA
from .gam import GAMController
from .optim import build_lr_scheduler, build_optimizer
from .postprocess import postprocess
from .training import AuxLoss, LossTerm, StepResult, dsi_weight_of, train_step

__all__ = ["FitResult", "fit", "make_step", "predict"]


def _to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (targets too; non-tensor target entries are dropped)."""
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["targets"] = [{k: v.to(device) for k, v in t.items() if isinstance(v, torch.Tensor)}
                      for t in batch["targets"]]
    return out


def make_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, *,
              scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, clip_max_norm: float = 0.1,
              ema: ModelEMA | None = None, gam: GAMController | None = None, dsi_weight: float | None = None,
              autocast_dtype: torch.dtype | None = None, aux_loss: AuxLoss | None = None,
              terms: Sequence[LossTerm] = ()) -> Callable[[dict], StepResult]:
    """``step(batch) -> StepResult``: one optimizer step of :func:`~.training.train_step` with a
    plain optimizer (backward, GAM reads the gradients, clip, update, schedule, EMA). ``aux_loss``:
    a job's extra loss read from the model after its forward (e.g.
    :func:`~.moe.collect_aux_loss`, the MoE load-balancing loss); ``terms``: further loss terms
    (:class:`~.training.LossTerm`).

    The DSI weight is ``gam.current_lambda`` with a GAM controller, else the fixed ``dsi_weight``
    (default 0). A step whose batch has a teacher grid while the weight is 0 computes and logs
    ``loss_dsi`` without training on it: the first such step warns (once per ``make_step``).
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on CUDA) runs the forward and the losses under
    autocast; the weights and the optimizer stay in float32.
    """
    device = next(model.parameters()).device
    dsi_weight_of(gam, dsi_weight)  # refuse a bad weight (or both) before the first step
    warned = False

    def backward(loss: torch.Tensor) -> None:
        # Autocast covers the forward and the losses only (as PyTorch's AMP recipe asks).
        with torch.autocast(device.type, enabled=False):
            loss.backward()

    def apply_update() -> None:
        with torch.autocast(device.type, enabled=False):
            if clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def step(batch: dict) -> StepResult:
        model.train()
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        nonlocal warned
        weight = dsi_weight_of(gam, dsi_weight)
        with autocast:
            result = train_step(model, criterion, _to_device(batch, device), backward=backward,
                                step=apply_update, gam=gam, dsi_weight=dsi_weight, aux_loss=aux_loss, terms=terms)
        if weight == 0.0 and "loss_dsi" in result.parts and not warned:
            warned = True
            source = "GAM's lambda is 0" if gam is not None else f"dsi_weight is {dsi_weight}"
            warnings.warn(f"the batches carry teacher grids and loss_dsi is computed and logged, but {source}: "
                          "the student is NOT being distilled (pass dsi_weight=<w> or a GAM controller)",
                          UserWarning, stacklevel=2)
        if ema is not None:
            ema.update(model)
        return result

    return step


@dataclass
class FitResult:
    """What :func:`fit` leaves behind: the per-step log, the EMA, the GAM controller."""

    history: list[dict] = field(default_factory=list)  # per logged step: step, lr (base), lambda, losses
    ema: ModelEMA | None = None
    gam: GAMController | None = None
    optimizer: torch.optim.Optimizer | None = None
    seconds: float = 0.0


def fit(model: nn.Module, criterion: nn.Module, batches: Iterable[dict], *, steps: int, lr: float = 1e-3,
        backbone_lr: float | None = None, weight_decay: float = 1e-4, warmup_steps: int = 0,
        flat_steps: int | None = None, min_lr_ratio: float = 0.5, clip_max_norm: float = 0.1,
        ema_decay: float | None = 0.9999, ema_warmups: int = 1000, gam: GAMController | None = None,
        steps_per_epoch: int | None = None, log_every: int = 1, dsi_weight: float | None = None,
        autocast_dtype: torch.dtype | None = None, aux_loss: AuxLoss | None = None,
        terms: Sequence[LossTerm] = (), on_epoch_end: Callable[[int, FitResult], None] | None = None) -> FitResult:
    """Train ``model`` for ``steps`` optimizer steps on the first ``steps`` batches of ``batches``.

    Optimizer: AdamW over the recipe's parameter groups (backbone at ``backbone_lr``, default
    ``lr``; normalisation parameters without weight decay). Schedule: flat-cosine, warm-up for
    ``warmup_steps``, flat until ``flat_steps`` (default: the whole run, a constant rate), then
    cosine down to ``min_lr_ratio`` x the base rate at the last step. ``ema_decay=None``: no EMA.

    GAM: with ``gam`` given, each step's DSI weight is ``gam.current_lambda`` and every
    ``steps_per_epoch`` steps (default: all ``steps`` are one epoch) ``gam.end_epoch`` updates it;
    the steps of an unfinished last epoch stay in the controller (its state dict keeps them).
    Without ``gam`` the DSI weight is the fixed ``dsi_weight`` (the "DSI, fixed lambda" setting);
    without either it is 0: the DSI loss of a batch with a teacher grid is computed and logged but
    not trained on, which warns once, and every logged step with a ``loss_dsi`` says whether it
    trained on it (``dsi_trained``). Each logged step's ``lambda`` is the weight it used.

    ``aux_loss``, ``terms``: see :func:`make_step`. ``on_epoch_end(epoch, result)`` (0-based epoch) runs after
    every ``steps_per_epoch`` steps, after GAM's update: the place to evaluate
    (``result.ema.module``) or record per-epoch numbers.
    """
    if steps < 1:
        raise ValueError(f"fit: steps must be >= 1, got {steps}")
    steps_per_epoch = steps if steps_per_epoch is None else int(steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"fit: steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if log_every < 1:
        raise ValueError(f"fit: log_every must be >= 1, got {log_every}")
    flat_steps = steps if flat_steps is None else int(flat_steps)
    if not 0 <= flat_steps <= steps:
        raise ValueError(f"fit: flat_steps must be in [0, steps={steps}], got {flat_steps}")

    optimizer = build_optimizer(model, lr=lr, backbone_lr=lr if backbone_lr is None else backbone_lr,
                                weight_decay=weight_decay)
    # Per-step schedule (steps_per_epoch=1: the "epochs" below are steps).
    scheduler = build_lr_scheduler(optimizer, steps_per_epoch=1, epochs=steps, flat_epochs=flat_steps,
                                   no_aug_epochs=0, warmup_steps=warmup_steps, min_ratio=min_lr_ratio)
    ema = ModelEMA(model, decay=ema_decay, warmups=ema_warmups) if ema_decay is not None else None
    step = make_step(model, criterion, optimizer, scheduler=scheduler, clip_max_norm=clip_max_norm, ema=ema,
                     gam=gam, dsi_weight=dsi_weight, autocast_dtype=autocast_dtype, aux_loss=aux_loss, terms=terms)

    # The logged rate is the base one (the backbone group may run at its own rate).
    base_group = next((g for g in optimizer.param_groups if g["name"] != "backbone"), optimizer.param_groups[0])
    result = FitResult(ema=ema, gam=gam, optimizer=optimizer)
    start = time.perf_counter()
    taken = 0
    for index, batch in enumerate(itertools.islice(batches, steps)):
        lr_now = base_group["lr"]
        lam = dsi_weight_of(gam, dsi_weight)
        out = step(batch)
        taken = index + 1
        if taken % log_every == 0 or taken == steps:
            # as_floats() is the one host sync of a logged step.
            row = {"step": taken, "lr": lr_now, "lambda": lam, **out.as_floats()}
            if "loss_dsi" in row:
                row["dsi_trained"] = lam > 0.0
            result.history.append(row)
        if taken % steps_per_epoch == 0:
            if gam is not None:
                gam.end_epoch(taken // steps_per_epoch - 1)
            if on_epoch_end is not None:
                on_epoch_end(taken // steps_per_epoch - 1, result)
    if taken < steps:
        raise ValueError(f"fit: batches ran out after {taken} of {steps} steps (pass an endless iterator)")
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, orig_sizes: torch.Tensor | Sequence[Sequence[float]],
            num_top: int = 100, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Detections per image: ``{"scores", "labels", "boxes"}`` with boxes xyxy in the original
    image's pixels (``orig_sizes`` rows are ``(w, h)``), ``labels`` the model's contiguous ids.

    The model runs in eval mode (restored afterwards) on ``images`` (N, 3, H, W) float in [0, 1].
    """
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32)
    if sizes.shape != (images.shape[0], 2):
        raise ValueError(f"predict: orig_sizes must be (N, 2) = ({images.shape[0]}, 2) rows of (w, h), "
                         f"got {tuple(sizes.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[dict[str, torch.Tensor]] = []
    try:
        for start in range(0, images.shape[0], batch_size):
            out = model(images[start:start + batch_size].to(device))
            results += postprocess(out["pred_logits"].float(), out["pred_boxes"].float(),
                                   sizes[start:start + batch_size].to(device), num_top=num_top)
    finally:
        model.train(was_training)
    return [{k: v.cpu() for k, v in r.items()} for r in results]
