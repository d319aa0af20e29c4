"""Copy-Blend (DEIMv2's object-level Dense O2O): objects from other images blended into this one.

DEIM's Dense O2O raises the number of objects per training image (Mosaic, Mixup) so that
one-to-one matching yields more positives. DEIMv2 (arXiv 2509.20787, Sec. 2) adds Copy-Blend:
object patches cut from other images of the batch are *blended* into the image at random
places, ``out = beta * this + (1 - beta) * patch`` with ``beta ~ U(0.45, 0.55)``, unlike
Copy-Paste, which overwrites the region: the background (and any object already there) stays
visible through the new object.

:func:`copy_blend` follows the official batch collate function (read for the numbers; this is
our own code): objects of at least ``area_threshold`` px^2 from the donor samples form a pool;
``num_objects`` of them (3 in every recipe) are drawn without replacement; each keeps its pixel
size and goes to a uniformly random position; with ``expand_ratios`` a margin of
``U(0.1, 0.25)`` x the object size around it (context, clipped to both images) is blended too,
but the new box is the object's own. Original boxes and labels come first, unchanged; new ones
are appended. Objects larger than this image are skipped (the batch normally has one size).
In the official recipes Copy-Blend and Mixup are alternatives for a batch, never both.

Cached teacher features. :func:`~distillery.data.transforms.mixup` blends the two samples'
feature layers with the images' weights (an approximation: the teacher is not linear); Copy-Blend
does the same, *locally*: for each blended patch the donor's features over the patch region are
rendered into a small grid (:func:`~distillery.data.sample.render_features` of the donor
cropped to the patch, at about the donor grid's own density) and attached as an extra
:class:`~distillery.data.sample.FeatureLayer` whose map sends this image's coordinates onto
that grid, so it is valid exactly inside the patch rectangle. Its weight is
``(1 - beta) / beta`` times the layers' total weight at the patch centre, so that
``render_features`` (a weighted mean of the valid layers) gives ``beta * this + (1 - beta) *
donor`` there, the same mix as the pixels; outside the patches nothing changes. Where the patch
grid has invalid cells (the donor's own zoom-out border) they take the mean of its valid cells;
a patch with no valid cell, or a donor without features, adds no layer (the teacher grid there
then shows only this image, as it would without Copy-Blend). A sample without feature layers
gets none.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Sequence

import torch

from distillery.data.sample import FeatureLayer, Sample, render_features
from distillery.data.transforms import crop

__all__ = ["copy_blend"]


def _total_weight_at(layers: Sequence[FeatureLayer], u: float, v: float) -> float:
    """Sum of the weights of the layers valid at normalised point (u, v) (render_features' rule)."""
    point = torch.tensor([u, v, 1.0])
    total = 0.0
    for layer in layers:
        x, y, _ = (layer.to_source @ point).tolist()
        if 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0:
            total += layer.weight
    return total


def _patch_layer(donor: Sample, src: tuple[int, int, int, int], dst: tuple[int, int], size: tuple[int, int],
                 weight: float) -> FeatureLayer | None:
    """The donor's features over ``src`` (x0, y0, w, h px) as a layer valid on this image's ``dst`` rectangle."""
    x0, y0, pw, ph = src
    dx, dy = dst
    height, width = size
    reference = donor.layers[0].grid
    # About the donor grid's density (cells per pixel of the donor image), at least 2 x 2.
    dh, dw = donor.size
    gh = max(2, math.ceil(ph * reference.shape[-2] / dh))
    gw = max(2, math.ceil(pw * reference.shape[-1] / dw))
    grid, mask = render_features(crop(donor, x0, y0, pw, ph), (gh, gw))
    if not bool(mask.any()):
        return None
    if not bool(mask.all()):
        fill = grid[:, mask].mean(dim=1)
        grid = torch.where(mask[None], grid, fill[:, None, None])
    # This image's normalised coordinates -> the patch grid's normalised coordinates.
    to_patch = torch.tensor([[width / pw, 0.0, -dx / pw],
                             [0.0, height / ph, -dy / ph],
                             [0.0, 0.0, 1.0]])
    return FeatureLayer(grid, to_patch, weight)


def copy_blend(sample: Sample, donors: Sequence[Sample], rng: random.Random, *, num_objects: int = 3,
               area_threshold: float = 100.0, beta: float | None = None,
               expand_ratios: tuple[float, float] | None = (0.1, 0.25), random_num_objects: bool = False) -> Sample:
    """Blend up to ``num_objects`` objects of ``donors`` into ``sample``; returns a new sample.

    Args:
        sample: the image to add objects to (uint8 (3, H, W), absolute xyxy boxes).
        donors: samples to take objects from (the official pool is the whole batch, this sample
            included); they are not modified.
        rng: the random source (the augmenter's), for reproducible batches.
        num_objects: objects to draw from the pool (fewer if the pool is smaller).
        area_threshold: minimum box area in pixels for an object to enter the pool.
        beta: weight of ``sample`` in the blend; default ``U(0.45, 0.55)`` as in the reference.
        expand_ratios: context margin range as a fraction of the object size; None: no margin.
        random_num_objects: draw the number of objects from ``[1, num_objects]``.
    """
    if num_objects < 1:
        raise ValueError(f"copy_blend: num_objects must be >= 1, got {num_objects}")
    if beta is None:
        beta = rng.uniform(0.45, 0.55)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"copy_blend: beta must be in (0, 1), got {beta}")
    height, width = sample.size

    pool: list[tuple[int, int]] = []  # (donor index, box index)
    for d, donor in enumerate(donors):
        boxes = donor.boxes
        if len(boxes) == 0:
            continue
        areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        pool += [(d, int(i)) for i in torch.nonzero(areas >= area_threshold).flatten()]
    if not pool:
        return sample
    count = min(num_objects, len(pool))
    if random_num_objects:
        count = rng.randint(1, count)
    chosen = rng.sample(pool, count)

    image = sample.image.float()
    layers = list(sample.layers)
    new_boxes, new_labels = [], []
    for d, i in chosen:
        donor = donors[d]
        dh, dw = donor.size
        x1, y1, x2, y2 = donor.boxes[i].tolist()
        # Whole pixels inside the donor, as the reference (int() of the box edges, then clipped).
        sx1, sy1 = max(int(x1), 0), max(int(y1), 0)
        sx2, sy2 = min(int(x2), dw), min(int(y2), dh)
        ow, oh = sx2 - sx1, sy2 - sy1
        if ow <= 0 or oh <= 0 or ow > width or oh > height:
            continue
        tx1 = rng.randint(0, width - ow)
        ty1 = rng.randint(0, height - oh)
        new_boxes.append([tx1, ty1, tx1 + ow, ty1 + oh])
        new_labels.append(donor.labels[i])

        # Context margin, limited on each side by both the donor and this image.
        left = top = right = bottom = 0
        if expand_ratios is not None:
            alpha = rng.uniform(*expand_ratios)
            ew, eh = int(ow * alpha), int(oh * alpha)
            left = min(ew, sx1, tx1)
            top = min(eh, sy1, ty1)
            right = min(ew, dw - sx2, width - (tx1 + ow))
            bottom = min(eh, dh - sy2, height - (ty1 + oh))
        px0, py0 = sx1 - left, sy1 - top
        pw, ph = ow + left + right, oh + top + bottom
        qx0, qy0 = tx1 - left, ty1 - top

        patch = donor.image[:, py0:py0 + ph, px0:px0 + pw].float()
        region = image[:, qy0:qy0 + ph, qx0:qx0 + pw]
        image[:, qy0:qy0 + ph, qx0:qx0 + pw] = beta * region + (1.0 - beta) * patch

        if sample.layers and donor.layers:
            centre_u, centre_v = (qx0 + pw / 2) / width, (qy0 + ph / 2) / height
            present = _total_weight_at(layers, centre_u, centre_v)
            weight = (1.0 - beta) / beta * present if present > 0 else 1.0
            layer = _patch_layer(donor, (px0, py0, pw, ph), (qx0, qy0), (height, width), weight)
            if layer is not None:
                layers.append(layer)

    if not new_boxes:
        return sample
    blended = image.round().clamp(0, 255).to(sample.image.dtype)
    boxes = torch.cat([sample.boxes, torch.tensor(new_boxes, dtype=sample.boxes.dtype)])
    labels = torch.cat([sample.labels, torch.stack(new_labels).to(sample.labels.dtype)])
    return replace(sample, image=blended, boxes=boxes, labels=labels, layers=layers)
