"""The student's training step, shared by the single-process fit loop and the Ray Train loop.

One function computes every loss of a step (:func:`compute_losses`); how the gradients are
applied (plain optimizer or a DeepSpeed engine, gradient accumulation, clipping) belongs to the
caller, which hands the backward/step over as callables to :func:`train_step`. That keeps one
definition of "a step" for both loops and keeps DeepSpeed out of this package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from .dsi import dsi_loss
from .gam import GAMController

__all__ = ["TOTAL_PARTS", "AuxLoss", "LossTerm", "StepResult", "compute_losses", "dsi_weight_of", "named_grads",
           "train_step"]

AuxLoss = Callable[[nn.Module], "torch.Tensor | None"]  # a job's extra loss, read from the model after its forward


class LossTerm(Protocol):
    """A loss term a job adds to the detection loss (and DSI): called after the forward with the
    (unwrapped) student, its outputs and the step's batch (``images``, ``targets``, and the teacher
    signal when there is one: ``teacher_grid``, ``teacher_mask``). Logged as ``loss_<name>``.

    A new teacher-based term is its own object of this shape, handed to the step by its job
    (``Built.terms`` on the engine, ``terms=`` here): the step, the engine and the other terms
    stay as they are."""

    name: str

    def __call__(self, model: nn.Module, outputs: Mapping[str, Any], batch: Mapping[str, Any]
                 ) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """(the term as logged, what it adds to the total loss), or None when it has nothing this step."""
# The parts of a step that are sums of other parts (logged beside them, not terms of their own).
TOTAL_PARTS = ("loss", "loss_detection")


@dataclass
class StepResult:
    total: torch.Tensor  # the scalar to backpropagate (detection + lambda * DSI)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # detached, for logging

    def as_floats(self) -> dict[str, float]:
        """One host sync for all parts (call it only on logging steps)."""
        names = list(self.parts)
        values = torch.stack([self.parts[n].float() for n in names]).tolist() if names else []
        return dict(zip(names, values))


def compute_losses(model: nn.Module, criterion: nn.Module, images: torch.Tensor, targets: list[dict],
                   *, teacher_grid: torch.Tensor | None = None, teacher_mask: torch.Tensor | None = None,
                   dsi_weight: float = 0.0, aux_loss: AuxLoss | None = None,
                   terms: Sequence[LossTerm] = ()) -> StepResult:
    """Forward the student in train mode and return the weighted losses.

    ``dsi_weight`` is GAM's current lambda; the DSI term is added when a teacher grid is given
    and the model has a DSI projector (``model.dsi``). Without a teacher this is a plain DEIM step.
    ``aux_loss(model)``, read after the forward, adds a job's own weighted term (``loss_aux``;
    e.g. the MoE layers' load-balancing loss, :func:`distillery.students.moe.collect_aux_loss`).
    ``terms`` (:class:`LossTerm`) add theirs after it, in order.
    """
    outputs = model(images, targets)
    det = criterion(outputs, targets)
    total = torch.stack([v for v in det.values()]).sum()
    parts = {k: v.detach() for k, v in det.items()}
    parts["loss_detection"] = total.detach()  # the criterion's terms; "loss" adds DSI and aux (TOTAL_PARTS)
    projector = getattr(_unwrap(model), "dsi", None)
    if teacher_grid is not None and projector is not None:
        loss_dsi = dsi_loss(outputs["f5"], teacher_grid, projector, mask=teacher_mask)
        parts["loss_dsi"] = loss_dsi.detach()
        total = total + float(dsi_weight) * loss_dsi
    aux = aux_loss(_unwrap(model)) if aux_loss is not None else None
    if aux is not None:
        parts["loss_aux"] = aux.detach()
        total = total + aux.to(total.dtype)
    batch = {"images": images, "targets": targets, "teacher_grid": teacher_grid, "teacher_mask": teacher_mask}
    for term in terms:
        out = term(_unwrap(model), outputs, batch)
        if out is not None:
            logged, added = out
            parts[f"loss_{term.name}"] = logged.detach()
            total = total + added.to(total.dtype)
    parts["loss"] = total.detach()
    return StepResult(total, parts)


def dsi_weight_of(gam: GAMController | None, dsi_weight: float | None) -> float:
    """The DSI weight of a step: GAM's current lambda, else the fixed ``dsi_weight``, else 0.

    Refuses both at once (which one would win is not obvious) and a negative or non-finite weight."""
    if gam is not None and dsi_weight is not None:
        raise ValueError("a step takes its DSI weight from a GAM controller or a fixed dsi_weight, not both "
                         "(a fixed weight: GAMController(enabled=False, lambda0=w) or no controller)")
    if gam is not None:
        return gam.current_lambda
    if dsi_weight is None:
        return 0.0
    if not (float(dsi_weight) >= 0.0 and math.isfinite(float(dsi_weight))):
        raise ValueError(f"dsi_weight must be a finite weight >= 0, got {dsi_weight!r}")
    return float(dsi_weight)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def named_grads(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, grad) of every parameter that has a gradient (the GAM meter's input)."""
    for name, p in _unwrap(model).named_parameters():
        if p.grad is not None:
            yield name, p.grad


def train_step(model: nn.Module, criterion: nn.Module, batch: dict, *, backward: Callable[[torch.Tensor], None],
               step: Callable[[], None], gam: GAMController | None = None,
               grads: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
               at_boundary: Callable[[], bool] = lambda: True, aux_loss: AuxLoss | None = None,
               dsi_weight: float | None = None, terms: Sequence[LossTerm] = ()) -> StepResult:
    """One training step on a collated batch (``images``, ``targets``, optional
    ``teacher_grid``/``teacher_mask``).

    ``backward(loss)`` and ``step()`` apply the update (optimizer + clipping, or a DeepSpeed
    engine); ``aux_loss``: see :func:`compute_losses`. At a gradient-accumulation boundary the GAM
    controller reads the gradients (from ``grads()``; default: ``param.grad``) before ``step()``
    consumes them. The DSI weight is GAM's current lambda, or the fixed ``dsi_weight`` (not both;
    neither: 0, the DSI loss is only logged; see :func:`dsi_weight_of`).
    """
    result = compute_losses(model, criterion, batch["images"], batch["targets"],
                            teacher_grid=batch.get("teacher_grid"), teacher_mask=batch.get("teacher_mask"),
                            dsi_weight=dsi_weight_of(gam, dsi_weight), aux_loss=aux_loss, terms=terms)
    backward(result.total)
    if gam is not None and at_boundary():
        gam.accumulate(grads() if grads is not None else named_grads(model))
    step()
    return result
