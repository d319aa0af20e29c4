"""Spatial Tuning Adapter (STA) of DEIMv2: a multi-scale pyramid from a single-scale ViT.

A DINOv3 ViT sees the image in 16 x 16 patches and produces one feature map at stride 16 per
block. A DETR encoder wants three levels (strides 8, 16, 32). DEIMv2 (arXiv 2509.20787, Sec. 2)
gets them in two cheap, parallel ways and fuses them:

1. **Semantic path, parameter-free** (:class:`ViTPyramid`). The stride-16 outputs of three blocks
   (e.g. blocks 3 / 7 / 11 of ViT-Tiny, 5 / 8 / 11 of ViT-S) are resampled by bilinear
   interpolation to strides 8, 16 and 32 (x2, x1, x0.5). No convolution, no deconvolution (ViTDet
   uses learned deconvolutions here): this module has no parameters and no buffers (the tests
   check it). A single given map is used for all three levels.
2. **Detail path** (:class:`DetailBranch`): an ultra-light CNN on the image itself (a stride-2
   3x3 conv and a max-pool to stride 4, then three stride-2 3x3 convs) whose small receptive
   field supplies the fine detail the ViT's 16-pixel patches blur away. It outputs ``2c``, ``4c``
   and ``4c`` channels at strides 8, 16, 32 (``c`` = ``detail_channels``: 16 for DEIMv2-S/M,
   32 for L, 64 for X, as in the official configs).
3. **Fusion** (per level): concatenate semantic and detail maps, then a 1x1 conv (no bias) and a
   BatchNorm to ``out_dim`` channels (the official ``convs`` / ``norms``), no activation.

Numbers follow the official ``DINOv3STAs`` / ``SpatialPriorModulev2`` (read for facts; this is
our own code). The official module uses SyncBatchNorm; here it is BatchNorm2d (a distributed
wrapper may convert it).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DetailBranch", "SpatialTuningAdapter", "ViTPyramid"]

# Resampling factors from the ViT's stride 16 to the pyramid's strides 8, 16, 32.
PYRAMID_SCALES: tuple[float, ...] = (2.0, 1.0, 0.5)


class ViTPyramid(nn.Module):
    """Stride-16 maps -> strides 8 / 16 / 32 by bilinear interpolation. No parameters, no buffers.

    ``forward(maps)`` takes one or three ``(B, D, H/16, W/16)`` maps (one per pyramid level, the
    shallowest block first) and returns three maps ``(B, D, H/8, W/8)``, ``(B, D, H/16, W/16)``
    and ``(B, D, H/32, W/32)``. Output sizes are computed from the input size (not a scale
    factor), so odd sizes round down the way the official code does (``int(H_c * 2^k)``).
    """

    def __init__(self, scales: Sequence[float] = PYRAMID_SCALES):
        super().__init__()
        self.scales = tuple(float(s) for s in scales)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        maps = list(maps)
        if len(maps) == 1:
            maps = maps * len(self.scales)
        if len(maps) != len(self.scales):
            raise ValueError(f"ViTPyramid: expected 1 or {len(self.scales)} ViT maps, got {len(maps)}")
        out = []
        for feature, scale in zip(maps, self.scales):
            height, width = int(feature.shape[-2] * scale), int(feature.shape[-1] * scale)
            if scale == 1.0:
                out.append(feature)  # bilinear resampling to the same size is the identity
            else:
                out.append(F.interpolate(feature, size=(height, width), mode="bilinear", align_corners=False))
        return out


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_channels)]


class DetailBranch(nn.Module):
    """The STA's light CNN on the image: ``[2c @ /8, 4c @ /16, 4c @ /32]``.

    ``stem``: conv3x3/2 (3 -> c) + BN + GELU + maxpool 3x3/2 (stride 4); ``down8``: conv3x3/2
    (c -> 2c) + BN; ``down16``: GELU + conv3x3/2 (2c -> 4c) + BN; ``down32``: GELU + conv3x3/2
    (4c -> 4c) + BN. The outputs are taken before the next GELU, as in the reference.
    """

    def __init__(self, channels: int = 16):
        super().__init__()
        if channels < 1:
            raise ValueError(f"DetailBranch: channels must be >= 1, got {channels}")
        c = channels
        self.stem = nn.Sequential(*_conv_bn(3, c), nn.GELU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.down8 = nn.Sequential(*_conv_bn(c, 2 * c))
        self.down16 = nn.Sequential(nn.GELU(), *_conv_bn(2 * c, 4 * c))
        self.down32 = nn.Sequential(nn.GELU(), *_conv_bn(4 * c, 4 * c))
        self.out_channels = [2 * c, 4 * c, 4 * c]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        s8 = self.down8(self.stem(images))
        s16 = self.down16(s8)
        s32 = self.down32(s16)
        return [s8, s16, s32]


class SpatialTuningAdapter(nn.Module):
    """ViT maps + image -> ``[P3, P4, P5]`` with ``out_dim`` channels at strides 8 / 16 / 32.

    ``pyramid`` (:class:`ViTPyramid`) is the parameter-free semantic path, ``detail``
    (:class:`DetailBranch`, or ``None`` with ``detail_channels=0``: the STA-off ablation) the
    fine-detail path, ``fuse`` the per-level 1x1 conv + BN.
    """

    def __init__(self, vit_dim: int, out_dim: int | None = None, detail_channels: int = 16):
        super().__init__()
        out_dim = vit_dim if out_dim is None else int(out_dim)
        self.vit_dim = vit_dim
        self.out_dim = out_dim
        self.pyramid = ViTPyramid()
        self.detail = DetailBranch(detail_channels) if detail_channels > 0 else None
        detail_out = self.detail.out_channels if self.detail is not None else [0, 0, 0]
        self.fuse = nn.ModuleList([
            nn.Sequential(nn.Conv2d(vit_dim + c, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim))
            for c in detail_out])
        self.out_channels = [out_dim] * 3
        self.strides = [8, 16, 32]

    def forward(self, images: torch.Tensor, vit_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        semantic = self.pyramid(vit_maps)
        if self.detail is not None:
            detail = self.detail(images)
            for level, (s, d) in enumerate(zip(semantic, detail)):
                if s.shape[-2:] != d.shape[-2:]:
                    raise ValueError(f"SpatialTuningAdapter: level {level} ViT map {tuple(s.shape[-2:])} and "
                                     f"detail map {tuple(d.shape[-2:])} differ; the input size must be a "
                                     "multiple of 32")
            semantic = [torch.cat([s, d], dim=1) for s, d in zip(semantic, detail)]
        return [fuse(x) for fuse, x in zip(self.fuse, semantic)]
