"""Gradient-guided Adaptive Modulation (GAM): the per-epoch controller of the DSI loss weight.

RT-DETRv4 (arXiv 2510.25257, Sec. 3.3) weights the Deep Semantic Injector loss by lambda and
steers lambda once per epoch from gradient statistics:

* every optimizer step t, the L1 norm of the gradient of each component (backbone, AIFI, CCFF,
  decoder, ...) is measured; the AIFI share is ``r_t = G_t(AIFI) / G_t(total)``;
* at the end of epoch e, ``r = mean_t r_t``; inside the band ``[rho - delta, rho + delta]``
  lambda stays; outside, lambda is pushed so that the share moves toward the *far* bound of the
  band (the upper bound when r is below, the lower bound when above), because only part of the
  AIFI gradient comes from the DSI loss;
* from ``stop_epoch`` on (the no-augmentation / EMA phase) and when no AIFI gradient was seen,
  lambda is reset to a fixed default weight.

The rule. The paper prints ``lambda *= p / r`` ("linear" here). The official code
(``engine/solver/det_solver.py`` of RT-DETRs/RT-DETRv4) uses the odds ratio
``lambda *= p (1 - r) / (r (1 - p))`` ("odds", our default), with the factor clamped to
``[0.1, 10]`` (it clamps ``max(factor, 0.1)`` and then the new weight to
``[lambda / 10, lambda * 10]``, which is the same thing for a positive lambda). The official
configs give rho and delta in percent (S: rho 11, delta 1); the code divides both the measured
share and the target by 100 before forming the odds, so the rule is the same on fractions: we
take fractions (S: rho 0.11, delta 0.01). A lambda of zero stays zero, as there.

What this module does differently from the official code, and why:

1. *Rank-0-only update.* The official loop measures the share and updates the weight on rank 0
   only; the other ranks keep the initial weight, so under DDP the ranks train with different
   DSI weights. Here every rank runs the same controller, and :meth:`GAMController.end_epoch`
   sums the per-step, per-group L1 norms across ranks (``all_reduce``) before forming the
   shares, so every rank computes the same lambda from the same numbers.
2. *Disabled outside DDP.* The official code counts AIFI parameters by the name prefix
   ``module.encoder.encoder``, which only exists under a DDP wrapper; in a single-process run the
   share is 0 and the weight is reset to the default every epoch. Here names are matched after
   stripping wrapper prefixes (``module.``, ``_orig_mod.``), so GAM works in any setting.
3. *Lambda lost on resume.* The official weight lives in ``criterion.weight_dict``, which is not
   part of any state dict: a resumed run starts again from the initial weight. Here
   :meth:`GAMController.state_dict` carries lambda, the history and the accumulators of a
   half-finished epoch.
4. *Sharded gradients.* Under DeepSpeed ZeRO-2 each rank holds only a partition of the gradient;
   the caller passes whatever (name, grad) pairs it has and the cross-rank sum makes the
   per-group L1 norms global. With fully replicated gradients (DDP after synchronisation) the
   sum scales every group by the world size, which leaves the shares unchanged.
5. *Overflowed steps.* With fp16 AMP, a step whose gradients overflow is skipped by the
   GradScaler; the official loop appends a share of 0 for it, which biases the epoch mean low.
   Here steps with a non-finite total are left out of the mean (a finite all-zero gradient still
   counts as a share of 0, as there).
6. *No host sync per step.* The official loop calls ``.item()`` on every parameter's gradient
   every step. Here a step costs one fused ``torch._foreach_norm`` per group and the sums stay
   on the device until the end of the epoch.

As in the official update block, a weight that has fallen to 1e-6 or below is no longer adapted
(it stays until ``stop_epoch`` or a zero share resets it to the default weight), and the shares
are summed in float64 (the official loop sums Python floats), so a share near a band edge is
classed the same way; float64 models are measured in float64.

Timing, as in the official loop: the share measured during epoch e sets the weight used in epoch
e + 1; ``end_epoch(e)`` with ``e >= stop_epoch`` returns the default weight.

What counts. The total is the L1 norm over every parameter that has a gradient, the DSI
projector included (the official projector lives inside the encoder and is counted; the paper's
formula sums only backbone, AIFI, CCFF and decoder). Where in the step the gradients are read
does not matter for the share as long as it is after backward: gradient clipping and the AMP
loss scale multiply every gradient by the same number. With gradient accumulation, call
:meth:`GAMController.accumulate` once per optimizer step, after the last micro-batch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from distillery.torch_files import strip_wrapper_prefix

__all__ = [
    "GAM_DEFAULTS",
    "GAM_GROUP_PREFIXES",
    "GAMController",
    "classify_parameter",
    "gam_update",
    "gam_update_explained",
]

# Per-size recipes of the official configs (configs/rtv4/rtv4_hgnetv2_{s,m,l,x}_coco.yml):
# lambda0 = weight_dict.loss_distill, rho/delta = distill_adaptive_params (percent there,
# fractions here), default_weight = distill_adaptive_params.default_weight,
# stop_epoch = train_dataloader.collate_fn.stop_epoch.
GAM_DEFAULTS: dict[str, dict[str, float | int]] = {
    "rtdetrv4_s": {"lambda0": 5.0, "rho": 0.11, "delta": 0.01, "default_weight": 20.0, "stop_epoch": 120},
    "rtdetrv4_m": {"lambda0": 5.0, "rho": 0.035, "delta": 0.0025, "default_weight": 15.0, "stop_epoch": 90},
    "rtdetrv4_l": {"lambda0": 15.0, "rho": 0.02, "delta": 0.001, "default_weight": 15.0, "stop_epoch": 50},
    "rtdetrv4_x": {"lambda0": 20.0, "rho": 0.02, "delta": 0.0025, "default_weight": 20.0, "stop_epoch": 50},
    # Not an official size: the small test/CPU student of the embedded default. Its AIFI share,
    # measured at a fixed lambda of 1 on the synthetic set, is about 0.6%; as the RT-DETRv4
    # maintainers advise, rho is centred there and delta is 10% of rho. (With the S band of 11%
    # the rule would multiply lambda by 10 every epoch and drown the detection loss.)
    "rtdetrv4_tiny": {"lambda0": 1.0, "rho": 0.006, "delta": 0.0006, "default_weight": 1.0, "stop_epoch": 10},
}

# Component of each parameter, by name prefix; the first match wins, so the AIFI prefix must come
# before the general encoder prefix. Parameters matching none are counted in "other": they are
# part of the total (the official total is every parameter with a gradient) but of no component.
GAM_GROUP_PREFIXES: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone.",),
    "aifi": ("encoder.aifi.",),
    "ccff": ("encoder.",),
    "decoder": ("decoder.",),
    "dsi": ("dsi.",),
}
_OTHER = "other"
_AIFI = "aifi"
# The official zero-share test is "< 1e-6" on a percentage.
_ZERO_SHARE = 1e-8
# The official update block adapts the weight only while it is above this ("if current_weight > 1e-6").
_MIN_ADAPTED_WEIGHT = 1e-6

RULES = ("odds", "linear")


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise ValueError(f"gam: {name} must be a fraction in (0, 1), got {value!r}")
    return value


def _check_band(rho: float, delta: float) -> tuple[float, float]:
    rho = _check_fraction("rho", rho)
    delta = _check_fraction("delta", delta)
    if delta >= rho:
        raise ValueError(f"gam: delta ({delta}) must be smaller than rho ({rho}) so that rho - delta > 0")
    if rho + delta >= 1.0:
        raise ValueError(f"gam: rho + delta ({rho + delta}) must be below 1")
    return rho, delta


def _check_clamp(clamp: Sequence[float]) -> tuple[float, float]:
    if len(clamp) != 2:
        raise ValueError(f"gam: clamp must be a pair (low, high), got {clamp!r}")
    low, high = float(clamp[0]), float(clamp[1])
    if not (0.0 < low <= 1.0 <= high) or math.isinf(high):
        raise ValueError(f"gam: clamp must satisfy 0 < low <= 1 <= high < inf, got {clamp!r}")
    return low, high


def gam_update_explained(
    lam: float,
    ratio: float,
    rho: float,
    delta: float,
    rule: str = "odds",
    clamp: Sequence[float] = (0.1, 10.0),
) -> tuple[float, str]:
    """The GAM rule for a measured non-zero share before ``stop_epoch``: (new lambda, decision).

    ``ratio`` is the epoch-mean AIFI share r in (0, 1] (1 is possible when only AIFI has
    gradients; the odds factor is then 0 and clamps to the low end, as in the official code).
    """
    lam = float(lam)
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"gam: lam must be a finite non-negative weight, got {lam!r}")
    ratio = float(ratio)
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"gam: ratio must be a share in (0, 1], got {ratio!r}")
    rho, delta = _check_band(rho, delta)
    if rule not in RULES:
        raise ValueError(f"gam: rule must be one of {RULES}, got {rule!r}")
    low, high = _check_clamp(clamp)

    lower, upper = rho - delta, rho + delta
    if lower <= ratio <= upper:
        return lam, "inside band"
    if ratio < lower:
        target, decision = upper, "below band: raised toward rho+delta"
    else:
        target, decision = lower, "above band: lowered toward rho-delta"

    if rule == "odds":
        factor = target * (1.0 - ratio) / (ratio * (1.0 - target))
    else:
        factor = target / ratio
    clamped = min(max(factor, low), high)
    if clamped != factor:
        decision += f" (factor {factor:.4g} clamped to {clamped:g})"
    return lam * clamped, decision


def gam_update(
    lam: float,
    ratio: float,
    rho: float,
    delta: float,
    rule: str = "odds",
    clamp: Sequence[float] = (0.1, 10.0),
) -> float:
    """New DSI weight from the epoch-mean AIFI share ``ratio`` (see :func:`gam_update_explained`)."""
    return gam_update_explained(lam, ratio, rho, delta, rule, clamp)[0]


def classify_parameter(name: str, prefixes: Mapping[str, Sequence[str]] = GAM_GROUP_PREFIXES) -> str:
    """The GAM group of a parameter name (wrapper prefixes ignored); ``"other"`` if none matches."""
    bare = strip_wrapper_prefix(name)
    for group, starts in prefixes.items():
        if any(bare.startswith(s) for s in starts):
            return group
    return _OTHER


def _group_l1(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Float64 sum of the per-tensor L1 norms, like the official loop's Python-float sum of ``.item()``s.

    Each norm is taken in float32 for half/float32 gradients (fp16 sums overflow) and in float64
    for float64 gradients; the sum over tensors is float64, so a share within ~1e-7 of a band edge
    is classed as the official float64 arithmetic classes it.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for dtype, same in by_dtype.items():
        norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        norms = torch._foreach_norm(same, 1, dtype=norm_dtype)
        total = total + torch.stack([n.to(device, torch.float64, non_blocking=True) for n in norms]).sum()
    return total


class GAMController:
    """Stateful GAM: accumulates per-step gradient L1 norms, updates lambda once per epoch.

    Usage in a training loop, on every rank::

        gam = GAMController(**GAM_DEFAULTS["rtdetrv4_s"])
        for epoch in ...:
            for batch in ...:
                loss = det_loss + gam.current_lambda * dsi_loss
                loss.backward()
                gam.accumulate_model(model)      # or gam.accumulate(pairs) for ZeRO shards
                optimizer.step(); optimizer.zero_grad()
            gam.end_epoch(epoch, all_reduce=lambda t: torch.distributed.all_reduce(t))

    Every rank must call :meth:`accumulate` the same number of times per epoch (one per
    optimizer step, which is a collective anyway), since the per-step rows are summed
    element-wise across ranks.
    """

    def __init__(
        self,
        lambda0: float,
        rho: float,
        delta: float,
        default_weight: float,
        stop_epoch: int,
        rule: str = "odds",
        enabled: bool = True,
        clamp: Sequence[float] = (0.1, 10.0),
        group_prefixes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.rho, self.delta = _check_band(rho, delta)
        self.lower_bound, self.upper_bound = self.rho - self.delta, self.rho + self.delta
        if rule not in RULES:
            raise ValueError(f"gam: rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.clamp = _check_clamp(clamp)
        for name, value in (("lambda0", lambda0), ("default_weight", default_weight)):
            if float(value) < 0 or not math.isfinite(float(value)):
                raise ValueError(f"gam: {name} must be a finite non-negative weight, got {value!r}")
        if int(stop_epoch) != stop_epoch or stop_epoch < 0:
            raise ValueError(f"gam: stop_epoch must be a non-negative integer, got {stop_epoch!r}")
        self.lambda0 = float(lambda0)
        self.default_weight = float(default_weight)
        self.stop_epoch = int(stop_epoch)
        self.enabled = bool(enabled)

        prefixes = dict(GAM_GROUP_PREFIXES if group_prefixes is None else group_prefixes)
        if _AIFI not in prefixes:
            raise ValueError(f"gam: group_prefixes must define the {_AIFI!r} group, got {sorted(prefixes)}")
        if _OTHER in prefixes:
            raise ValueError(f"gam: group name {_OTHER!r} is reserved for unmatched parameters")
        self.group_prefixes = {k: tuple(v) for k, v in prefixes.items()}
        self.group_names: tuple[str, ...] = (*self.group_prefixes, _OTHER)
        self._aifi_index = self.group_names.index(_AIFI)

        self._lambda = self.lambda0
        self.history: list[dict] = []
        self.last_shares: dict[str, float] = {}
        self._group_of_name: dict[str, int] = {}
        # Per-step rows of per-group L1 sums: device tensors of shape (G,), plus a block restored
        # from a checkpoint taken mid-epoch (CPU tensor of shape (T, G)).
        self._rows: list[torch.Tensor] = []
        self._restored_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------ per step
    @property
    def current_lambda(self) -> float:
        """The DSI loss weight to use in the current epoch."""
        return self._lambda

    @property
    def steps_accumulated(self) -> int:
        restored = 0 if self._restored_rows is None else int(self._restored_rows.shape[0])
        return restored + len(self._rows)

    def _group_index(self, name: str) -> int:
        index = self._group_of_name.get(name)
        if index is None:
            index = self.group_names.index(classify_parameter(name, self.group_prefixes))
            self._group_of_name[name] = index
        return index

    def accumulate(self, named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> None:
        """Record one optimizer step from ``(parameter name, gradient)`` pairs.

        ``None`` gradients are skipped. No host synchronisation: one fused ``_foreach_norm``
        per group, and the per-group sums stay on the device.
        """
        if not self.enabled:
            return
        per_group: list[list[torch.Tensor]] = [[] for _ in self.group_names]
        device: torch.device | None = None
        for name, grad in named_grads:
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce().values()
            per_group[self._group_index(name)].append(grad.detach())
            if device is None:
                device = grad.device
        if device is None:
            device = self._rows[-1].device if self._rows else torch.device("cpu")
        sums = [_group_l1(grads, device) for grads in per_group]
        self._rows.append(torch.stack(sums))

    def accumulate_model(self, model: nn.Module) -> None:
        """Record one step from ``p.grad`` of the model's trainable parameters."""
        self.accumulate((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------ per epoch
    def _collect_rows(self) -> torch.Tensor:
        """All of this epoch's rows as one (T, G) float64 tensor (on the device of the last row)."""
        blocks = []
        device = self._rows[-1].device if self._rows else torch.device("cpu")
        if self._restored_rows is not None:
            blocks.append(self._restored_rows.to(device))
        if self._rows:
            blocks.append(torch.stack(self._rows))
        if not blocks:
            return torch.zeros((0, len(self.group_names)), dtype=torch.float64, device=device)
        return torch.cat(blocks)

    def end_epoch(self, epoch: int, all_reduce: Callable[[torch.Tensor], object] | None = None) -> float:
        """Close epoch ``epoch``: form the mean AIFI share, update lambda, return the new lambda.

        ``all_reduce`` sums a tensor across ranks in place (e.g. a wrapper of
        ``torch.distributed.all_reduce``); it is called once, on the (steps x groups) tensor of
        local L1 sums, so the shares are global. This is the only host synchronisation of GAM.
        """
        lam_before = self._lambda
        record: dict = {"epoch": int(epoch), "lambda_before": lam_before}
        if not self.enabled:
            self._reset_accumulators()
            record.update(ratio=float("nan"), shares={}, steps=0, lambda_after=lam_before, decision="disabled")
            self.history.append(record)
            return self._lambda

        rows = self._collect_rows()
        if all_reduce is not None:
            rows = rows.contiguous()
            all_reduce(rows)
        rows = rows.double().cpu()  # the one host sync
        self._reset_accumulators()

        totals = rows.sum(dim=1)
        finite = torch.isfinite(totals)
        valid_rows, valid_totals = rows[finite], totals[finite]
        # A finite all-zero gradient counts as a share of 0 (as in the official loop).
        safe_totals = torch.where(valid_totals > 0, valid_totals, torch.ones_like(valid_totals))
        shares = valid_rows / safe_totals[:, None]  # L1 sums are >= 0: a zero total gives 0s
        steps = int(shares.shape[0])
        mean_shares = shares.mean(dim=0) if steps else torch.zeros(len(self.group_names), dtype=torch.float64)
        ratio = float(mean_shares[self._aifi_index])
        self.last_shares = {g: float(s) for g, s in zip(self.group_names, mean_shares)}

        if ratio < _ZERO_SHARE:
            lam_after, decision = self.default_weight, "zero share: reset to default weight"
        elif epoch >= self.stop_epoch:
            lam_after, decision = self.default_weight, "stopped: default weight from stop_epoch on"
        elif lam_before <= _MIN_ADAPTED_WEIGHT and not self.lower_bound <= ratio <= self.upper_bound:
            # The official update block only adapts a weight above 1e-6: once lambda has shrunk
            # that far it stays there (until stop_epoch or a zero share reset it).
            lam_after, decision = lam_before, "weight <= 1e-6: no longer adapted"
        else:
            lam_after, decision = gam_update_explained(
                lam_before, ratio, self.rho, self.delta, self.rule, self.clamp
            )
        self._lambda = float(lam_after)
        record.update(
            ratio=ratio,
            shares=dict(self.last_shares),
            steps=steps,
            skipped_steps=int((~finite).sum()),
            lambda_after=self._lambda,
            decision=decision,
        )
        self.history.append(record)
        return self._lambda

    def _reset_accumulators(self) -> None:
        self._rows = []
        self._restored_rows = None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Lambda, history and the half-finished epoch's accumulators (CPU tensors).

        Plain containers of floats, strings and tensors: loadable with ``weights_only=True``.
        """
        return {
            "lambda": self._lambda,
            "history": [dict(h, shares=dict(h.get("shares", {}))) for h in self.history],
            "last_shares": dict(self.last_shares),
            "group_names": list(self.group_names),
            "rows": self._collect_rows().detach().cpu(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        missing = {"lambda", "history", "group_names", "rows"} - set(state)
        if missing:
            raise KeyError(f"gam: state dict lacks {sorted(missing)}")
        if list(state["group_names"]) != list(self.group_names):
            raise ValueError(
                f"gam: state dict groups {list(state['group_names'])} differ from this controller's "
                f"{list(self.group_names)}"
            )
        rows = state["rows"]
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != len(self.group_names):
            raise ValueError(f"gam: state dict 'rows' must be a (steps, {len(self.group_names)}) tensor")
        self._lambda = float(state["lambda"])
        self.history = [dict(h) for h in state["history"]]
        self.last_shares = dict(state.get("last_shares", {}))
        self._rows = []
        self._restored_rows = rows.detach().to(torch.float64).cpu().clone() if rows.shape[0] else None
