"""DEIMv2 backbones: the DINOv3-family ViT (timm ``Eva``) and the HGNetv2 variants (levels subset, pruned B0).

Split out of :mod:`.deimv2` (which re-exports every name here). The distilled ViT-Tiny / Tiny+
of DEIMv2-S/M keeps a *trainable* key bias: the official ``Attention`` uses a plain
``nn.Linear(dim, 3 * dim, bias=True)``, and with RoPE rotating queries and keys after the bias,
the key bias changes the attention logits (softmax does not cancel it). timm's ``Eva`` holds a
fixed zero ``k_bias`` buffer; here it is replaced by a parameter. The DINOv3 ViT-S/S+ of L/X
mask their key bias to zero (``mask_k_bias``), so timm's fixed zero is right there.

``rope_rescale_coords`` is the official train-time RoPE coordinate rescaling of the DINOv3
ViT-S/S+ (``pos_embed_rope_rescale_coords: 2``): in training the RoPE coordinates are multiplied
by a log-uniform factor in [1/R, R], drawn afresh for every block as DINOv3 draws it (global
generator); no effect in eval.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from functools import partial
from typing import Sequence

import timm
import torch
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as timm_eva_checkpoint_filter
from timm.models.hgnet import HighPerfGpuStage, StemV2
from torch import nn

from .backbone import HGNetv2Backbone, load_state_dict_file
from .errors import WeightsError

__all__ = [
    "DISTILLED_VIT",
    "DINOv3ViTBackbone",
    "HGNetv2Levels",
    "PRUNED_HGNETV2",
    "PrunedHGNetv2",
    "TIMM_DINOV3_VITS",
    "convert_vit_state",
]

log = logging.getLogger(__name__)

# ViT backbones. "dinov3_distilled" is the official ViT-Tiny / Tiny+ architecture (distilled from
# DINOv3 ViT-S): a plain pre-norm ViT with a class token, no registers, no layer scale, qkv bias,
# 2-D RoPE (base 100) on the patch tokens, LayerNorm eps 1e-6; its width/depth/heads come from
# the spec. The other names are timm's DINOv3 models, created with pretrained=False.
DISTILLED_VIT = "dinov3_distilled"
TIMM_DINOV3_VITS = ("vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3",
                    "vit_small_plus_patch16_dinov3_qkvb")

# Pruned HGNetv2-B0 (paper Sec. 2; official engine/backbone/hgnetv2.py 'Pico'/'Femto'/'Atto'):
# stage = (in, mid, out, blocks, downsample, light block, kernel, layers per block).
_B0_STAGE1 = (16, 16, 64, 1, False, False, 3, 3)
_B0_STAGE2 = (64, 32, 256, 1, True, False, 3, 3)
PRUNED_HGNETV2: dict[str, tuple[tuple, ...]] = {
    "hgnetv2_pico": (_B0_STAGE1, _B0_STAGE2, (256, 64, 512, 2, True, True, 5, 3)),  # B0 minus stage 4
    "hgnetv2_femto": (_B0_STAGE1, _B0_STAGE2, (256, 64, 512, 1, True, True, 5, 3)),  # one block in stage 3
    "hgnetv2_atto": (_B0_STAGE1, _B0_STAGE2, (256, 64, 256, 1, True, True, 3, 3)),  # 256 channels, 3x3
}


# ------------------------------------------------------------------------------------------ ViT backbone
def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the ViT's tensors of a checkpoint that may hold a whole detector or a wrapper."""
    for prefix in ("module.backbone.dinov3._model.", "backbone.dinov3._model.", "module.backbone.dinov3.",
                   "backbone.dinov3.", "dinov3._model.", "dinov3.", "_model.", "backbone.vit.", "vit.", "module."):
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    return state


def convert_vit_state(state: dict[str, torch.Tensor], vit: nn.Module,
                       path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Official DINOv3 / distilled-ViT / timm layouts -> this timm Eva's names."""
    state = _strip_prefix(state)
    has_qv_bias = getattr(vit.blocks[0].attn, "q_bias", None) is not None
    if not has_qv_bias:
        # timm's plain DINOv3 models have no q/v bias (the released ViT-S/S+ biases are zero); a
        # checkpoint with non-zero ones needs the ``_qkvb`` variant, dropping them would change it.
        for key in [k for k in state if k.endswith("attn.qkv.bias")]:
            q, _, v = state.pop(key).chunk(3, dim=0)
            if bool(q.any()) or bool(v.any()):
                raise WeightsError(f"backbone weights {path}: {key} has non-zero query/value biases but the "
                                   f"backbone has none; use the '_qkvb' timm variant (e.g. backbone="
                                   f"'vit_small_patch16_dinov3_qkvb')")
    if "storage_tokens" in state or any(".ls1.gamma" in k for k in state):
        # Official DINOv3 layout: timm's own converter (storage tokens, layer scale, q/v bias split).
        return timm_eva_checkpoint_filter(state, vit)
    out = {}
    for key, value in state.items():
        if key.startswith("rope_embed.") or key.endswith(".bias_mask") or key == "mask_token":
            continue  # fixed RoPE periods are recomputed; masks are pretraining-only
        if key.endswith("attn.qkv.bias"):
            # Fused q/k/v bias -> timm's q_bias, k_bias, v_bias. The key bias is kept: RoPE rotates
            # the biased keys, so q . R(b_k) differs from key to key and softmax does not cancel it.
            q, k, v = value.chunk(3, dim=0)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "k_bias")] = k
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        out[key] = value
    return out


def _make_key_bias_trainable(vit: nn.Module) -> None:
    """Replace timm's fixed zero ``k_bias`` buffer of every attention by a zero-initialised parameter.

    The official distilled ViT-Tiny / Tiny+ attention is ``nn.Linear(dim, 3 * dim, bias=True)``:
    its key bias is learnt and the released S/M weights carry non-zero values.
    """
    for block in vit.blocks:
        attn = block.attn
        if getattr(attn, "q_bias", None) is None:
            continue
        zeros = torch.zeros_like(attn.k_bias)
        del attn.k_bias  # the non-persistent buffer
        attn.k_bias = nn.Parameter(zeros)


class DINOv3ViTBackbone(nn.Module):
    """A DINOv3-family ViT (timm ``Eva``) returning the stride-16 maps of chosen blocks.

    ``vit`` is the bare timm model (the module :func:`~.peft.apply_peft` adapts); blocks after the
    last chosen one are removed, and so is the final norm when ``norm_outputs`` is off, so that
    every parameter is used. ``forward(images)`` gives ``len(layers)`` maps ``(B, D, H/16, W/16)``.
    """

    def __init__(self, variant: str = DISTILLED_VIT, *, layers: Sequence[int] = (3, 7, 11),
                 norm_outputs: bool = False, embed_dim: int | None = None, depth: int = 12,
                 num_heads: int | None = None, mlp_ratio: float = 4.0, weights: str | os.PathLike | None = None,
                 rope_rescale_coords: float | None = None):
        super().__init__()
        if variant == DISTILLED_VIT:
            embed_dim = 192 if embed_dim is None else embed_dim
            num_heads = 3 if num_heads is None else num_heads
            if embed_dim % num_heads or (embed_dim // num_heads) % 4:
                raise ValueError(f"DINOv3ViTBackbone: embed_dim {embed_dim} / num_heads {num_heads} must give a head "
                                 "width divisible by 4 (2-D RoPE)")
            self.vit = Eva(patch_size=16, num_classes=0, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, qkv_bias=True, init_values=None, class_token=True,
                           num_reg_tokens=0, use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="dinov3",
                           rope_temperature=100, rope_rotate_half=True, use_fc_norm=False,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6), dynamic_img_size=True,
                           rope_rescale_coords=rope_rescale_coords)
            _make_key_bias_trainable(self.vit)
        elif variant in TIMM_DINOV3_VITS:
            # pretrained=False always: weights only ever come from an explicit local file.
            # embed_dim / num_heads: None keeps the variant's (384 / 6); other widths build reduced
            # copies of the same architecture (the parity fixtures' DEIMv2 L/X).
            widths = {k: v for k, v in (("embed_dim", embed_dim), ("num_heads", num_heads)) if v is not None}
            self.vit = timm.create_model(variant, pretrained=False, num_classes=0, dynamic_img_size=True,
                                         rope_rescale_coords=rope_rescale_coords, **widths)
        else:
            raise ValueError(f"unknown ViT backbone {variant!r}; expected {DISTILLED_VIT!r} or one of "
                             f"{TIMM_DINOV3_VITS}")
        self.variant = variant
        self.layers = tuple(int(i) for i in layers)
        depth_now = len(self.vit.blocks)
        if not self.layers or any(not 0 <= i < depth_now for i in self.layers) or list(self.layers) != sorted(
                set(self.layers)):
            raise ValueError(f"DINOv3ViTBackbone: vit_layers {self.layers} must be increasing block indices in "
                             f"[0, {depth_now})")
        self.norm_outputs = bool(norm_outputs)
        self.vit.prune_intermediate_layers(list(self.layers), prune_norm=not self.norm_outputs, prune_head=True)
        self.embed_dim = int(self.vit.embed_dim)
        self.patch_size = 16
        if weights is not None:
            self.load_weights(weights)
        else:
            warnings.warn(f"DEIMv2 backbone {variant} (width {self.embed_dim}): no backbone_weights given, the ViT "
                          "is randomly initialised (nothing is downloaded); pass a local DINOv3 checkpoint for "
                          "real training", UserWarning, stacklevel=3)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        rope = getattr(self.vit, "rope", None)
        if not (self.training and getattr(rope, "aug_active", False)):
            return self.vit.forward_intermediates(images, indices=list(self.layers), norm=self.norm_outputs,
                                                  output_fmt="NCHW", intermediates_only=True)
        # Training with RoPE coordinate augmentation (L/X): DINOv3 draws a fresh augmentation for
        # every block (the official ``rope_embed(H, W)`` sits inside the block loop); timm's
        # forward_intermediates draws one for all blocks. Same tokens, norms and outputs otherwise.
        vit = self.vit
        batch = images.shape[0]
        x = vit.patch_embed(images)  # (B, H, W, C): dynamic_img_size
        height, width = x.shape[1:3]
        x, embed = vit._pos_embed(x)  # the first block's draw
        x = vit.norm_pre(x)
        outputs = []
        for i, block in enumerate(vit.blocks):
            if i:
                embed = rope.get_embed(shape=(height, width))
            x = block(x, rope=embed)
            if i in self.layers:
                outputs.append(vit.norm(x) if self.norm_outputs else x)
        return [y[:, vit.num_prefix_tokens:].reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
                for y in outputs]

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a ViT checkpoint (timm, official DINOv3 or official distilled-ViT layout); mismatches raise."""
        state = convert_vit_state(load_state_dict_file(path), self.vit, path)
        depth = len(self.vit.blocks)
        dropped = re.compile(r"^(head|fc_norm|head_drop)\.")
        state = {k: v for k, v in state.items() if not dropped.match(k)}
        if not self.norm_outputs:
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        state = {k: v for k, v in state.items()  # blocks after the last used one were pruned
                 if not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth)}
        own = dict(self.vit.named_parameters())
        for key in [k for k in own if k.endswith("attn.k_bias")]:
            if key not in state and key.replace("k_bias", "q_bias") in state:
                # timm layout saved before the key bias was a parameter: it was a fixed zero then.
                state[key] = torch.zeros_like(own[key])
        for key in [k for k in own if k.endswith(("attn.q_bias", "attn.v_bias"))]:
            if key not in state and key.rsplit(".", 1)[0] + ".qkv.weight" in state:
                # a timm file of the variant without q/v biases (e.g. vit_small_patch16_dinov3) into the
                # '_qkvb' one: zero biases, as Meta's released ViT-S/S+ hold them
                state[key] = torch.zeros_like(own[key])
        missing = sorted(set(own) - set(state))
        unexpected = sorted(k for k in set(state) - set(own) if k not in dict(self.vit.named_buffers()))
        if missing or unexpected:
            raise WeightsError(f"backbone weights {path} do not fit {self.variant} (width {self.embed_dim}): "
                           f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
                           f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
                           f"({len(unexpected)})")
        wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(p.shape)}" for k, p in own.items()
                 if tuple(state[k].shape) != tuple(p.shape)]
        if wrong:
            raise WeightsError(f"backbone weights {path} have wrong shapes for {self.variant}: {wrong[:20]}")
        self.vit.load_state_dict({k: state[k] for k in own}, strict=False)


# ------------------------------------------------------------------------------------------ HGNetv2 backbones
class HGNetv2Levels(HGNetv2Backbone):
    """:class:`~.backbone.HGNetv2Backbone` returning only some of its levels (DEIMv2-N: strides 16, 32)."""

    def __init__(self, variant: str = "hgnetv2_b0", *, levels: Sequence[int] = (2, 3), **kwargs):
        super().__init__(variant, **kwargs)
        all_levels = (1, 2, 3)
        if not levels or any(level not in all_levels for level in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"HGNetv2Levels: backbone_levels {tuple(levels)} must be increasing stage indices "
                             f"from {all_levels}")
        self.keep = [all_levels.index(level) for level in levels]
        self.out_channels = [self.out_channels[i] for i in self.keep]
        self.strides = [self.strides[i] for i in self.keep]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = super().forward(images)
        return [features[i] for i in self.keep]


class PrunedHGNetv2(nn.Module):
    """HGNetv2-B0 cut down for DEIMv2 Pico / Femto / Atto, from timm's HGNetv2 parts.

    The v2 stem and the first three B0 stages (the last one pruned per :data:`PRUNED_HGNETV2`),
    learnable affine blocks on (as B0). One output, the last stage at stride 16. Parameter names
    are those of timm's / the reference's classification model (``stem.*``, ``stages.N.*``).
    """

    def __init__(self, variant: str = "hgnetv2_pico", *, weights: str | os.PathLike | None = None):
        super().__init__()
        if variant not in PRUNED_HGNETV2:
            raise ValueError(f"unknown pruned backbone {variant!r}; expected one of {sorted(PRUNED_HGNETV2)}")
        self.variant = variant
        self.stem = StemV2(3, 16, 16, use_lab=True)
        stages = []
        stride = 4
        for in_ch, mid, out, blocks, down, light, kernel, layers in PRUNED_HGNETV2[variant]:
            stages.append(HighPerfGpuStage(in_ch, mid, out, block_num=blocks, layer_num=layers, downsample=down,
                                           light_block=light, kernel_size=kernel, use_lab=True, agg="se"))
            stride *= 2 if down else 1
        self.stages = nn.Sequential(*stages)
        self.out_channels = [PRUNED_HGNETV2[variant][-1][2]]
        self.strides = [stride]
        for module in self.modules():  # timm's HGNetv2 initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if weights is not None:
            self.load_weights(weights)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.stages(self.stem(images))]

    def load_weights(self, path: str | os.PathLike) -> dict[str, list[str]]:
        """Load every tensor of an HGNetv2 (B0) checkpoint that fits by name and shape.

        The pruned networks are initialised from B0 as in the official code: the stem and the
        first two stages fit entirely, the pruned stage partly. Returns and logs what was skipped;
        raises when nothing fits (a wrong file).
        """
        raw = load_state_dict_file(path)
        state = {re.sub(r"^stages_(\d+)\.", r"stages.\1.", k): v for k, v in raw.items()}
        own = self.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        if not fitting:
            raise WeightsError(f"backbone weights {path}: no tensor fits {self.variant} by name and shape "
                           f"(expected HGNetv2-B0 keys such as 'stem.stem1.conv.weight')")
        self.load_state_dict(fitting, strict=False)
        report = {"not_in_file": sorted(set(own) - set(fitting)),
                  "skipped_from_file": sorted(set(state) - set(fitting))}
        log.info("%s: loaded %d tensors from %s; %d model tensors keep their initialisation, %d file tensors "
                 "unused", self.variant, len(fitting), path, len(report["not_in_file"]),
                 len(report["skipped_from_file"]))
        return report
