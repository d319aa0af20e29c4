"""Box maths that torchvision.ops does not provide: logit-space boxes and D-FINE's edge distances.

Conventions: boxes are normalised to the image (0..1); ``cxcywh`` is centre/size, ``xyxy`` is
corners. Conversions between the two and IoU / GIoU come from :mod:`torchvision.ops`.

D-FINE (Fine-grained Distribution Refinement) does not regress a box directly. Each of the four
edges of a box is a signed distance from a *reference box*, expressed in units of the reference
box's size divided by ``reg_scale`` and offset so that 0 means "the edge of the reference box".
The distance of an edge is the expectation of a discrete distribution over ``reg_max + 1`` bins
whose values are the non-uniform weighting function ``W(n)`` (:func:`weighting_function`): fine
steps near 0 (small corrections) and coarse steps at the ends (large ones).
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert

__all__ = [
    "box_to_edge_distances",
    "cxcywh_to_xyxy",
    "edge_distance_bins",
    "edge_distances_to_box",
    "inverse_sigmoid",
    "weighting_function",
]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``cxcywh`` -> ``xyxy`` with negative widths/heights clamped to 0, as the official ``box_cxcywh_to_xyxy``.

    The losses and the matcher use this (not torchvision's ``box_convert``) so that a predicted
    box with a negative size is scored as the official code scores it: as a zero-size box at its
    centre rather than a box with swapped corners.
    """
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w.clamp(min=0.0), 0.5 * h.clamp(min=0.0)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``logit(x)`` with ``x`` clamped to [0, 1] and both ``x`` and ``1 - x`` kept above ``eps``."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def weighting_function(reg_max: int, up: float, reg_scale: float,
                       device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``reg_max + 1`` bin values ``W(n)`` of D-FINE (eq. 3 of the D-FINE paper).

    ``W(0) = -2a`` and ``W(reg_max) = 2a`` with ``a = up * reg_scale``; in between the values grow
    geometrically away from ``W(reg_max / 2) = 0``: ``W(reg_max/2 +- i) = +-(c^i - 1)`` with
    ``c = (a + 1)^(2 / (reg_max - 2))``, so ``W(reg_max/2 +- (reg_max/2 - 1)) = +-a``.
    """
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"weighting_function: reg_max must be an even number >= 4, got {reg_max}")
    a = abs(up) * abs(reg_scale)
    step = (a + 1.0) ** (2.0 / (reg_max - 2))
    half = reg_max // 2
    exponents = torch.arange(1, half, dtype=torch.float64)
    right = step ** exponents - 1.0  # W(half + i), i = 1 .. half - 1
    values = torch.cat([
        torch.tensor([-2.0 * a], dtype=torch.float64),
        -right.flip(0),
        torch.zeros(1, dtype=torch.float64),
        right,
        torch.tensor([2.0 * a], dtype=torch.float64),
    ])
    return values.to(device=device, dtype=dtype)


def edge_distances_to_box(ref_boxes: torch.Tensor, distances: torch.Tensor, reg_scale: float) -> torch.Tensor:
    """Boxes (``cxcywh``) from reference boxes (``cxcywh``) and edge distances (left, top, right, bottom).

    An edge sits ``(0.5 * reg_scale + d) * size / reg_scale`` from the reference centre, so ``d = 0``
    on all four edges reproduces the reference box.
    """
    reg_scale = abs(reg_scale)
    cx, cy, w, h = ref_boxes.unbind(-1)
    x1 = cx - (0.5 * reg_scale + distances[..., 0]) * (w / reg_scale)
    y1 = cy - (0.5 * reg_scale + distances[..., 1]) * (h / reg_scale)
    x2 = cx + (0.5 * reg_scale + distances[..., 2]) * (w / reg_scale)
    y2 = cy + (0.5 * reg_scale + distances[..., 3]) * (h / reg_scale)
    return box_convert(torch.stack([x1, y1, x2, y2], -1), "xyxy", "cxcywh")


def box_to_edge_distances(ref_boxes: torch.Tensor, boxes_xyxy: torch.Tensor, reg_scale: float) -> torch.Tensor:
    """Inverse of :func:`edge_distances_to_box`: (n, 4) edge distances of ``boxes_xyxy`` from ``ref_boxes``."""
    reg_scale = abs(reg_scale)
    cx, cy, w, h = ref_boxes.unbind(-1)
    unit_w = w / reg_scale + 1e-16
    unit_h = h / reg_scale + 1e-16
    left = (cx - boxes_xyxy[..., 0]) / unit_w - 0.5 * reg_scale
    top = (cy - boxes_xyxy[..., 1]) / unit_h - 0.5 * reg_scale
    right = (boxes_xyxy[..., 2] - cx) / unit_w - 0.5 * reg_scale
    bottom = (boxes_xyxy[..., 3] - cy) / unit_h - 0.5 * reg_scale
    return torch.stack([left, top, right, bottom], -1)


@torch.no_grad()
def edge_distance_bins(ref_boxes: torch.Tensor, boxes_xyxy: torch.Tensor, reg_max: int, reg_scale: float,
                       up: float, eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of the Fine-Grained Localisation loss: each true edge distance as two adjacent bins.

    Returns, flattened over (box, edge): ``left_bin`` (float; the bin just below the distance,
    clamped to ``[0, reg_max - eps]``), and the interpolation weights ``weight_right`` /
    ``weight_left`` of bins ``floor(left_bin) + 1`` and ``floor(left_bin)``. A distance below
    ``W(0)`` puts all weight on bin 0, one above ``W(reg_max)`` all weight on bin ``reg_max``.
    """
    dist = box_to_edge_distances(ref_boxes, boxes_xyxy, reg_scale).reshape(-1)
    values = weighting_function(reg_max, up, reg_scale, device=dist.device, dtype=dist.dtype)
    # Index of the last bin value <= distance (-1 when the distance is below every bin).
    left = (values.unsqueeze(0) <= dist.unsqueeze(1)).sum(1) - 1
    inside = (left >= 0) & (left < reg_max)
    safe = left.clamp(0, reg_max - 1)
    lo, hi = values[safe], values[safe + 1]
    weight_right = torch.where(inside, (dist - lo).abs() / ((dist - lo).abs() + (hi - dist).abs()),
                               torch.zeros_like(dist))
    below, above = left < 0, left >= reg_max
    weight_right = torch.where(above, torch.ones_like(dist), weight_right)
    weight_left = torch.where(inside, 1.0 - weight_right, torch.where(below, torch.ones_like(dist),
                                                                      torch.zeros_like(dist)))
    left_bin = left.to(dist.dtype)
    left_bin = torch.where(below, torch.zeros_like(left_bin), left_bin)
    left_bin = torch.where(above, torch.full_like(left_bin, reg_max - 0.1), left_bin)
    return left_bin.clamp(min=0.0, max=reg_max - eps), weight_right, weight_left
