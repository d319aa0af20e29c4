"""DEIMv2 students (arXiv 2509.20787): DINOv3 ViT + STA or pruned HGNetv2, DEIMv2 encoder, D-FINE decoder.

Built from the same parts as RT-DETRv4 (:mod:`.encoder`, :mod:`.decoder` with its DEIMv2
options, :mod:`.backbone`) plus the Spatial Tuning Adapter (:mod:`.sta`). Sizes
(``build_deimv2(name)``), from the official ``configs/deimv2/deimv2_*_coco.yml`` over
``configs/base/deimv2.yml``; params / GFLOPs are the paper's (README model zoo), GFLOPs at the
model's own input size:

=======  ==============================  ==========  =================  ======  =====  =========  ==========
name     backbone (blocks / levels)      STA c, out  encoder            hidden  dec.   input      params / G
=======  ==============================  ==========  =================  ======  =====  =========  ==========
x        DINOv3 ViT-S+/16 (5, 8, 11)     64, 256     hybrid 1.25/1.37   256     6 L    640        50.3 M / 151.6
l        DINOv3 ViT-S/16 (5, 8, 11)      32, 224     hybrid 1.0/1.0     224     4 L    640        32.2 M / 96.7
m        ViT-Tiny+ 256-d (3, 7, 11)      16, 256     hybrid 0.67/1.0    256     4 L    640        18.1 M / 52.2
s        ViT-Tiny 192-d (3, 7, 11)       16, 192     hybrid 0.34/0.67   192     4 L    640        9.7 M / 25.6
n        HGNetv2-B0, strides 16, 32      -           hybrid 0.34/0.5    128     3 L    640        3.6 M / 6.8
pico     B0 without stage 4 (/16)        -           lite 0.34/0.5      112     3 L    640        1.5 M / 5.2
femto    Pico, 1 block in stage 3        -           lite 0.34/0.5      96      3 L    416        1.0 M / 1.7
atto     Femto, stage 3 at 256 ch, k3    -           lite 0.34/0.5      64      3 L    320        0.49 M / 0.8
=======  ==============================  ==========  =================  ======  =====  =========  ==========

(encoder column: CCFF ``expansion / depth_mult``.) Shared: 8 attention heads everywhere, 300
queries (pico 200, femto 150, atto 100), 100 denoising queries, reg_max 32, reg_scale 4, SiLU
in CCFF and decoder, GELU in AIFI. Decoder FFN widths: x 2048, l 1792, m / s 512, n 512, pico
320, femto 256, atto 160. Points per level: [3, 6, 3] (three levels), n [6, 6], lite [4, 2].

What differs from RT-DETRv4 besides the backbone:

* **Encoder.** DEIMv2's hybrid encoder fuses levels by *sum* instead of concatenation, and its
  CSP stages are ``RepC3``-style (one 1x1 conv split in two halves, RepVGG blocks on one half,
  the halves added); the S/M/L/X fusion block drops the 3x3 convs after each CSP stage
  (official ``version: deim``, :class:`GELANBlock` with ``post_conv=False``), N keeps them
  (``version: dfine``). Input projections are skipped when a level already has ``hidden``
  channels. Pico/Femto/Atto use :class:`LiteEncoder`: one stride-16 input, a stride-32 level
  made by average pooling and a global-average-pool fusion, one top-down and one bottom-up
  GELAN block, no attention.
* **Decoder.** :class:`~.decoder.DFINEDecoder` with ``ffn="swiglu"``, ``norm="rmsnorm"``,
  ``share_query_pos=True``, a 3-layer position head, no ``enc_output``; the ultra-light sizes
  also drop the gate and share one box head.
* **Input.** The DINOv3 sizes normalise with ImageNet mean / std inside the model (the official
  DINOv3 configs do it in the data pipeline; our pipeline hands every student [0, 1] RGB);
  the HGNetv2 sizes take [0, 1] RGB unnormalised, like RT-DETRv4 and the official configs.

Backbone weights (``backbone_weights``, a local file, ``torch.load(weights_only=True)`` or
safetensors): for ViTs, timm layout, official DINOv3 layout (``storage_tokens``,
``ls1.gamma``, fused ``qkv.bias``; converted with timm's own filter) or the official distilled
ViT-Tiny layout (``vitt_distill.pt``: ``qkv.bias``, ``rope_embed.periods``), optionally under a
``dinov3.`` / ``_model.`` / ``backbone.dinov3.`` prefix. Without weights the ViT is randomly
initialised and a warning says so; nothing is ever downloaded. For HGNetv2-B0 (N) the
:class:`~.backbone.HGNetv2Backbone` rules apply; the pruned Pico/Femto/Atto load the tensors
of a B0 checkpoint that fit (the official code does the same) and report what did not.

Training details that follow the official code: the distilled ViT of S/M learns its attention
key bias (a parameter, loaded from official weights; timm's ``Eva`` would hold a fixed zero);
L/X rescale the RoPE coordinates in training (``vit_rope_rescale_coords=2``, the official
``pos_embed_rope_rescale_coords``) and train the DINOv3 ViT's query and value biases (the official
``qkv_bias: True`` with the key bias masked, ``finetune: True``): their backbones are timm's
``_qkvb`` variants, so release checkpoints with trained q/v biases load and keep them. The
official STA and runtime (``sync_bn: True``) use
SyncBatchNorm for multi-GPU training: here the modules hold BatchNorm2d (same state-dict keys)
and :mod:`distillery.platform.engine.norm_sync` converts them to SyncBatchNorm on NCCL runs (CPU/gloo
runs average the running statistics instead). Backbones live in :mod:`.deimv2_backbone`.

Not here: the ``wide`` decoder layers (``layer_scale`` > 1; every DEIMv2 recipe has 1), the
``discrete`` cross-attention and ``agnostic`` query selection options, and DEIMv2's
extra-level input projections (no recipe uses them). The criterion is RT-DETRv4's (DEIM's),
with each size's official settings (:func:`~.criterion.criterion_options`: the matcher change,
and for the ultra-light sizes no FGL/DDF losses and no union set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .criterion import OFFICIAL_CRITERION_OPTIONS
from .decoder import DFINEDecoder
from .deimv2_backbone import (
    DISTILLED_VIT,
    PRUNED_HGNETV2,
    TIMM_DINOV3_VITS,
    DINOv3ViTBackbone,
    HGNetv2Levels,
    PrunedHGNetv2,
)
from .detector import Detector, DetectorSpec, build_decoder, build_dsi, check_eval_spatial_size, spec_from_overrides
from .encoder import ConvNormAct, ELANBlock, HybridEncoder, RepVGGBlock
from .families import StudentFamily
from .peft import apply_peft
from .sta import SpatialTuningAdapter

__all__ = [
    "DEIMV2_COMPONENTS",
    "DEIMV2_SPECS",
    "DEIMv2",
    "DEIMv2HybridEncoder",
    "DEIMv2Spec",
    "DINOv3ViTBackbone",
    "GELANBlock",
    "HGNetv2Levels",
    "LiteEncoder",
    "PrunedHGNetv2",
    "RepC3",
    "apply_backbone_peft",
    "build_deimv2",
]


DEIMV2_COMPONENTS = ("backbone", "sta", "aifi", "ccff", "decoder", "dsi")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class DEIMv2Spec(DetectorSpec):
    """Every architectural number of a DEIMv2 student (its own below, the shared ones in
    :class:`~.detector.DetectorSpec`); ``build_deimv2`` overrides any of them by name.

    ``backbone``: "dinov3_distilled", a timm DINOv3 name, "hgnetv2_b0".."b6", "hgnetv2_pico|femto|atto".
    """

    # ViT backbones (a timm DINOv3 variant takes vit_dim / vit_heads too: its own are 384 / 6)
    vit_dim: int = 192
    vit_depth: int = 12
    vit_heads: int = 3
    vit_mlp_ratio: float = 4.0
    vit_layers: tuple[int, ...] = (3, 7, 11)  # blocks whose outputs feed the pyramid (shallow first)
    vit_norm: bool = False  # apply the ViT's final norm to those outputs (official DINOv3 S/S+: yes)
    # train-time RoPE coordinate rescaling factor R (log-uniform in [1/R, R]); official L/X: 2
    vit_rope_rescale_coords: float | None = None
    sta_channels: int = 16  # detail CNN width c (0: no detail branch)
    sta_dim: int | None = None  # STA output channels; None = ViT width
    normalize_input: bool = True  # ImageNet mean/std inside the model (DINOv3 sizes)
    # HGNetv2 backbones: timm stage indices whose outputs are used (1, 2, 3 = strides 8, 16, 32)
    backbone_levels: tuple[int, ...] = (1, 2, 3)
    # encoder
    encoder: str = "hybrid"  # "hybrid" (AIFI + CCFF) or "lite"
    ccff_block: str = "elan5"  # "elan5" (official version deim) or "elan4" (version dfine)
    # decoder
    decoder_ffn: str = "swiglu"
    decoder_norm: str = "rmsnorm"
    share_query_pos: bool = True
    query_pos_layers: int = 3
    query_pos_hidden: int | None = None  # None = decoder_hidden_dim
    enc_output: bool = False
    use_gateway: bool = True
    share_bbox_head: bool = False
    # training
    dsi: bool = False  # DEIMv2 has no DSI; the platform may switch RT-DETRv4's on


_DINOV3_L_X = dict(vit_dim=384, vit_heads=6, vit_layers=(5, 8, 11), vit_norm=True, vit_rope_rescale_coords=2.0)
_LITE = dict(normalize_input=False, encoder="lite", ccff_block="elan4", expansion=0.34, depth_mult=0.5,
             num_decoder_layers=3, num_points=(4, 2), use_gateway=False, share_bbox_head=True)

DEIMV2_SPECS: dict[str, DEIMv2Spec] = {
    "deimv2_x": DEIMv2Spec(backbone="vit_small_plus_patch16_dinov3_qkvb", **_DINOV3_L_X, sta_channels=64, sta_dim=256,
                           encoder_hidden_dim=256, encoder_ffn_dim=1024, expansion=1.25, depth_mult=1.37,
                           decoder_hidden_dim=256, decoder_ffn_dim=2048, num_decoder_layers=6),
    "deimv2_l": DEIMv2Spec(backbone="vit_small_patch16_dinov3_qkvb", **_DINOV3_L_X, sta_channels=32, sta_dim=224,
                           encoder_hidden_dim=224, encoder_ffn_dim=896, expansion=1.0, depth_mult=1.0,
                           decoder_hidden_dim=224, decoder_ffn_dim=1792, num_decoder_layers=4),
    "deimv2_m": DEIMv2Spec(backbone=DISTILLED_VIT, vit_dim=256, vit_heads=4, sta_channels=16,
                           encoder_hidden_dim=256, encoder_ffn_dim=512, expansion=0.67, depth_mult=1.0,
                           decoder_hidden_dim=256, decoder_ffn_dim=512, num_decoder_layers=4),
    "deimv2_s": DEIMv2Spec(backbone=DISTILLED_VIT, vit_dim=192, vit_heads=3, sta_channels=16,
                           encoder_hidden_dim=192, encoder_ffn_dim=512, expansion=0.34, depth_mult=0.67,
                           decoder_hidden_dim=192, decoder_ffn_dim=512, num_decoder_layers=4),
    "deimv2_n": DEIMv2Spec(backbone="hgnetv2_b0", backbone_levels=(2, 3), normalize_input=False, ccff_block="elan4",
                           encoder_hidden_dim=128, encoder_ffn_dim=512, expansion=0.34, depth_mult=0.5,
                           decoder_hidden_dim=128, decoder_ffn_dim=512, num_decoder_layers=3, num_points=(6, 6)),
    "deimv2_pico": DEIMv2Spec(backbone="hgnetv2_pico", **_LITE, encoder_hidden_dim=112, decoder_hidden_dim=112,
                              decoder_ffn_dim=320, num_queries=200),
    "deimv2_femto": DEIMv2Spec(backbone="hgnetv2_femto", **_LITE, encoder_hidden_dim=96, decoder_hidden_dim=96,
                               decoder_ffn_dim=256, num_queries=150, eval_spatial_size=(416, 416)),
    "deimv2_atto": DEIMv2Spec(backbone="hgnetv2_atto", **_LITE, encoder_hidden_dim=64, decoder_hidden_dim=64,
                              decoder_ffn_dim=160, num_queries=100, eval_spatial_size=(320, 320)),
    # Same classes as S (distilled ViT + STA + DEIMv2 encoder/decoder), small numbers: CPU tests
    # and smoke training. Not a paper model.
    "deimv2_tiny": DEIMv2Spec(backbone=DISTILLED_VIT, vit_dim=64, vit_depth=3, vit_heads=2, vit_layers=(0, 1, 2),
                              sta_channels=8, encoder_hidden_dim=64, encoder_ffn_dim=128, encoder_heads=4,
                              expansion=0.34, depth_mult=0.34, decoder_hidden_dim=64, decoder_ffn_dim=128,
                              decoder_heads=4, num_decoder_layers=2, num_queries=30, num_denoising=20,
                              eval_spatial_size=(256, 256)),
}


# ------------------------------------------------------------------------------------------ encoder blocks
class RepC3(nn.Module):
    """CSP stage of DEIMv2 (the reference's ``CSPLayer2``): ``a, b = conv1(x).chunk(2)``; ``a + blocks(b)``."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, act: str | None = "silu"):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, 2 * out_channels, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVGGBlock(out_channels, out_channels, act=act)
                                           for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv1(x).chunk(2, dim=1)
        return a + self.bottlenecks(b)


class GELANBlock(ELANBlock):
    """GELAN fusion block with :class:`RepC3` stages (:class:`~.encoder.ELANBlock`).

    ``post_conv=True`` (a 3x3 conv after each stage) is the reference's ``RepNCSPELAN4`` with
    ``csp2`` stages (DEIMv2-N and the lite encoder), ``False`` its ``RepNCSPELAN5`` (S/M/L/X).
    """

    def __init__(self, in_channels: int, out_channels: int, split_channels: int, branch_channels: int,
                 num_blocks: int = 3, act: str | None = "silu", post_conv: bool = False):
        def stage(c_in: int, c_out: int) -> nn.Sequential:
            layers = [RepC3(c_in, c_out, num_blocks, act=act)]
            if post_conv:
                layers.append(ConvNormAct(c_out, c_out, 3, act=act))
            return nn.Sequential(*layers)

        super().__init__(in_channels, out_channels, split_channels, branch_channels, stage, act)


def _fusion_block(hidden: int, expansion: float, depth_mult: float, act: str, post_conv: bool) -> GELANBlock:
    # Official numbers: c3 = 2 * hidden, c4 = round(expansion * hidden // 2), n = round(3 * depth_mult).
    branch = round(expansion * hidden // 2)
    if branch < 1:
        raise ValueError(f"encoder expansion {expansion} leaves no CSP channels at hidden width {hidden}")
    return GELANBlock(hidden, hidden, 2 * hidden, branch, round(3 * depth_mult), act=act, post_conv=post_conv)


class DEIMv2HybridEncoder(HybridEncoder):
    """AIFI on the deepest level, then a CCFF that fuses levels by summation (DEIMv2 ``fuse_op: sum``)
    with GELAN blocks: :class:`~.encoder.HybridEncoder` with DEIMv2's options.

    Returns ``([P_1 .. P_L], F5)``; AIFI's parameters are under ``aifi.`` so that GAM/DSI find them.
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024,
                 aifi_act: str = "gelu", expansion: float = 1.0, depth_mult: float = 1.0, act: str = "silu",
                 block: str = "elan5"):
        if block not in ("elan5", "elan4"):
            raise ValueError(f"DEIMv2HybridEncoder: ccff_block must be 'elan5' or 'elan4', got {block!r}")
        post_conv = block == "elan4"
        super().__init__(in_channels, hidden_dim, num_heads, ffn_dim, 0.0, aifi_act, expansion, depth_mult, act,
                         fuse="sum", identity_proj=True,
                         fusion_block=lambda: _fusion_block(hidden_dim, expansion, depth_mult, act, post_conv))


class LiteEncoder(nn.Module):
    """DEIMv2's encoder for the ultra-light sizes: one stride-16 input -> ``[P16, P32]``, no attention.

    ``input_proj`` (1x1 conv + BN) to ``hidden``; P32 = ``down_sample1`` (3x3/2 average pool, 1x1
    conv, BN, act) of it, plus its global average, through a 1x1 conv (``bi_fusion``);
    ``out16 = fpn_block(P16 + up2(P32))``, ``out32 = pan_block(P32 + down_sample2(out16))``.
    Returns ``([out16, out32], P32)``; P32 (the global-context map at stride 32) plays F5's role
    for an optional DSI loss.
    """

    def __init__(self, in_channels: Sequence[int], hidden_dim: int = 112, expansion: float = 0.34,
                 depth_mult: float = 0.5, act: str = "silu"):
        super().__init__()
        if len(in_channels) != 1:
            raise ValueError(f"LiteEncoder: expects one input level, got in_channels={list(in_channels)}")
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.input_proj = nn.ModuleList([ConvNormAct(in_channels[0], hidden_dim, 1)])

        def down() -> nn.Sequential:
            return nn.Sequential(nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
                                 ConvNormAct(hidden_dim, hidden_dim, 1, act=act))

        self.down_sample1 = down()
        self.down_sample2 = down()
        self.bi_fusion = ConvNormAct(hidden_dim, hidden_dim, 1, act=act)
        self.fpn_block = _fusion_block(hidden_dim, expansion, depth_mult, act, post_conv=True)
        self.pan_block = _fusion_block(hidden_dim, expansion, depth_mult, act, post_conv=True)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        if len(features) != 1:
            raise ValueError(f"LiteEncoder: expected 1 level, got {len(features)}")
        p16 = self.input_proj[0](features[0])
        p32 = self.down_sample1(p16)
        p32 = self.bi_fusion(p32 + p32.mean(dim=(2, 3), keepdim=True))
        out16 = self.fpn_block(p16 + F.interpolate(p32, scale_factor=2.0, mode="nearest"))
        out32 = self.pan_block(p32 + self.down_sample2(out16))
        return [out16, out32], p32


# ------------------------------------------------------------------------------------------ detector
class DEIMv2(Detector):
    """DEIMv2 detector: ``backbone`` [-> ``sta``] -> ``encoder`` -> ``decoder``; ``dsi`` optional, training-only.

    Same interface as :class:`~.rtdetrv4.RTDETRv4`: ``model(images)`` in eval mode (``images``
    (B, 3, H, W) float RGB in [0, 1], H and W multiples of 32) returns ``pred_logits`` /
    ``pred_boxes``; ``model(images, targets)`` in train mode returns everything
    :class:`~.criterion.RTDETRv4Criterion` reads, plus ``f5`` (the AIFI output; the lite encoder's
    stride-32 map). The STA is a top-level module (``sta.``) rather than part of the backbone so
    that the optimizer's backbone group (lower learning rate) holds the ViT alone, as the official
    recipes do, and :func:`~.peft.apply_peft` on ``backbone.vit`` leaves the STA trainable.
    """

    kind = "DEIMv2"
    components = DEIMV2_COMPONENTS
    component_prefixes = (("encoder.aifi.", "aifi"), ("backbone.", "backbone"), ("sta.", "sta"),
                          ("encoder.", "ccff"), ("decoder.", "decoder"), ("dsi.", "dsi"))

    def __init__(self, backbone: nn.Module, sta: SpatialTuningAdapter | None, encoder: nn.Module,
                 decoder: DFINEDecoder, dsi: nn.Module | None = None, eval_spatial_size: tuple[int, int] = (640, 640),
                 spec: DEIMv2Spec | None = None, normalize_input: bool = False):
        super().__init__({"backbone": backbone, "sta": sta, "encoder": encoder, "decoder": decoder, "dsi": dsi},
                         eval_spatial_size, spec, stride=32)
        self.normalize_input = bool(normalize_input)
        # Constants, not state: recomputed on construction, never in a checkpoint.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def vit(self) -> nn.Module:
        """The ViT of a DINOv3-backbone model (what PEFT adapts)."""
        vit = getattr(self.backbone, "vit", None)
        if vit is None:
            raise AttributeError(f"this DEIMv2 model has a {type(self.backbone).__name__} backbone, not a ViT")
        return vit

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.normalize_input:
            images = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        features = self.backbone(images)
        if self.sta is not None:
            features = self.sta(images, features)
        return features


def apply_backbone_peft(model: DEIMv2, method: str, **kwargs):
    """:func:`~.peft.apply_peft` on the model's ViT (``model.backbone.vit``); STA, encoder, decoder stay trainable.

    Returns the :class:`~.peft.PeftReport` of the ViT. HGNetv2 backbones have no ViT and raise.
    """
    try:
        vit = model.vit
    except AttributeError as exc:
        raise ValueError(f"apply_backbone_peft({method!r}): {exc}; PEFT adapters need a ViT backbone "
                         "(deimv2_s/m/l/x or deimv2_tiny)") from exc
    return apply_peft(vit, method, **kwargs)


# ------------------------------------------------------------------------------------------ build
def build_deimv2(name: str, **overrides) -> DEIMv2:
    """A DEIMv2 student by size name (``deimv2_x|l|m|s|n|pico|femto|atto|tiny``); any :class:`DEIMv2Spec`
    field is overridable.

    Common overrides (as :func:`~.rtdetrv4.build_student`): ``num_classes``, ``eval_spatial_size``
    (int or (H, W)), ``dsi`` / ``teacher_dim``, ``num_queries``, ``num_decoder_layers``,
    ``backbone_weights`` (a local file; see the module docstring). Unknown names raise ``TypeError``.
    """
    spec = spec_from_overrides(DEIMV2_SPECS, name, overrides, who="build_deimv2", family="DEIMv2 student",
                               tuple_fields=("num_points", "vit_layers", "backbone_levels"))
    return build_deimv2_from_spec(spec)


def _build_backbone(spec: DEIMv2Spec) -> tuple[nn.Module, SpatialTuningAdapter | None, list[int], list[int]]:
    """Backbone (+ STA for ViTs) and the channels / strides of the levels they hand the encoder."""
    if spec.backbone == DISTILLED_VIT or spec.backbone in TIMM_DINOV3_VITS:
        backbone = DINOv3ViTBackbone(spec.backbone, layers=spec.vit_layers, norm_outputs=spec.vit_norm,
                                     embed_dim=spec.vit_dim, depth=spec.vit_depth, num_heads=spec.vit_heads,
                                     mlp_ratio=spec.vit_mlp_ratio, weights=spec.backbone_weights,
                                     rope_rescale_coords=spec.vit_rope_rescale_coords)
        sta = SpatialTuningAdapter(backbone.embed_dim, spec.sta_dim, spec.sta_channels)
        return backbone, sta, sta.out_channels, sta.strides
    if spec.backbone in PRUNED_HGNETV2:
        backbone = PrunedHGNetv2(spec.backbone, weights=spec.backbone_weights)
    elif spec.backbone.startswith("hgnetv2_"):
        backbone = HGNetv2Levels(spec.backbone, levels=spec.backbone_levels, weights=spec.backbone_weights,
                                 freeze_at=spec.freeze_at, freeze_stem_only=spec.freeze_stem_only,
                                 freeze_norm=spec.freeze_norm)
    else:
        raise ValueError(f"unknown DEIMv2 backbone {spec.backbone!r}; expected {DISTILLED_VIT!r}, one of "
                         f"{TIMM_DINOV3_VITS}, an HGNetv2 variant or one of {sorted(PRUNED_HGNETV2)}")
    return backbone, None, list(backbone.out_channels), list(backbone.strides)


def build_deimv2_from_spec(spec: DEIMv2Spec) -> DEIMv2:
    """Assemble the modules described by ``spec``."""
    check_eval_spatial_size(spec)
    backbone, sta, channels, strides = _build_backbone(spec)
    if spec.encoder == "hybrid":
        encoder = DEIMv2HybridEncoder(channels, spec.encoder_hidden_dim, spec.encoder_heads, spec.encoder_ffn_dim,
                                      spec.aifi_act, spec.expansion, spec.depth_mult, spec.ccff_act, spec.ccff_block)
        levels = strides
    elif spec.encoder == "lite":
        encoder = LiteEncoder(channels, spec.encoder_hidden_dim, spec.expansion, spec.depth_mult, spec.ccff_act)
        levels = [strides[-1], 2 * strides[-1]]
    else:
        raise ValueError(f"unknown DEIMv2 encoder {spec.encoder!r}; expected 'hybrid' or 'lite'")
    if levels[-1] != 32:
        raise ValueError(f"DEIMv2: the deepest encoder level must be at stride 32, got strides {levels}")
    decoder = build_decoder(spec, levels, ffn=spec.decoder_ffn, norm=spec.decoder_norm,
                            share_query_pos=spec.share_query_pos, query_pos_layers=spec.query_pos_layers,
                            query_pos_hidden=spec.query_pos_hidden or spec.decoder_hidden_dim,
                            enc_output=spec.enc_output, use_gateway=spec.use_gateway,
                            share_bbox_head=spec.share_bbox_head)
    return DEIMv2(backbone, sta, encoder, decoder, build_dsi(spec), spec.eval_spatial_size, spec,
                  normalize_input=spec.normalize_input)


FAMILY = StudentFamily("DEIMv2", DEIMV2_SPECS, build_deimv2, peft=True,
                       criterion_options={n: OFFICIAL_CRITERION_OPTIONS[n] for n in DEIMV2_SPECS})
