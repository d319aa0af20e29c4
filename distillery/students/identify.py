"""What a whole-detector weights file is (family, size, backbone), for the first line of a load error.

:func:`describe_checkpoint` reads only key names and shapes of a state dict, in the official
RT-DETRv4 / DEIMv2 layout or ours (wrapper prefixes stripped): the family from the decoder FFN
(DEIMv2's SwiGLU, ``swish_ffn`` / ``swiglu``, vs RT-DETRv4's ``linear1``), the backbone from its
tensors (a DINOv3 ViT by width, storage tokens and SwiGLU MLP; an HGNetv2 variant or pruned B0 by
comparing shapes with timm's / our networks built on the meta device), and the size when the
backbone, decoder width and decoder depth are those of a registered size. Nothing is loaded.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

import timm
import torch

from . import rtdetrv4  # the module, not its names: rtdetrv4 imports .weights, which imports this
from .backbone import HGNETV2_VARIANTS
from .deimv2 import DEIMV2_SPECS
from .deimv2_backbone import DISTILLED_VIT, PRUNED_HGNETV2, PrunedHGNetv2

__all__ = ["CheckpointKind", "backbone_label", "describe_checkpoint", "mismatch_phrase"]

_DECODER_LAYER = re.compile(r"^decoder\.(?:decoder\.)?layers\.(\d+)\.")
_VIT_PREFIXES = ("backbone.dinov3._model.", "backbone.dinov3.", "backbone.vit.")
_HGNET_PREFIXES = ("backbone.body.", "backbone.")


@dataclass(frozen=True)
class CheckpointKind:
    family: str  # "RT-DETRv4" or "DEIMv2"
    backbone: str  # e.g. "HGNetv2-B0", "DINOv3 ViT-S/16", "distilled DINOv3 ViT-Tiny"
    size: str | None  # the registered student name (e.g. "deimv2_s"), None when no size fits

    def phrase(self) -> str:
        size = self.size.split("_", 1)[1] if self.size else ""
        name = f"{self.family}-{size.upper() if len(size) == 1 else size.capitalize()}" if size else self.family
        return f"this is {_article(name)} {name} checkpoint ({self.backbone} backbone)"


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEFHILMNORSX" else "a"


def backbone_label(student_name: str) -> str | None:
    """The backbone a registered student has, in :class:`CheckpointKind`'s words (None: unknown name)."""
    spec = DEIMV2_SPECS.get(student_name) or rtdetrv4.STUDENT_SPECS.get(student_name)
    if spec is None:
        return None
    backbone = spec.backbone
    if backbone == DISTILLED_VIT:
        return _distilled_label(spec.vit_dim)
    if backbone.startswith("vit_small_plus_patch16_dinov3"):
        return "DINOv3 ViT-S+/16"
    if backbone.startswith("vit_small_patch16_dinov3"):
        return "DINOv3 ViT-S/16"
    if backbone in PRUNED_HGNETV2:
        return f"pruned HGNetv2 ({backbone.split('_')[1].capitalize()})"
    return f"HGNetv2-{backbone.split('_')[1].upper()}"


def _distilled_label(width: int) -> str:
    name = {192: "ViT-Tiny", 256: "ViT-Tiny+"}.get(int(width))
    return f"distilled DINOv3 {name}" if name else f"{int(width)}-wide distilled DINOv3 ViT"


def _picked(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    return {}


@lru_cache(maxsize=None)
def _network_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes (``stem.*``, ``stages.N.*``) of an HGNetv2 variant or pruned B0, built on meta."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant in PRUNED_HGNETV2:
            module = PrunedHGNetv2(variant)
        else:
            module = timm.create_model(variant, pretrained=False, num_classes=0)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()
            if k.startswith(("stem.", "stages.")) and not k.endswith("num_batches_tracked")}


def _hgnet_label(backbone: dict[str, torch.Tensor]) -> str | None:
    shapes = {re.sub(r"^stages_(\d+)\.", r"stages.\1.", k): tuple(v.shape) for k, v in backbone.items()
              if not k.endswith("num_batches_tracked")}
    for variant in (*PRUNED_HGNETV2, *HGNETV2_VARIANTS):
        if shapes == _network_shapes(variant):
            return (f"pruned HGNetv2 ({variant.split('_')[1].capitalize()})" if variant in PRUNED_HGNETV2
                    else f"HGNetv2-{variant.split('_')[1].upper()}")
    return None


def _vit_label(vit: dict[str, torch.Tensor]) -> str:
    patch = vit.get("patch_embed.proj.weight")
    width = int(patch.shape[0]) if patch is not None else None
    if "storage_tokens" in vit or "reg_token" in vit:
        plus = any(re.search(r"mlp\.(w1|w2|w3|w12|fc1_g|fc1_x)\.", k) for k in vit)
        return "DINOv3 ViT-S+/16" if plus else ("DINOv3 ViT-S/16" if width == 384 else f"DINOv3 ViT ({width} wide)")
    return _distilled_label(width) if width else "distilled DINOv3 ViT"


def _decoder_shape(state: Mapping[str, torch.Tensor]) -> tuple[int | None, int]:
    """(decoder width, number of decoder layers) from the layers' keys."""
    layers = {int(m.group(1)) for k in state for m in [_DECODER_LAYER.match(k)] if m}
    width = None
    for key, value in state.items():
        if _DECODER_LAYER.match(key) and key.endswith("self_attn.out_proj.weight"):
            width = int(value.shape[0])
            break
    return width, len(layers)


def _vit_blocks_fit(spec, blocks: int) -> bool:
    """A ViT of ``blocks`` blocks is the spec's: all of them (official files) or up to the last used one (ours)."""
    depth = 12 if spec.backbone != DISTILLED_VIT else spec.vit_depth  # timm's DINOv3 ViT-S/S+: 12
    return blocks in (depth, max(spec.vit_layers) + 1)


def describe_checkpoint(state: Mapping[str, torch.Tensor]) -> CheckpointKind | None:
    """The family, backbone and (when it fits a registered size) size of a detector state dict; None
    when it does not look like an RT-DETRv4 / DEIMv2 detector or its backbone is none we know."""
    width, depth = _decoder_shape(state)
    if not depth:
        return None
    deimv2 = any(".swish_ffn." in k or ".swiglu." in k for k in state)
    family = "DEIMv2" if deimv2 else "RT-DETRv4"
    vit = _picked(state, _VIT_PREFIXES)
    vit_blocks = len({k.split(".")[1] for k in vit if k.startswith("blocks.")})
    if vit:
        backbone = _vit_label(vit)
        family = "DEIMv2"
    else:
        hgnet = _picked(state, _HGNET_PREFIXES)
        hgnet = {k: v for k, v in hgnet.items() if k.startswith(("stem.", "stages.", "stages_"))}
        backbone = _hgnet_label(hgnet) if hgnet else None
        if backbone is None:
            return None  # a backbone we cannot name: better nothing than a guess
    specs = DEIMV2_SPECS if family == "DEIMv2" else rtdetrv4.STUDENT_SPECS
    size = next((name for name, spec in specs.items()
                 if backbone_label(name) == backbone and spec.decoder_hidden_dim == width
                 and spec.num_decoder_layers == depth and (not vit or _vit_blocks_fit(spec, vit_blocks))), None)
    return CheckpointKind(family, backbone, size)


def mismatch_phrase(state: Mapping[str, torch.Tensor], student_name: str) -> str | None:
    """"this is a DEIMv2-S checkpoint (...); rtdetrv4_s expects an HGNetv2-B0 one" when the file is
    recognisably another size or backbone than ``student_name``; None when it cannot tell or the
    file is of the student's own size."""
    kind = describe_checkpoint(state)
    if kind is None or kind.size == student_name:
        return None
    expected = backbone_label(student_name)
    if kind.size is None and expected == kind.backbone:
        return None  # same backbone, other numbers: the key summary says the rest
    if expected is None:
        return kind.phrase()
    if expected == kind.backbone:
        return f"{kind.phrase()}; {student_name} is another size with the same backbone"
    return f"{kind.phrase()}; {student_name} expects {_article(expected)} {expected} one"
