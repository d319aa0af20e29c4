"""Exponential moving average of a model's weights, with the ramped decay of the RT-DETR family.

The averaged copy is what gets evaluated and exported. The decay ramps up with the number of
updates, ``d(n) = decay * (1 - exp(-n / warmups))``, so the first updates follow the fast-moving
early weights instead of anchoring the average to the random initialisation. Every floating
point entry of the state dict is averaged (parameters and buffers such as BatchNorm running
statistics); integer buffers (``num_batches_tracked``) are copied.

Defaults are the official recipe's (``configs/base/optimizer.yml``: decay 0.9999,
warmups 1000, start 0), not the 2000 of the older ``ExponentialMovingAverage`` helper there.
The official training loop changes ``decay`` between stages (``ema_restart_decay`` at
``stop_epoch``); ``decay`` is a plain attribute and is part of the state dict so that survives a
resume.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

__all__ = ["ModelEMA", "ema_decay", "unwrap_model"]


def ema_decay(updates: int, decay: float, warmups: int) -> float:
    """The decay used at update number ``updates`` (1-based)."""
    if warmups <= 0:
        return decay
    return decay * (1.0 - math.exp(-updates / warmups))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / a DeepSpeed engine / torch.compile.

    A wrapper is recognised by behaviour, not by class (so this module needs no DeepSpeed
    import): it holds the wrapped model as ``.module`` (``._orig_mod`` for torch.compile) and
    owns no parameter or buffer of its own.
    """
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        inner_state = set(map(id, inner.parameters())) | set(map(id, inner.buffers()))
        outer_state = set(map(id, model.parameters())) | set(map(id, model.buffers()))
        if outer_state != inner_state:
            return model  # a real model that happens to have a child called "module"
        model = inner


class ModelEMA:
    """EMA of ``model``'s state dict; :attr:`module` is the averaged copy (eval mode, no grads)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 1000, start: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in (0, 1), got {decay}")
        if warmups < 0 or start < 0:
            raise ValueError(f"ModelEMA: warmups and start must be >= 0, got {warmups}, {start}")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmups = int(warmups)
        self.start = int(start)
        self.updates = 0  # averaging updates made
        self.skipped = 0  # calls swallowed before `start`

    @property
    def current_decay(self) -> float:
        return ema_decay(self.updates, self.decay, self.warmups)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (wrapped or not) into the average."""
        if self.skipped < self.start:
            self.skipped += 1
            return
        self.updates += 1
        d = ema_decay(self.updates, self.decay, self.warmups)
        source = unwrap_model(model).state_dict()
        averaged, current, copies = [], [], []
        for name, ema_value in self.module.state_dict().items():
            if name not in source:
                raise KeyError(f"ModelEMA.update: the model has no entry {name!r} (architecture changed?)")
            value = source[name].detach()
            if ema_value.dtype.is_floating_point:
                averaged.append(ema_value)
                current.append(value.to(device=ema_value.device, dtype=ema_value.dtype))
            else:
                copies.append((ema_value, value))
        if averaged:
            # ema = d * ema + (1 - d) * current, fused over all tensors.
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        for ema_value, value in copies:
            ema_value.copy_(value)

    def to(self, *args, **kwargs) -> "ModelEMA":
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "updates": self.updates,
            "skipped": self.skipped,
            "decay": self.decay,
            "warmups": self.warmups,
        }

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        if "module" not in state:
            raise KeyError("ModelEMA.load_state_dict: state has no 'module' entry")
        self.module.load_state_dict(state["module"], strict=strict)
        self.updates = int(state.get("updates", 0))
        self.skipped = int(state.get("skipped", self.start))
        self.decay = float(state.get("decay", self.decay))
        self.warmups = int(state.get("warmups", self.warmups))

    def __repr__(self) -> str:
        return f"ModelEMA(decay={self.decay}, warmups={self.warmups}, updates={self.updates})"
