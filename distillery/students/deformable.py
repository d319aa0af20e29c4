"""Multi-scale deformable attention (Deformable DETR), D-FINE variant, in plain PyTorch.

Each query looks at a few points per head and per feature level, placed around its reference
box, and mixes the bilinearly sampled values with softmax weights. Sampling is done with
``F.grid_sample`` (no custom CUDA op), so the module runs anywhere and exports to ONNX
(GridSample, opset >= 16).

D-FINE's variant (what RT-DETRv4 uses):

* a different number of points per level (``[3, 6, 3]`` for strides 8/16/32), with one softmax
  over *all* points of all levels of a head;
* reference *boxes* ``(cx, cy, w, h)``: the offsets are scaled by the box size, by
  ``1 / points_of_that_level`` and by ``offset_scale`` (0.5), so the initial pattern spans the box;
* no value projection and no output projection (the value is the encoder memory itself).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSDeformableAttention", "multi_scale_deformable_attention"]


def multi_scale_deformable_attention(
    values: Sequence[torch.Tensor],
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points: Sequence[int],
) -> torch.Tensor:
    """The sampling-and-weighting core.

    Args:
        values: one tensor per level, (B * heads, head_dim, H_l, W_l).
        spatial_shapes: (H_l, W_l) per level.
        sampling_locations: (B, Q, heads, sum(num_points), 2), normalised (x, y) in [0, 1]
            (0 and 1 are the outer edges of the feature map, as with ``align_corners=False``);
            points of level 0 first, then level 1, ...
        attention_weights: (B, Q, heads, sum(num_points)), already normalised.
        num_points: points per level.

    Returns:
        (B, Q, heads * head_dim). Points outside the map sample zeros.
    """
    batch, num_queries, heads, total_points, _ = sampling_locations.shape
    head_dim = values[0].shape[1]
    # grid_sample wants coordinates in [-1, 1]; one "image" per (batch, head).
    grids = (2.0 * sampling_locations - 1.0).permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B*heads, Q, P, 2)
    grids_per_level = grids.split(list(num_points), dim=2)
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        value = values[level].reshape(batch * heads, head_dim, h, w)
        sampled.append(F.grid_sample(value, grids_per_level[level], mode="bilinear",
                                     padding_mode="zeros", align_corners=False))  # (B*heads, D, Q, P_l)
    sampled_all = torch.cat(sampled, dim=-1)  # (B*heads, D, Q, P)
    weights = attention_weights.permute(0, 2, 1, 3).reshape(batch * heads, 1, num_queries, total_points)
    out = (sampled_all * weights).sum(-1)  # (B*heads, D, Q)
    return out.reshape(batch, heads * head_dim, num_queries).permute(0, 2, 1)


class MSDeformableAttention(nn.Module):
    """Deformable cross-attention from queries to a multi-level feature memory."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_points: Sequence[int] = (3, 6, 3),
                 offset_scale: float = 0.5):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MSDeformableAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_points = [int(p) for p in num_points]
        self.num_levels = len(self.num_points)
        self.total_points = sum(self.num_points)
        self.offset_scale = offset_scale
        self.head_dim = embed_dim // num_heads
        # 1 / (points of the level) for each point: a level with more points spreads them less far each.
        scale = [1.0 / n for n in self.num_points for _ in range(n)]
        self.register_buffer("points_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)

        self.sampling_offsets = nn.Linear(embed_dim, num_heads * self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * self.total_points)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start at zero weight with a bias that fans the heads out in 8 directions, the
        # k-th point of a level k steps out; attention starts uniform.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points])
        bias = directions[:, None, :] * steps[None, :, None]  # (heads, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query: torch.Tensor, reference_boxes: torch.Tensor, values: Sequence[torch.Tensor],
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """
        Args:
            query: (B, Q, C), position embedding already added.
            reference_boxes: (B, Q, 4) normalised ``cx, cy, w, h``.
            values: per level (B * heads, head_dim, H_l, W_l) (see :meth:`split_values`).
            spatial_shapes: (H_l, W_l) per level.
        Returns:
            (B, Q, C)
        """
        batch, num_queries, _ = query.shape
        offsets = self.sampling_offsets(query).reshape(batch, num_queries, self.num_heads, self.total_points, 2)
        weights = self.attention_weights(query).reshape(batch, num_queries, self.num_heads, self.total_points)
        weights = weights.softmax(-1)
        ref = reference_boxes[:, :, None, None, :]  # (B, Q, 1, 1, 4)
        scale = self.points_scale.to(query.dtype)[None, None, None, :, None]
        locations = ref[..., :2] + offsets * scale * ref[..., 2:] * self.offset_scale
        return multi_scale_deformable_attention(values, spatial_shapes, locations, weights, self.num_points)

    def split_values(self, memory: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Memory (B, sum(H_l * W_l), C) -> per level (B * heads, head_dim, H_l, W_l), computed once per forward."""
        batch = memory.shape[0]
        value = memory.reshape(batch, memory.shape[1], self.num_heads, self.head_dim).permute(0, 2, 3, 1)
        sizes = [h * w for h, w in spatial_shapes]
        return [v.reshape(batch * self.num_heads, self.head_dim, h, w)
                for v, (h, w) in zip(value.split(sizes, dim=-1), spatial_shapes)]
