"""AdamW parameter groups and the flat-cosine learning-rate schedule of the RT-DETRv4 recipes.

Parameter groups. The official configs (``configs/rtv4/rtv4_hgnetv2_*_coco.yml``) select groups
with regular expressions over parameter names; after the config merge (lists replace lists, so
the RT-DETRv4 file's ``optimizer.params`` replaces D-FINE's) they mean:

* S and M (``'^(?=.*backbone)(?!.*bn).*$'`` and ``'^(?=.*(?:norm|bn)).*$'``): backbone
  parameters that are not normalisation parameters train at the backbone learning rate with
  weight decay; *every* normalisation parameter, the backbone's BatchNorms included, trains at
  the base learning rate without weight decay; everything else at the base rate with decay.
  -> ``norm_rule="all"``.
* L and X (``'^(?=.*backbone)(?!.*norm|bn).*$'`` and
  ``'^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$'``): the negative look-ahead parses as
  ``(?!.*norm | bn)``, so the backbone's BatchNorms (named ``...bn...``) stay in the backbone
  group (backbone rate, with decay); only encoder/decoder normalisation parameters lose their
  weight decay. -> ``norm_rule="head"``.
* Biases are *not* excluded from weight decay in any RT-DETRv4 recipe (the D-FINE S/M configs
  underneath did exclude encoder/decoder biases; RT-DETRv4 replaced that list).
  -> ``decay_biases=True``; ``False`` reproduces the D-FINE choice.

DEIMv2 (``configs/deimv2/deimv2_*_coco.yml``):

* HGNetv2 sizes (Femto/Pico/N; Atto's head group leaves out ``bias``: ``decay_biases=True``): ``'^(?=.*backbone)(?!.*norm|bn).*$'`` (backbone rate, with
  decay: the backbone's BatchNorms included, as above), ``'^(?=.*backbone)(?=.*norm|bn).*$'``
  (backbone rate, no decay: no HGNetv2 name contains ``norm``) and
  ``'^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$'`` (base rate, no decay: head norms
  *and biases*). -> ``norm_rule="head", decay_biases=False``.
* DINOv3 sizes (S/M/L/X): the ViT's weights at the backbone rate with decay, the ViT's
  norms and biases at the backbone rate *without* decay, STA/encoder/decoder norms and biases
  at the base rate without decay, the rest at the base rate with decay.
  -> ``norm_rule="split", decay_biases=False`` (``split``: backbone norms (and, without
  ``decay_biases``, backbone biases) go to a ``backbone_no_decay`` group at the backbone rate;
  ``sta`` counts as a head component).
* A bias is any parameter whose own name contains ``bias`` (``bias``, ``in_proj_bias``,
  ``q_bias``), as the official regexes match it.

:data:`PARAM_GROUP_RULES` holds each size's rules; :func:`param_group_rules` looks them up.

Here the same groups come from explicit rules instead of regular expressions: the component is
the first component of the parameter name (``backbone``, ``encoder``, ``decoder``, ...; wrapper
prefixes ``module.`` / ``_orig_mod.`` ignored), and a parameter is a normalisation parameter when
the module that owns it is a normalisation layer (BatchNorm/SyncBatchNorm/InstanceNorm,
LayerNorm, GroupNorm, RMSNorm) or, for custom norm classes, when that module's attribute name
is ``bn`` or contains ``norm`` (the naming the official regexes rely on). PEFT adapters inside a
frozen backbone (AdaRoute centres and routers, LoRA factors) are new, zero-started weights, not
pretrained ones: they go to the ``default`` group at the base rate.

Schedule. ``engine/optim/lr_scheduler.py`` (``flat_cosine_schedule``, from DEIM), per iteration:
warm-up for ``warmup_steps`` (the official curve is *quadratic*, ``(step / warmup)^2``, not
linear: kept as the default, ``warmup="linear"`` is available), flat at the base rate until
``flat_epochs``, cosine down to ``min_ratio`` x base (``lr_gamma`` 0.5) at
``epochs - no_aug_epochs``, then flat at the minimum for the no-augmentation epochs. The factor
is the same for every group (each group's minimum is its own base times ``min_ratio``).
Indexing (measured by tools/parity/write_training_fixtures.py, which records the rate of every
official step): the official loop sets the rate after each optimizer step from the iteration just
done (``lr_scheduler.step(cur_iters + i)``), so step k >= 1 runs with ``f(k - 1)``; the very first
step runs at 1/500 of each group's rate, left there by the ``LinearWarmup(warmup_duration=500)``
of ``configs/base/optimizer.yml`` that the official solver builds (and never steps when the
flat-cosine scheduler drives the rate). ``indexing="official"`` (what the distillation job uses)
does the same; ``indexing="lambda"`` (the default) is plain ``LambdaLR``: step k runs with ``f(k)``,
starting from ``f(0) = 0``.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Literal

import torch
from torch import nn

from distillery.torch_files import strip_wrapper_prefix

__all__ = [
    "NORM_LAYER_TYPES",
    "OFFICIAL_FIRST_STEP_RATIO",
    "OPTIM_DEFAULTS",
    "FlatCosineSchedule",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "is_norm_module",
    "param_group_rules",
]

# Per-size training recipes of the official configs (after include/merge):
# configs/rtv4/rtv4_hgnetv2_{s,m,l,x}_coco.yml over configs/base/{rtv4,optimizer}.yml.
_COMMON = {
    "betas": (0.9, 0.999),
    "warmup_steps": 2000,  # warmup_iter
    "min_ratio": 0.5,  # lr_gamma
    "clip_max_norm": 0.1,
    "ema_decay": 0.9999,
    "ema_warmups": 1000,
    "total_batch_size": 32,
    "decay_biases": True,
}
OPTIM_DEFAULTS: dict[str, dict] = {
    "rtdetrv4_s": {**_COMMON, "lr": 4e-4, "backbone_lr": 2e-4, "weight_decay": 1e-4, "norm_rule": "all",
                   "epochs": 132, "flat_epochs": 64, "no_aug_epochs": 12},
    "rtdetrv4_m": {**_COMMON, "lr": 4e-4, "backbone_lr": 4e-5, "weight_decay": 1e-4, "norm_rule": "all",
                   "epochs": 102, "flat_epochs": 49, "no_aug_epochs": 12},
    "rtdetrv4_l": {**_COMMON, "lr": 5e-4, "backbone_lr": 2.5e-5, "weight_decay": 1.25e-4, "norm_rule": "head",
                   "epochs": 58, "flat_epochs": 29, "no_aug_epochs": 8},
    "rtdetrv4_x": {**_COMMON, "lr": 5e-4, "backbone_lr": 5e-6, "weight_decay": 1.25e-4, "norm_rule": "head",
                   "epochs": 58, "flat_epochs": 29, "no_aug_epochs": 8},
}

# Per-size parameter-group rules of the official configs (see the module docstring).
PARAM_GROUP_RULES: dict[str, dict] = {
    **{name: {"norm_rule": "all", "decay_biases": True} for name in ("rtdetrv4_s", "rtdetrv4_m")},
    **{name: {"norm_rule": "head", "decay_biases": True} for name in ("rtdetrv4_l", "rtdetrv4_x")},
    "deimv2_atto": {"norm_rule": "head", "decay_biases": True},  # its head group names no bias
    **{name: {"norm_rule": "head", "decay_biases": False} for name in ("deimv2_femto", "deimv2_pico", "deimv2_n")},
    **{name: {"norm_rule": "split", "decay_biases": False}
       for name in ("deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x")},
}


def param_group_rules(student_name: str) -> dict:
    """``norm_rule`` / ``decay_biases`` of ``student_name``'s official recipe; other students
    (the tiny test ones) get the RT-DETRv4-S rules."""
    return dict(PARAM_GROUP_RULES.get(student_name, PARAM_GROUP_RULES["rtdetrv4_s"]))


NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
_HEAD_COMPONENTS = ("encoder", "decoder", "sta")  # sta: DEIMv2's STA (ours is top-level)
NormRule = Literal["all", "head", "split"]


# Trainable PEFT adapter parameters inside a frozen backbone (distillery.students.peft):
# AdaRoute's shared expert centres and routers, LoRA's factors.
_PEFT_ADAPTER = re.compile(r"(^|\.)peft_centres\.|\.router\.|\.lora_(down|up)$")


def is_norm_module(attribute_name: str, module: nn.Module) -> bool:
    """Whether ``module`` (reached as ``attribute_name`` in its parent) is a normalisation layer."""
    if isinstance(module, NORM_LAYER_TYPES):
        return True
    return attribute_name == "bn" or "norm" in attribute_name.lower()


def _classify(model: nn.Module) -> Iterable[tuple[str, nn.Parameter, str, bool, bool]]:
    """(name, parameter, component, is_norm, is_bias) for each trainable parameter, once each."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        attribute = module_name.rsplit(".", 1)[-1]
        norm = bool(module_name) and is_norm_module(attribute, module)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = strip_wrapper_prefix(f"{module_name}.{param_name}" if module_name else param_name)
            component = full.split(".", 1)[0] if "." in full else ""
            yield full, param, component, norm, "bias" in param_name


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    backbone_lr: float,
    weight_decay: float,
    *,
    norm_rule: NormRule = "all",
    decay_biases: bool = True,
) -> list[dict]:
    """AdamW parameter groups as the official recipes build them (see the module docstring).

    Returns the non-empty groups among ``backbone`` (backbone_lr, weight_decay),
    ``backbone_no_decay`` (backbone_lr, 0; ``norm_rule="split"`` only), ``no_decay`` (base_lr, 0)
    and ``default`` (base_lr, weight_decay), each a dict with ``params``, ``lr``,
    ``weight_decay``, ``name`` and ``param_names``. Frozen parameters are left out.
    """
    if norm_rule not in ("all", "head", "split"):
        raise ValueError(f"build_param_groups: norm_rule must be 'all', 'head' or 'split', got {norm_rule!r}")
    for key, value in (("base_lr", base_lr), ("backbone_lr", backbone_lr), ("weight_decay", weight_decay)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"build_param_groups: {key} must be a finite value >= 0, got {value!r}")

    groups = {
        "backbone": {"lr": backbone_lr, "weight_decay": weight_decay},
        "backbone_no_decay": {"lr": backbone_lr, "weight_decay": 0.0},
        "no_decay": {"lr": base_lr, "weight_decay": 0.0},
        "default": {"lr": base_lr, "weight_decay": weight_decay},
    }
    members: dict[str, list[tuple[str, nn.Parameter]]] = {k: [] for k in groups}
    for name, param, component, norm, bias in _classify(model):
        if component == "backbone" and _PEFT_ADAPTER.search(name):
            target = "default"  # adapters start from zero on a frozen backbone: the base rate
        elif component == "backbone":
            if norm and norm_rule == "all":
                target = "no_decay"
            elif norm_rule == "split" and (norm or (bias and not decay_biases)):
                target = "backbone_no_decay"
            else:
                target = "backbone"
        elif norm and (norm_rule == "all" or component in _HEAD_COMPONENTS):
            target = "no_decay"
        elif bias and not decay_biases and component in _HEAD_COMPONENTS:
            target = "no_decay"
        else:
            target = "default"
        members[target].append((name, param))

    out = []
    for key, settings in groups.items():
        if members[key]:
            out.append(
                {
                    "name": key,
                    "params": [p for _, p in members[key]],
                    "param_names": [n for n, _ in members[key]],
                    **settings,
                }
            )
    if not out:
        raise ValueError("build_param_groups: the model has no trainable parameters")
    return out


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    backbone_lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    norm_rule: NormRule = "all",
    decay_biases: bool = True,
    **unused: object,
) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups`.

    Extra keyword arguments are accepted and ignored so that a whole recipe dict
    (e.g. ``OPTIM_DEFAULTS["rtdetrv4_s"]``, which also carries schedule keys) can be passed.
    """
    groups = build_param_groups(
        model, lr, backbone_lr, weight_decay, norm_rule=norm_rule, decay_biases=decay_biases
    )
    for group in groups:
        # AdamW keeps unknown group keys; param_names is only for humans and must not reach the
        # optimizer state (torch >= 2.6 gives 'param_names' a meaning of its own).
        group.pop("param_names")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------ schedule
# The official first step's share of each group's rate: configs/base/optimizer.yml's
# LinearWarmup(warmup_duration=500), built by the official solver, sets (0 + 1) / 500 (module docstring).
OFFICIAL_FIRST_STEP_RATIO = 1.0 / 500
class FlatCosineSchedule:
    """Multiplier of each group's base learning rate at optimizer step ``step`` (flat-cosine):
    ``schedule(step)``, a picklable ``LambdaLR`` callable (its fields go into the state dict).

    Phases, checked in this order as in the reference: ``step <= warmup_steps``: warm-up from 0
    to 1; ``step <= flat_steps``: 1; ``step >= total_steps - no_aug_steps``: ``min_ratio``;
    otherwise cosine from 1 (at ``flat_steps``) to ``min_ratio`` (at ``total_steps - no_aug_steps``).
    ``indexing="official"``: ``schedule(0)`` is :data:`OFFICIAL_FIRST_STEP_RATIO` and
    ``schedule(k)`` the phases' value at ``k - 1`` (see the module docstring).
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int,
        flat_steps: int,
        no_aug_steps: int,
        min_ratio: float = 0.5,
        warmup: Literal["quadratic", "linear"] = "quadratic",
        indexing: Literal["lambda", "official"] = "lambda",
    ) -> None:
        for key, value in (
            ("total_steps", total_steps), ("warmup_steps", warmup_steps),
            ("flat_steps", flat_steps), ("no_aug_steps", no_aug_steps),
        ):
            if int(value) != value or value < 0:
                raise ValueError(f"flat-cosine schedule: {key} must be an integer >= 0, got {value!r}")
        if total_steps < 1:
            raise ValueError(f"flat-cosine schedule: total_steps must be >= 1, got {total_steps}")
        if no_aug_steps > total_steps:
            raise ValueError(
                f"flat-cosine schedule: no_aug_steps ({no_aug_steps}) exceeds total_steps ({total_steps})"
            )
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"flat-cosine schedule: min_ratio must be in [0, 1], got {min_ratio}")
        if warmup not in ("quadratic", "linear"):
            raise ValueError(f"flat-cosine schedule: warmup must be 'quadratic' or 'linear', got {warmup!r}")
        if indexing not in ("lambda", "official"):
            raise ValueError(f"flat-cosine schedule: indexing must be 'lambda' or 'official', got {indexing!r}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.flat_steps = int(flat_steps)
        self.no_aug_steps = int(no_aug_steps)
        self.min_ratio = float(min_ratio)
        self.warmup = warmup
        self.indexing = indexing

    def __call__(self, step: int) -> float:
        if self.indexing == "official":
            return OFFICIAL_FIRST_STEP_RATIO if step == 0 else self.factor(step - 1)
        return self.factor(step)

    def factor(self, step: int) -> float:
        """The flat-cosine factor at iteration ``step`` (the official ``flat_cosine_schedule``)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            progress = step / self.warmup_steps
            return progress**2 if self.warmup == "quadratic" else progress
        if step <= self.flat_steps:
            return 1.0
        decay_end = self.total_steps - self.no_aug_steps
        if step >= decay_end:
            return self.min_ratio
        # Here flat_steps < step < decay_end, so the span is positive.
        cosine = 0.5 * (1.0 + math.cos(math.pi * (step - self.flat_steps) / (decay_end - self.flat_steps)))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    flat_epochs: int,
    no_aug_epochs: int,
    warmup_steps: int = 2000,
    min_ratio: float = 0.5,
    warmup: Literal["quadratic", "linear"] = "quadratic",
    indexing: Literal["lambda", "official"] = "lambda",
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration ``LambdaLR`` with the flat-cosine factor; call ``.step()`` after each
    optimizer step. Epoch arguments are converted with ``steps_per_epoch`` as in the reference;
    ``indexing``: which step runs with which factor (module docstring)."""
    if steps_per_epoch < 1:
        raise ValueError(f"build_lr_scheduler: steps_per_epoch must be >= 1, got {steps_per_epoch}")
    schedule = FlatCosineSchedule(
        total_steps=int(steps_per_epoch * epochs),
        warmup_steps=warmup_steps,
        flat_steps=int(steps_per_epoch * flat_epochs),
        no_aug_steps=int(steps_per_epoch * no_aug_epochs),
        min_ratio=min_ratio,
        warmup=warmup,
        indexing=indexing,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
