"""HGNetv2 backbone (timm), feature levels at strides 8 / 16 / 32, with the reference freezing options.

timm's ``hgnetv2_b0 .. b5`` are the same networks as the HGNetv2 of D-FINE / DEIM / RT-DETRv4
(same stage table, the v2 stem, 'se' aggregation, and the learnable affine blocks ``use_lab`` on
B0-B3 only, which is also what the official S/M configs switch on and L/X leave off). Checked:
the features-only models have exactly the reference backbone parameter counts
(B0 1,850,396; B2 6,026,626; B4 13,553,376; B5 33,325,760) and the same parameter names
(``stem.stem1.conv.weight``, ``stages.N.blocks...``), so the reference ``PPHGNetV2_B*_stage1``
weights load after renaming ``stages.N.`` to ``stages_N.``. timm's ``out_indices`` count stages
only (0..3 = strides 4, 8, 16, 32): ``(1, 2, 3)`` gives S3, S4, S5.

Freezing follows the reference ``HGNetv2`` arguments:

* ``freeze_at >= 0`` freezes the stem (``requires_grad = False``); unless ``freeze_stem_only``,
  also stages ``0 .. freeze_at``. ``-1`` freezes nothing (all RT-DETRv4 recipes).
* ``freeze_norm`` swaps every BatchNorm2d for :class:`torchvision.ops.FrozenBatchNorm2d`
  (statistics and affine fixed, stored as buffers). Off in all RT-DETRv4 recipes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from distillery.torch_files import load_torch_file

from .errors import WeightsError

__all__ = ["HGNetv2Backbone", "HGNETV2_VARIANTS", "load_state_dict_file"]

HGNETV2_VARIANTS = ("hgnetv2_b0", "hgnetv2_b1", "hgnetv2_b2", "hgnetv2_b3", "hgnetv2_b4", "hgnetv2_b5",
                    "hgnetv2_b6")
_STAGE_KEY = re.compile(r"^stages\.(\d+)\.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d state dict (``weights_only=True``).

    A checkpoint that wraps the state dict under a single ``state_dict`` or ``model`` key is
    unwrapped. Anything that is not a mapping of names to tensors is refused, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - name the file whatever went wrong
            raise WeightsError(f"could not read backbone weights file {path} (safetensors): "
                               f"{type(exc).__name__}: {exc}") from None
    else:
        state = load_torch_file(path, "backbone weights file", WeightsError)
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if set(state) == {wrapper} and isinstance(state[wrapper], dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsError(f"backbone weights {path} is not a mapping of parameter names to tensors")
    return state


class HGNetv2Backbone(nn.Module):
    """timm HGNetv2 returning ``[S3, S4, S5]``; ``out_channels`` and ``strides`` describe them."""

    def __init__(self, variant: str = "hgnetv2_b0", *, weights: str | os.PathLike | None = None,
                 freeze_at: int = -1, freeze_stem_only: bool = True, freeze_norm: bool = False):
        super().__init__()
        if variant not in HGNETV2_VARIANTS:
            raise ValueError(f"unknown backbone {variant!r}; expected one of {HGNETV2_VARIANTS}")
        self.variant = variant
        # pretrained=False always: weights come only from an explicit local file.
        self.body = timm.create_model(variant, pretrained=False, features_only=True, out_indices=(1, 2, 3))
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        if weights is not None:
            self.load_weights(weights)
        self.freeze(freeze_at=freeze_at, freeze_stem_only=freeze_stem_only, freeze_norm=freeze_norm)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(images))

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a timm / reference HGNetv2 state dict; any missing or unexpected key raises, naming them.

        Accepted layouts: timm's classification model (``stages.N.*``; its classifier ``head.*``
        keys are skipped because a features-only backbone has no classifier), timm's
        features-only model (``stages_N.*``), and the reference ``PPHGNetV2_*_stage1.pth``.
        """
        raw = load_state_dict_file(path)
        state = {}
        for key, value in raw.items():
            if key.startswith("head."):
                continue
            state[_STAGE_KEY.sub(lambda m: f"stages_{m.group(1)}.", key)] = value
        own = self.body.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise WeightsError(f"backbone weights {path} do not fit {self.variant}: "
                           f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
                           f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
                           f"({len(unexpected)})")
        wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if tuple(state[k].shape) != tuple(v.shape)]
        if wrong:
            raise WeightsError(f"backbone weights {path} have wrong shapes for {self.variant}: {wrong[:20]}")
        self.body.load_state_dict(state, strict=True)

    def freeze(self, *, freeze_at: int = -1, freeze_stem_only: bool = True, freeze_norm: bool = False) -> None:
        """Apply the reference freezing options (see the module docstring)."""
        if freeze_at >= 0:
            frozen = [self.body.stem]
            if not freeze_stem_only:
                stages = [getattr(self.body, f"stages_{i}") for i in range(4)]
                frozen += stages[: min(freeze_at + 1, len(stages))]
            for module in frozen:
                for p in module.parameters():
                    p.requires_grad_(False)
        if freeze_norm:
            _freeze_batch_norms(self.body)


def _freeze_batch_norms(module: nn.Module) -> None:
    """Replace every BatchNorm2d below ``module`` by a FrozenBatchNorm2d holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)
