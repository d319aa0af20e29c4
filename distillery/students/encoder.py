"""Hybrid encoder of RT-DETR / D-FINE / RT-DETRv4: AIFI on the deepest level, then CCFF.

Backbone levels S3, S4, S5 (strides 8, 16, 32) are projected to ``hidden_dim`` channels
(1x1 conv + BN). Then:

* **AIFI** (attention-based intra-scale feature interaction, :class:`AIFI`): one post-norm
  transformer encoder layer over the S5 tokens with a fixed 2-D sin-cos position embedding. Its
  output is F5, the feature that the Deep Semantic Injector aligns with the teacher.
* **CCFF** (CNN-based cross-scale feature fusion): a top-down pass (1x1 lateral conv, nearest
  upsampling, concat with the next shallower level, fusion block) and a bottom-up pass
  (SCDown = 1x1 conv + depthwise 3x3 stride-2 conv, concat, fusion block). D-FINE's fusion block
  is :class:`RepNCSPELAN4` (a GELAN block of two CSP stages of RepVGG-style blocks); its width is
  ``round(expansion * hidden_dim // 2)`` and its depth ``round(3 * depth_mult)``.

Parameter names: everything of AIFI lives under ``aifi.`` (so ``encoder.aifi.`` in the model),
which the GAM controller uses to find the AIFI gradient; all other encoder parameters (input
projections and CCFF) are the "CCFF" group.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AIFI",
    "ConvNormAct",
    "CSPRepLayer",
    "ELANBlock",
    "HybridEncoder",
    "RepNCSPELAN4",
    "RepVGGBlock",
    "SCDown",
    "sincos_position_embedding_2d",
]


def make_activation(name: str | None) -> nn.Module:
    """``silu`` / ``gelu`` / ``relu`` / ``None`` (identity)."""
    if name is None:
        return nn.Identity()
    table = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
    if name.lower() not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)} or None")
    return table[name.lower()]()


class ConvNormAct(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + optional activation, 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2,
                              groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class RepVGGBlock(nn.Module):
    """3x3 conv-BN plus 1x1 conv-BN branches, summed, then the activation (training-time RepVGG)."""

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "silu"):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3)
        self.conv2 = ConvNormAct(in_channels, out_channels, 1)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """CSP stage: two 1x1 branches, one through ``num_blocks`` RepVGG blocks, summed, optional 1x1 out."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, expansion: float = 1.0,
                 act: str | None = "silu"):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = ConvNormAct(in_channels, hidden, 1, act=act)
        self.conv2 = ConvNormAct(in_channels, hidden, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepVGGBlock(hidden, hidden, act=act) for _ in range(num_blocks)])
        self.conv3 = ConvNormAct(hidden, out_channels, 1, act=act) if hidden != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class ELANBlock(nn.Module):
    """GELAN fusion block: ``in -> 1x1 (split_channels) -> halves a, b``; ``c = stage(b)``;
    ``d = stage(c)``; ``out = 1x1(concat(a, b, c, d))`` with ``split + 2 * branch`` input channels.

    ``stage(in, out)`` builds the CSP stage (plus its optional 3x3 conv); subclasses choose it.
    """

    def __init__(self, in_channels: int, out_channels: int, split_channels: int, branch_channels: int,
                 stage: Callable[[int, int], nn.Module], act: str | None = "silu"):
        super().__init__()
        if split_channels % 2:
            raise ValueError(f"{type(self).__name__}: split_channels must be even, got {split_channels}")
        self.half = split_channels // 2
        self.cv1 = ConvNormAct(in_channels, split_channels, 1, act=act)
        self.cv2 = stage(self.half, branch_channels)
        self.cv3 = stage(branch_channels, branch_channels)
        self.cv4 = ConvNormAct(split_channels + 2 * branch_channels, out_channels, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.half, self.half), dim=1)
        c = self.cv2(b)
        d = self.cv3(c)
        return self.cv4(torch.cat([a, b, c, d], dim=1))


class RepNCSPELAN4(ELANBlock):
    """GELAN fusion block (YOLOv9's RepNCSPELAN4) as D-FINE uses it: each stage a
    :class:`CSPRepLayer` then a 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, split_channels: int, branch_channels: int,
                 num_blocks: int = 3, act: str | None = "silu"):
        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(CSPRepLayer(c_in, c_out, num_blocks, 1.0, act=act),
                                 ConvNormAct(c_out, c_out, 3, act=act))

        super().__init__(in_channels, out_channels, split_channels, branch_channels, stage, act)


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling (YOLOv10): 1x1 conv-BN then depthwise 3x3 stride-2 conv-BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        self.cv1 = ConvNormAct(in_channels, out_channels, 1)
        self.cv2 = ConvNormAct(out_channels, out_channels, kernel_size, stride, groups=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


def sincos_position_embedding_2d(height: int, width: int, dim: int, temperature: float = 10000.0,
                                 device: torch.device | None = None,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, H * W, dim) fixed sin-cos embedding of the tokens of ``feature.flatten(2)``, the official table.

    The official ``HybridEncoder.build_2d_sincos_position_embedding(w, h)`` builds its grid with
    ``meshgrid(arange(w), arange(h), indexing="ij")``, so token ``k`` gets the coordinates
    ``(a, b) = divmod(k, H)`` and the bands ``[sin a, cos a, sin b, cos b]``. On a square map that
    is ``[sin y, cos y, sin x, cos x]`` with ``(y, x) = divmod(k, W)``; on a non-square map it is
    not a plain (y, x) table, but it is what official checkpoints were trained with, so it is
    reproduced exactly (the official code also computes it from the actual map size in training).
    """
    if dim % 4:
        raise ValueError(f"sincos_position_embedding_2d: dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    # The official grid as built there (meshgrid, no integer division: that also exports to ONNX).
    first, second = torch.meshgrid(torch.arange(width, dtype=torch.float32, device=device),
                                   torch.arange(height, dtype=torch.float32, device=device), indexing="ij")
    first_angles = first.reshape(-1, 1) * omega[None]
    second_angles = second.reshape(-1, 1) * omega[None]
    pos = torch.cat([first_angles.sin(), first_angles.cos(), second_angles.sin(), second_angles.cos()], dim=1)
    return pos[None].to(dtype)


class AIFI(nn.Module):
    """One post-norm transformer encoder layer over the tokens of a feature map (F5 = AIFI(S5))."""

    def __init__(self, dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.0,
                 act: str = "gelu", temperature: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.temperature = temperature
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.activation = make_activation(act)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = feature.shape
        tokens = feature.flatten(2).permute(0, 2, 1)  # (B, HW, C)
        pos = sincos_position_embedding_2d(height, width, self.dim, self.temperature, tokens.device, tokens.dtype)
        q = k = tokens + pos
        attended, _ = self.self_attn(q, k, value=tokens, need_weights=False)
        tokens = self.norm1(tokens + self.dropout1(attended))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tokens))))
        tokens = self.norm2(tokens + self.dropout2(ffn))
        return tokens.permute(0, 2, 1).reshape(batch, channels, height, width)


class HybridEncoder(nn.Module):
    """Input projections + AIFI on the last level + CCFF; returns the fused maps and F5.

    ``fuse`` is how CCFF joins two maps before a fusion block: ``"cat"`` (D-FINE/RT-DETRv4, the
    block takes 2x channels) or ``"sum"`` (DEIMv2). ``fusion_block`` builds those blocks (default:
    D-FINE's RepNCSPELAN4 for ``"cat"``); ``identity_proj`` skips the input projection of a level
    that already has ``hidden_dim`` channels (DEIMv2)."""

    def __init__(self, in_channels: Sequence[int] = (512, 1024, 2048), hidden_dim: int = 256, num_heads: int = 8,
                 ffn_dim: int = 1024, dropout: float = 0.0, aifi_act: str = "gelu", expansion: float = 1.0,
                 depth_mult: float = 1.0, act: str = "silu", pe_temperature: float = 10000.0,
                 fuse: Literal["cat", "sum"] = "cat", fusion_block: Callable[[], nn.Module] | None = None,
                 identity_proj: bool = False):
        super().__init__()
        name = type(self).__name__
        if len(in_channels) < 2:
            raise ValueError(f"{name}: need at least two input levels, got in_channels={list(in_channels)}")
        if fuse not in ("cat", "sum"):
            raise ValueError(f"{name}: fuse must be 'cat' or 'sum', got {fuse!r}")
        if fuse == "sum" and fusion_block is None:
            raise ValueError(f"{name}: fuse='sum' needs a fusion_block taking hidden_dim channels")
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.fuse_op = fuse
        levels = len(self.in_channels)

        self.input_proj = nn.ModuleList([nn.Identity() if identity_proj and c == hidden_dim
                                         else ConvNormAct(c, hidden_dim, 1) for c in self.in_channels])
        self.aifi = AIFI(hidden_dim, num_heads, ffn_dim, dropout, aifi_act, pe_temperature)

        branch = round(expansion * hidden_dim // 2)
        depth = round(3 * depth_mult)

        def fusion() -> nn.Module:
            if fusion_block is not None:
                return fusion_block()
            return RepNCSPELAN4(hidden_dim * 2, hidden_dim, hidden_dim * 2, branch, depth, act=act)

        # Top-down (FPN): index 0 fuses the deepest level into the one below it.
        self.lateral_convs = nn.ModuleList([ConvNormAct(hidden_dim, hidden_dim, 1) for _ in range(levels - 1)])
        self.fpn_blocks = nn.ModuleList([fusion() for _ in range(levels - 1)])
        # Bottom-up (PAN).
        self.downsample_convs = nn.ModuleList([SCDown(hidden_dim, hidden_dim, 3, 2) for _ in range(levels - 1)])
        self.pan_blocks = nn.ModuleList([fusion() for _ in range(levels - 1)])

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[S3, S4, S5] -> ([P3, P4, P5] each with ``hidden_dim`` channels, F5 = AIFI output)."""
        if len(features) != len(self.in_channels):
            raise ValueError(f"{type(self).__name__}: expected {len(self.in_channels)} feature levels, "
                             f"got {len(features)}")
        projected = [proj(f) for proj, f in zip(self.input_proj, features)]
        f5 = self.aifi(projected[-1])
        projected[-1] = f5

        # Top-down: from the deepest level, laterally convolve, upsample, fuse with the shallower level.
        top_down = [projected[-1]]  # deepest first while building
        for i, shallow in enumerate(reversed(projected[:-1])):
            deep = self.lateral_convs[i](top_down[-1])
            top_down[-1] = deep
            upsampled = F.interpolate(deep, scale_factor=2.0, mode="nearest")
            top_down.append(self.fpn_blocks[i](self._fuse(upsampled, shallow)))
        top_down.reverse()  # shallow (P3 inner) first

        # Bottom-up: downsample the fused shallower map and fuse with the next deeper top-down map.
        outs = [top_down[0]]
        for i in range(len(projected) - 1):
            down = self.downsample_convs[i](outs[-1])
            outs.append(self.pan_blocks[i](self._fuse(down, top_down[i + 1])))
        return outs, f5

    def _fuse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], dim=1) if self.fuse_op == "cat" else a + b
