"""Key mapping between the official RT-DETRv4 / DEIMv2 state dicts and Distillery's students.

The official repositories (RT-DETRs/RT-DETRv4, Intellindust-AI-Lab/DEIMv2) name their modules
differently from ours; the tensors are the same (shapes and meaning), so a checkpoint moves
across by renaming keys, plus two splits/joins:

=================================================  =============================================
official                                           ours
=================================================  =============================================
``backbone.stem.*``, ``backbone.stages.N.*``       ``backbone.body.stem.*``, ``backbone.body.stages_N.*``
                                                   (timm HGNetv2; the pruned Pico/Femto/Atto keep
                                                   the official names)
``backbone.dinov3._model.*`` (distilled ViT)       ``backbone.vit.*``; ``attn.qkv.bias`` split into
                                                   ``q_bias`` / ``k_bias`` / ``v_bias``
``backbone.dinov3.*`` (DINOv3 ViT-S/S+, L/X)       ``backbone.vit.*`` through timm's own DINOv3
                                                   converter (storage tokens, layer scale, q/v bias)
``backbone.sta.{stem,conv2,conv3,conv4}.*``        ``sta.detail.{stem,down8,down16,down32}.*``
``backbone.convs.i.*`` / ``backbone.norms.i.*``    ``sta.fuse.i.0.*`` / ``sta.fuse.i.1.*``
``encoder.encoder.0.layers.0.*``                   ``encoder.aifi.*``
``encoder.downsample_convs.i.0.*``                 ``encoder.downsample_convs.i.*``
``encoder.feature_projector.0.*``                  ``dsi.*`` (the DSI projector)
``encoder.bi_fusion.cv.*`` (lite encoder)          ``encoder.bi_fusion.*``
``encoder.down_sampleK.1.weight`` / ``.2.*``       ``encoder.down_sampleK.1.conv.weight`` / ``.1.norm.*``
``decoder.decoder.{layers,lqe_layers}.*``          ``decoder.{layers,lqe_layers}.*``
``...swish_ffn.*``, RMSNorm ``...normK.scale``     ``...swiglu.*``, ``...normK.weight``
=================================================  =============================================

Dropped, because they are recomputed from the architecture and the input size: the decoder's
``anchors`` / ``valid_mask``, the deformable attention's ``num_points_scale``, the FDR
constants ``up`` / ``reg_scale`` (frozen parameters there, the spec's ``reg_scale`` and 0.5
here) and the ViT's ``rope_embed.periods``.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Mapping

import torch
from torch import nn

from .deimv2 import DEIMV2_SPECS
from .deimv2_backbone import PRUNED_HGNETV2, DINOv3ViTBackbone, convert_vit_state
from .errors import WeightsError

__all__ = ["convert_official_state_dict", "looks_official"]

# Keys only the official layouts have (one of them is enough to tell).
_OFFICIAL_MARKERS = (
    re.compile(r"^encoder\.encoder\.\d+\.layers\.\d+\."),  # AIFI (RT-DETRv4, DEIMv2 S..X, N)
    re.compile(r"^decoder\.decoder\.layers\.\d+\."),  # every official decoder
    re.compile(r"^backbone\.dinov3\."),  # DEIMv2 ViT sizes
)
# Keys recomputed by our modules, not weights.
_DROPPED = (
    re.compile(r"^decoder\.(anchors|valid_mask)$"),
    re.compile(r"^decoder\.(decoder\.)?(up|reg_scale)$"),
    re.compile(r"\.cross_attn\.num_points_scale$"),
    re.compile(r"^backbone\.dinov3\.(_model\.)?rope_embed\.periods$"),
)
_STA_STAGES = {"stem": "stem", "conv2": "down8", "conv3": "down16", "conv4": "down32"}

# (pattern, replacement) applied in order, the first match wins; keys matching none keep their name.
_COMMON_RULES: tuple[tuple[re.Pattern, str | Callable[[re.Match], str]], ...] = (
    (re.compile(r"^encoder\.encoder\.0\.layers\.0\.(.*)$"), r"encoder.aifi.\1"),
    (re.compile(r"^encoder\.downsample_convs\.(\d+)\.0\.(.*)$"), r"encoder.downsample_convs.\1.\2"),
    (re.compile(r"^encoder\.feature_projector\.0\.(.*)$"), r"dsi.\1"),
    (re.compile(r"^encoder\.bi_fusion\.cv\.(.*)$"), r"encoder.bi_fusion.\1"),
    (re.compile(r"^encoder\.(down_sample\d)\.1\.weight$"), r"encoder.\1.1.conv.weight"),
    (re.compile(r"^encoder\.(down_sample\d)\.2\.(.*)$"), r"encoder.\1.1.norm.\2"),
    (re.compile(r"^decoder\.decoder\.(layers|lqe_layers)\.(.*)$"), r"decoder.\1.\2"),
    (re.compile(r"^backbone\.sta\.(stem|conv2|conv3|conv4)\.(.*)$"),
     lambda m: f"sta.detail.{_STA_STAGES[m.group(1)]}.{m.group(2)}"),
    (re.compile(r"^backbone\.convs\.(\d+)\.(.*)$"), r"sta.fuse.\1.0.\2"),
    (re.compile(r"^backbone\.norms\.(\d+)\.(.*)$"), r"sta.fuse.\1.1.\2"),
)
_DECODER_LAYER_RULES = (
    (re.compile(r"^(decoder\.layers\.\d+\.)swish_ffn\.(.*)$"), r"\1swiglu.\2"),
    (re.compile(r"^(decoder\.layers\.\d+\.(?:norm\d|gateway\.norm))\.scale$"), r"\1.weight"),
)
_HGNET_TIMM_RULES = (
    (re.compile(r"^backbone\.stem\.(.*)$"), r"backbone.body.stem.\1"),
    (re.compile(r"^backbone\.stages\.(\d+)\.(.*)$"), r"backbone.body.stages_\1.\2"),
)
_DISTILLED_VIT = re.compile(r"^backbone\.dinov3\._model\.(.*)$")
_DINOV3_VIT = re.compile(r"^backbone\.dinov3\.(.*)$")


def looks_official(state_dict: Mapping[str, object]) -> bool:
    """Whether ``state_dict`` (a bare model state dict) has the official RT-DETRv4 / DEIMv2 key layout."""
    return any(pattern.match(key) for key in state_dict for pattern in _OFFICIAL_MARKERS)


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        match = pattern.match(key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return key


def _backbone_kind(student_name: str) -> str:
    """``hgnet_timm`` (ours wraps timm's HGNetv2 in ``.body``), ``hgnet_pruned`` or ``vit``."""
    if student_name.startswith("rtdetrv4_"):
        return "hgnet_timm"
    if student_name.startswith("deimv2_"):
        if student_name not in DEIMV2_SPECS:
            raise KeyError(f"convert_official_state_dict: unknown DEIMv2 student {student_name!r}; expected one of "
                           f"{sorted(DEIMV2_SPECS)}")
        backbone = DEIMV2_SPECS[student_name].backbone
        if backbone in PRUNED_HGNETV2:
            return "hgnet_pruned"
        return "hgnet_timm" if backbone.startswith("hgnetv2_") else "vit"
    raise KeyError(f"convert_official_state_dict: {student_name!r} is not an RT-DETRv4 (rtdetrv4_*) or DEIMv2 "
                   "(deimv2_*) student")


def _split_qkv_bias(vit_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The distilled ViT's fused ``attn.qkv.bias`` -> timm Eva's ``q_bias``, ``k_bias`` (a parameter here), ``v_bias``."""
    out = {}
    for key, value in vit_state.items():
        if key.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3, dim=0)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "k_bias")] = k
            out[key.replace("qkv.bias", "v_bias")] = v
        else:
            out[key] = value
    return out


def _convert_dinov3_vit(student_name: str, vit_state: dict[str, torch.Tensor], vit: nn.Module | None,
                        source: str) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 ViT-S/S+ layout (L/X) -> our timm Eva, as the backbone loader converts it.

    timm's own converter needs the architecture: ``vit``, the ViT of the model the weights go into
    (its ``backbone`` override honoured: with the ``_qkvb`` variants, the registered L/X backbones,
    trained query/value biases are kept), or else the registered size's ViT built on the meta
    device (no memory). A backbone without q/v biases drops zero ones and refuses non-zero ones,
    naming the ``_qkvb`` variant; what our backbone prunes (blocks after the last used one, the
    unused final norm, the classification head) is left out.
    """
    if vit is None:
        spec = DEIMV2_SPECS[student_name]
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "randomly initialised": this copy only describes the architecture
            vit = DINOv3ViTBackbone(spec.backbone, layers=spec.vit_layers, norm_outputs=spec.vit_norm).vit
    depth = len(vit.blocks)
    vit_state = {k: v for k, v in vit_state.items()  # blocks our backbone prunes, before timm's filter sees them
                 if not (re.match(r"^blocks\.(\d+)\.", k) and int(k.split(".")[1]) >= depth)}
    converted = convert_vit_state(vit_state, vit, source)
    keeps_norm = not isinstance(getattr(vit, "norm", None), nn.Identity)
    keep = []
    for key in converted:
        block = re.match(r"^blocks\.(\d+)\.", key)
        if (block and int(block.group(1)) >= depth) or re.match(r"^(head|fc_norm|head_drop)\.", key) or (
                key.startswith("norm.") and not keeps_norm) or key == "mask_token":
            continue
        keep.append(key)
    return {k: converted[k] for k in keep}


def convert_official_state_dict(student_name: str, state_dict: Mapping[str, torch.Tensor], *,
                                vit: nn.Module | None = None, source: str = "official state dict"
                                ) -> dict[str, torch.Tensor]:
    """Official RT-DETRv4 / DEIMv2 model keys -> the keys of ``build_student(student_name)``.

    ``state_dict`` is the bare model state dict (a release ``.pth``'s ``ema.module`` or ``model``);
    ``vit`` the ViT of the model it goes into (DEIMv2 L/X: the architecture timm's converter
    needs; by default the registered size's), ``source`` what errors call the state dict (the
    file). Raises :class:`~.errors.WeightsError` when a key has the official layout's shape of
    name but no mapping (a summary with counts first, then the names); checking the result against
    the model (missing / unexpected / mis-shaped keys) is the loader's job.
    """
    kind = _backbone_kind(student_name)
    rules = _COMMON_RULES + (_HGNET_TIMM_RULES if kind == "hgnet_timm" else ())
    out: dict[str, torch.Tensor] = {}
    vit_distilled: dict[str, torch.Tensor] = {}
    vit_dinov3: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    dropped = 0
    for key, value in state_dict.items():
        if any(pattern.search(key) for pattern in _DROPPED):
            dropped += 1
            continue
        distilled, dinov3 = _DISTILLED_VIT.match(key), _DINOV3_VIT.match(key)
        if distilled:
            vit_distilled[distilled.group(1)] = value
            continue
        if dinov3:
            vit_dinov3[dinov3.group(1)] = value
            continue
        new = _rename(_rename(key, rules), _DECODER_LAYER_RULES)
        if new.startswith(("encoder.encoder.", "decoder.decoder.", "backbone.sta.", "backbone.convs.",
                           "backbone.norms.")):
            unmapped.append(key)  # an official module path with no counterpart here
            continue
        out[new] = value
    if (vit_distilled or vit_dinov3) and kind != "vit":
        unmapped.extend(f"backbone.dinov3.{k}" for k in (*vit_distilled, *vit_dinov3))
    if unmapped:
        raise WeightsError(f"{source} does not fit {student_name}: {len(unmapped)} of {len(state_dict)} "
                           f"official keys have no counterpart ({dropped} recomputed keys dropped)\n  "
                           f"{sorted(unmapped)[:20]}{' ...' if len(unmapped) > 20 else ''}")
    if vit_distilled:
        out.update({f"backbone.vit.{k}": v for k, v in _split_qkv_bias(vit_distilled).items()})
    if vit_dinov3:
        out.update({f"backbone.vit.{k}": v for k, v in _convert_dinov3_vit(student_name, vit_dinov3, vit, source).items()})
    return out
