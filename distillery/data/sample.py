"""The training sample: an image, its boxes and the cached teacher grids that follow it.

A :class:`Sample` carries, next to its image and boxes, one or more :class:`FeatureLayer` s: a
cached grid plus the 3x3 map from the *current* image's normalised coordinates ([0, 1]^2, pixel
edges at 0 and 1) to that grid's source image's normalised coordinates. Geometric ops
(:mod:`distillery.data.transforms`) compose their inverse pixel maps onto every layer; nothing is
resampled until :func:`render_features` samples the layers once, at the student's F5 resolution,
with ``grid_sample``. :func:`collate` stacks samples into model inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

__all__ = ["FeatureLayer", "Sample", "collate", "render_features"]


@dataclass
class FeatureLayer:
    grid: torch.Tensor  # (C, h, w) float: the cached teacher grid of a source image
    to_source: torch.Tensor  # (3, 3): current normalised coords -> source normalised coords
    weight: float = 1.0


@dataclass
class Sample:
    image: torch.Tensor  # (3, H, W) uint8
    boxes: torch.Tensor  # (n, 4) float, absolute xyxy in the current image
    labels: torch.Tensor  # (n,) int64
    layers: list[FeatureLayer] = field(default_factory=list)
    image_id: int = -1
    # 0: the plain image. k > 0: cached view k, already through the per-image strong ops and
    # flip (see apply_view), with the teacher grid of exactly this image in ``layers``.
    view: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @classmethod
    def create(cls, image: torch.Tensor, boxes_xywh: torch.Tensor, labels: torch.Tensor,
               grid: torch.Tensor | None = None, image_id: int = -1) -> "Sample":
        boxes = boxes_xywh.reshape(-1, 4).float().clone()
        boxes[:, 2:] += boxes[:, :2]
        layers = [FeatureLayer(grid.float(), torch.eye(3))] if grid is not None else []
        return cls(image, boxes, labels.reshape(-1).long(), layers, image_id)


def render_features(sample: Sample, out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the feature layers at the centres of an ``out_hw`` grid over the current image.

    Returns (grid (C, oh, ow), valid mask (oh, ow) bool). Where several layers are valid they are
    blended by weight (Mixup); where none is, the grid is 0 and the mask False.
    """
    if not sample.layers:
        raise ValueError("sample has no feature layers")
    oh, ow = out_hw
    ys, xs = torch.meshgrid((torch.arange(oh) + 0.5) / oh, (torch.arange(ow) + 0.5) / ow, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3)
    acc, wsum = None, torch.zeros(oh * ow)
    for layer in sample.layers:
        src = pts @ layer.to_source.T  # (N, 3) in source normalised coordinates
        valid = (src[:, 0] >= 0) & (src[:, 0] <= 1) & (src[:, 1] >= 0) & (src[:, 1] <= 1)
        g = (src[:, :2] * 2 - 1).reshape(1, oh, ow, 2)
        vals = F.grid_sample(layer.grid[None], g, mode="bilinear", padding_mode="border",
                             align_corners=False)[0].reshape(layer.grid.shape[0], -1)
        w = valid.float() * layer.weight
        acc = vals * w if acc is None else acc + vals * w
        wsum = wsum + w
    mask = wsum > 0
    out = torch.where(mask, acc / wsum.clamp_min(1e-12), torch.zeros_like(acc))
    return out.reshape(-1, oh, ow), mask.reshape(oh, ow)


def collate(samples: list[Sample], f5_hw: tuple[int, int] | None = None) -> dict:
    """Stack into model inputs: images (B, 3, H, W) float in [0, 1]; targets with normalised
    cxcywh boxes; and, when the samples carry features, the teacher grid rendered at ``f5_hw``
    with its validity mask."""
    images = torch.stack([s.image for s in samples]).float().div_(255.0)
    targets = []
    for s in samples:
        h, w = s.size
        boxes = box_convert(s.boxes, "xyxy", "cxcywh") / torch.tensor([w, h, w, h], dtype=torch.float32)
        targets.append({"labels": s.labels, "boxes": boxes, "image_id": torch.tensor(s.image_id)})
    batch = {"images": images, "targets": targets}
    if f5_hw is not None and samples and samples[0].layers:
        grids, masks = zip(*(render_features(s, f5_hw) for s in samples))
        batch["teacher_grid"] = torch.stack(grids)
        batch["teacher_mask"] = torch.stack(masks)
    return batch
