"""Contrastive denoising queries (DN-DETR / DINO, as in RT-DETR / D-FINE / DEIM), training only.

The ground-truth boxes of a batch, noised, are fed to the decoder as extra queries whose answers
are known, which stabilises the bipartite matching early in training. With ``G`` groups and
``M`` = the largest number of objects in one image, there are ``2 * M * G`` denoising queries:
per group, ``M`` *positive* queries (each true box moved by less than half its size; they must
reconstruct it) followed by ``M`` *negative* ones (moved by between one and two half-sizes; they
must predict "no object"). Images with fewer than ``M`` objects fill the rest with padding
queries (the padding class embedding, which is zero, and an empty box), which are negatives too.
Labels of a fraction of the queries are replaced at random (label noise).

Attention mask (True = may not attend): matching queries do not see any denoising query
(they would read the answers), and denoising groups do not see each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import box_convert

from .box_ops import inverse_sigmoid

__all__ = ["DenoisingMeta", "DenoisingQueries", "build_denoising_queries"]


@dataclass
class DenoisingMeta:
    """What the criterion needs to read the denoising outputs.

    ``positive_indices[b]`` are the denoising query indices that must reconstruct the objects of
    image ``b``, group after group: entry ``g * n_b + j`` reconstructs object ``j``.
    """

    positive_indices: list[torch.Tensor]
    num_groups: int
    num_denoising: int  # total denoising queries, 2 * M * G
    num_queries: int  # matching queries after them


@dataclass
class DenoisingQueries:
    content: torch.Tensor  # (B, num_denoising, hidden) class embeddings
    boxes_logit: torch.Tensor  # (B, num_denoising, 4) noised boxes, inverse-sigmoid cxcywh
    attn_mask: torch.Tensor  # (num_denoising + num_queries,)^2 bool, True = blocked
    meta: DenoisingMeta


def build_denoising_queries(targets: list[dict[str, torch.Tensor]], num_classes: int, num_queries: int,
                            class_embed: nn.Embedding, num_denoising: int = 100, label_noise_ratio: float = 0.5,
                            box_noise_scale: float = 1.0) -> DenoisingQueries | None:
    """Noised queries for a batch, or ``None`` when denoising is off or no image has an object."""
    if num_denoising <= 0 or not targets:
        return None
    counts = [int(t["labels"].numel()) for t in targets]
    max_objects = max(counts)
    if max_objects == 0:
        return None
    device = targets[0]["labels"].device
    batch = len(targets)
    groups = max(num_denoising // max_objects, 1)
    per_group = 2 * max_objects
    total = per_group * groups

    labels = torch.full((batch, max_objects), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, max_objects, 4, device=device)
    real = torch.zeros(batch, max_objects, dtype=torch.bool, device=device)
    for b, t in enumerate(targets):
        n = counts[b]
        if n:
            labels[b, :n] = t["labels"].to(device=device, dtype=torch.long)
            boxes[b, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
            real[b, :n] = True
    # Layout per group: [M positives | M negatives].
    labels = labels.repeat(1, 2 * groups)
    boxes = boxes.repeat(1, 2 * groups, 1)
    real = real.repeat(1, 2 * groups)
    is_negative = (torch.arange(total, device=device) % per_group >= max_objects)[None, :, None].to(boxes.dtype)

    positive = real & (is_negative[..., 0] == 0)
    positive_indices = [torch.nonzero(positive[b]).flatten() for b in range(batch)]

    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint_like(labels, 0, num_classes)
        labels = torch.where(flip & real, random_labels, labels)

    if box_noise_scale > 0:
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_size = (boxes[..., 2:] * 0.5).repeat(1, 1, 2) * box_noise_scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + is_negative  # [0, 1) for positives, [1, 2) for negatives
        corners = (corners + sign * magnitude * half_size).clamp(0.0, 1.0)
        boxes = box_convert(corners, "xyxy", "cxcywh").abs()  # corners may have crossed over
    boxes_logit = inverse_sigmoid(boxes)

    content = class_embed(labels)

    size = total + num_queries
    index = torch.arange(size, device=device)
    is_dn = index < total
    group = torch.div(index, per_group, rounding_mode="floor")
    across_groups = is_dn[:, None] & is_dn[None, :] & (group[:, None] != group[None, :])
    matching_reads_dn = (~is_dn)[:, None] & is_dn[None, :]
    attn_mask = across_groups | matching_reads_dn

    meta = DenoisingMeta(positive_indices=positive_indices, num_groups=groups, num_denoising=total,
                         num_queries=num_queries)
    return DenoisingQueries(content=content, boxes_logit=boxes_logit, attn_mask=attn_mask, meta=meta)
