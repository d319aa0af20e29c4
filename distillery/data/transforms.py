"""Augmentation ops on a :class:`~distillery.data.sample.Sample`: geometric ops that move the
image, its boxes and (through the layers' maps) its cached teacher grids together; photometric
ops that touch only the image; Mixup; the reference's multi-scale sizes.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T
from torchvision.ops import box_iou
from torchvision.transforms.v2 import functional as TF

from distillery.data.sample import FeatureLayer, Sample

__all__ = [
    "affine",
    "crop",
    "hflip",
    "iou_crop_params",
    "mixup",
    "mosaic",
    "multiscale_sizes",
    "photometric",
    "photometric_params",
    "photometric_with",
    "resize",
    "sanitize",
    "zoom_out",
]


def _norm(h: int, w: int) -> torch.Tensor:
    """Normalised -> pixel coordinates for an image of size (h, w)."""
    return torch.tensor([[w, 0.0, 0.0], [0.0, h, 0.0], [0.0, 0.0, 1.0]])


def _compose(sample: Sample, new_to_old_px: torch.Tensor, new_size: tuple[int, int],
             image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor | None = None) -> Sample:
    """Attach a geometric op's inverse pixel map (new px -> old px) to every feature layer."""
    oh, ow = sample.size
    nh, nw = new_size
    t = torch.linalg.inv(_norm(oh, ow)) @ new_to_old_px @ _norm(nh, nw)
    layers = [FeatureLayer(layer.grid, layer.to_source @ t, layer.weight) for layer in sample.layers]
    return replace(sample, image=image, boxes=boxes, labels=sample.labels if labels is None else labels,
                   layers=layers)


# --------------------------------------------------------------------------- geometric ops

def hflip(sample: Sample) -> Sample:
    h, w = sample.size
    boxes = sample.boxes.clone()
    boxes[:, [0, 2]] = w - sample.boxes[:, [2, 0]]
    m = torch.tensor([[-1.0, 0.0, w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return _compose(sample, m, (h, w), sample.image.flip(-1), boxes)


def resize(sample: Sample, size: tuple[int, int]) -> Sample:
    h, w = sample.size
    nh, nw = size
    image = TF.resize(sample.image, [nh, nw], interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    sx, sy = nw / w, nh / h
    boxes = sample.boxes * torch.tensor([sx, sy, sx, sy])
    m = torch.tensor([[1 / sx, 0.0, 0.0], [0.0, 1 / sy, 0.0], [0.0, 0.0, 1.0]])
    return _compose(sample, m, (nh, nw), image, boxes)


def zoom_out(sample: Sample, ratio: float, left: int, top: int, fill: int = 0) -> Sample:
    """Place the image at (left, top) on a canvas ``ratio`` times its size filled with ``fill``."""
    h, w = sample.size
    nh, nw = int(h * ratio), int(w * ratio)
    canvas = torch.full((3, nh, nw), fill, dtype=sample.image.dtype)
    canvas[:, top:top + h, left:left + w] = sample.image
    boxes = sample.boxes + torch.tensor([left, top, left, top], dtype=torch.float32)
    m = torch.tensor([[1.0, 0.0, -left], [0.0, 1.0, -top], [0.0, 0.0, 1.0]])
    return _compose(sample, m, (nh, nw), canvas, boxes)


def crop(sample: Sample, x0: int, y0: int, cw: int, ch: int) -> Sample:
    image = sample.image[:, y0:y0 + ch, x0:x0 + cw]
    boxes = sample.boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, cw)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, ch)
    m = torch.tensor([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    return _compose(sample, m, (ch, cw), image, boxes)


def _affine_matrix(angle: float, translate: tuple[float, float], scale: float, center: tuple[float, float]
                   ) -> torch.Tensor:
    """Forward map (old px -> new px): rotate by ``angle`` degrees and scale about ``center``,
    then translate."""
    a = math.radians(angle)
    cx, cy = center
    c, s = math.cos(a) * scale, math.sin(a) * scale
    to_c = torch.tensor([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    back = torch.tensor([[1.0, 0.0, cx + translate[0]], [0.0, 1.0, cy + translate[1]], [0.0, 0.0, 1.0]])
    return back @ rot @ to_c


def affine(sample: Sample, angle: float, translate: tuple[float, float], scale: float, fill: int = 0) -> Sample:
    """Rotate/scale about the image centre and translate (pixels); boxes become the enclosing
    boxes of their transformed corners, clipped to the image."""
    h, w = sample.size
    fwd = _affine_matrix(angle, translate, scale, (w / 2, h / 2))
    inv = torch.linalg.inv(fwd)
    # Warp the image with the same matrix the features get (output px centre -> input px).
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3) @ inv.T
    grid = torch.stack([pts[:, 0] / w * 2 - 1, pts[:, 1] / h * 2 - 1], -1).reshape(1, h, w, 2)
    img = sample.image.float()[None] - fill
    warped = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + fill
    image = warped.round().clamp(0, 255).to(sample.image.dtype)
    b = sample.boxes
    corners = torch.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], 1)  # (n, 4, 2)
    corners = torch.cat([corners, torch.ones_like(corners[..., :1])], -1) @ fwd.T
    boxes = torch.cat([corners[..., :2].amin(1), corners[..., :2].amax(1)], -1) if len(b) else b.clone()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, h)
    return _compose(sample, inv, (h, w), image, boxes)


def mosaic(samples: Sequence[Sample], tile: int, angle: float = 0.0, translate: tuple[float, float] = (0.0, 0.0),
           scale: float = 1.0, fill: int = 0) -> Sample:
    """DEIM's Mosaic: four images resized (shorter side ``tile``), placed in a 2x2 grid on a
    canvas of twice the largest tile, then one random affine over the whole canvas."""
    if len(samples) != 4:
        raise ValueError(f"mosaic needs 4 samples, got {len(samples)}")
    resized = []
    for s in samples:
        h, w = s.size
        k = tile / min(h, w)
        resized.append(resize(s, (max(1, round(h * k)), max(1, round(w * k)))))
    mh, mw = max(s.size[0] for s in resized), max(s.size[1] for s in resized)
    canvas = torch.full((3, 2 * mh, 2 * mw), fill, dtype=samples[0].image.dtype)
    boxes, labels, layers = [], [], []
    for s, (ox, oy) in zip(resized, [(0, 0), (mw, 0), (0, mh), (mw, mh)]):
        h, w = s.size
        canvas[:, oy:oy + h, ox:ox + w] = s.image
        boxes.append(s.boxes + torch.tensor([ox, oy, ox, oy], dtype=torch.float32))
        labels.append(s.labels)
        # Canvas normalised -> this tile's normalised coordinates.
        t = torch.linalg.inv(_norm(h, w)) @ torch.tensor(
            [[1.0, 0.0, -ox], [0.0, 1.0, -oy], [0.0, 0.0, 1.0]]) @ _norm(2 * mh, 2 * mw)
        layers += [FeatureLayer(layer.grid, layer.to_source @ t, layer.weight) for layer in s.layers]
    merged = Sample(canvas, torch.cat(boxes), torch.cat(labels), layers, samples[0].image_id)
    if angle or translate != (0.0, 0.0) or scale != 1.0:
        merged = affine(merged, angle, translate, scale, fill)
    return merged


def sanitize(sample: Sample, min_size: float = 1.0) -> Sample:
    """Drop boxes narrower or shorter than ``min_size`` pixels (after clipping)."""
    h, w = sample.size
    b = sample.boxes.clone()
    b[:, [0, 2]] = b[:, [0, 2]].clamp(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clamp(0, h)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    return replace(sample, boxes=b[keep], labels=sample.labels[keep])


def iou_crop_params(sample: Sample, rng: random.Random, trials: int = 40) -> tuple[int, int, int, int] | None:
    """SSD-style IoU crop (as torchvision's RandomIoUCrop): a crop of scale [0.3, 1] and aspect
    [0.5, 2] whose IoU with some box reaches a randomly chosen minimum and that keeps at least one
    box centre. None means "no crop" (one of the options, as in the reference)."""
    h, w = sample.size
    options = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, None]
    min_iou = options[rng.randrange(len(options))]
    if min_iou is None or len(sample.boxes) == 0:
        return None
    for _ in range(trials):
        sx, sy = rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)
        cw, ch = int(w * sx), int(h * sy)
        if cw < 2 or ch < 2 or not 0.5 <= cw / ch <= 2.0:
            continue
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        b = sample.boxes
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        inside = (cx > x0) & (cx < x0 + cw) & (cy > y0) & (cy < y0 + ch)
        if not inside.any():
            continue
        iou = box_iou(torch.tensor([[x0, y0, x0 + cw, y0 + ch]], dtype=torch.float32), b[inside])
        if iou.max() >= min_iou:
            return x0, y0, cw, ch
    return None


# --------------------------------------------------------------------------- photometric / batch ops

_PHOTOMETRIC = T.RandomPhotometricDistort(p=1.0)


def photometric(sample: Sample) -> Sample:
    """torchvision's RandomPhotometricDistort (brightness, contrast, saturation, hue, channel
    order; each with its own coin flip): the image only; features and boxes are untouched."""
    return replace(sample, image=_PHOTOMETRIC(sample.image))


def photometric_params(rng: random.Random) -> dict[str, Any]:
    """Draw :func:`photometric`'s parameters from ``rng`` (the same ranges and per-op
    probability as the torchvision transform), as JSON-able values that replay exactly."""
    t = _PHOTOMETRIC
    params: dict[str, Any] = {}
    for key, (lo, hi) in (("brightness_factor", t.brightness), ("contrast_factor", t.contrast),
                          ("saturation_factor", t.saturation), ("hue_factor", t.hue)):
        params[key] = rng.uniform(lo, hi) if rng.random() < t.p else None
    params["contrast_before"] = rng.random() < 0.5
    params["channel_permutation"] = rng.sample(range(3), 3) if rng.random() < t.p else None
    return params


def photometric_with(sample: Sample, params: dict[str, Any]) -> Sample:
    """:func:`photometric` with given parameters (torchvision's own kernels, in its order)."""
    return replace(sample, image=_PHOTOMETRIC.transform(sample.image, dict(params)))


def mixup(a: Sample, b: Sample, weight: float) -> Sample:
    """Blend two samples of equal size: image = w*a + (1-w)*b; boxes of both; feature layers of
    both with the same weights (approximation: the teacher is not linear)."""
    if a.size != b.size:
        raise ValueError(f"mixup needs equal sizes, got {a.size} and {b.size}")
    image = (a.image.float() * weight + b.image.float() * (1 - weight)).round().clamp(0, 255).to(a.image.dtype)
    layers = [FeatureLayer(la.grid, la.to_source, la.weight * weight) for la in a.layers] + \
             [FeatureLayer(lb.grid, lb.to_source, lb.weight * (1 - weight)) for lb in b.layers]
    return Sample(image, torch.cat([a.boxes, b.boxes]), torch.cat([a.labels, b.labels]), layers, a.image_id)


def multiscale_sizes(base: int, repeat: int = 3) -> list[int]:
    """The reference's multi-scale list: from ~0.75x to ~1.25x of ``base`` in steps of 32, with
    ``base`` repeated ``repeat`` times."""
    lo, hi = int(base * 0.75 / 32) * 32, int(base * 1.25 / 32) * 32
    n = (base - lo) // 32
    return [lo + 32 * i for i in range(n)] + [base] * repeat + [hi - 32 * i for i in range(n)]
