"""Training augmentation that keeps cached teacher features faithful.

The reference recipe (D-FINE/DEIM/RT-DETRv4) augments each image with photometric distortion,
zoom-out, IoU crop, horizontal flip and a resize, plus Mosaic (Dense O2O) in an epoch window and
Mixup in the batch. With a *cached* teacher the features were computed once on the unaugmented
image, so every geometric transform must also be applied to the cached grid.

How: a :class:`Sample` carries, next to its image and boxes, one or more :class:`FeatureLayer`
s: a cached grid plus the 3x3 map from the *current* image's normalised coordinates ([0, 1]^2,
pixel edges at 0 and 1) to that grid's source image's normalised coordinates. Each geometric
op composes its inverse pixel map onto every layer; nothing is resampled until
:func:`render_features` samples the layers once, at the student's F5 resolution, with
``grid_sample``. Positions that map outside their source image (zoom-out borders, Mosaic fill)
are marked invalid in a mask, and the DSI loss ignores them. Photometric ops touch only the
image. Mixup blends the two samples' layers with the same weight as the images: an
approximation (the teacher is not linear), measured by ``benchmarks/cache_fidelity.py``.

Cached *views* (``cache.views: K``): where those approximations are poor, the cache job stores,
per image, K-1 pre-augmented views next to the plain one. A view is the per-image strong ops of
the recipe (photometric, zoom-out, IoU crop, flip, then the resize to the teacher input), drawn
by :func:`draw_view_params` from an RNG seeded per (image, view) and recorded as plain JSON
parameters; :func:`apply_view` replays them on the decoded image and its boxes. The cache job
and the training worker run the same :func:`apply_view` on the same decoded image, so the
training image is exactly the one the teacher saw and the view's cached grid needs no
approximation (``Sample.view > 0`` tells the :class:`Augmenter` to skip those ops).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T
from torchvision.ops import box_convert, box_iou
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "AugmentConfig",
    "FeatureLayer",
    "Sample",
    "Augmenter",
    "affine",
    "apply_view",
    "collate",
    "crop",
    "draw_view_params",
    "hflip",
    "iou_crop_params",
    "make_views",
    "mixup",
    "mosaic",
    "multiscale_sizes",
    "photometric",
    "photometric_params",
    "photometric_with",
    "render_features",
    "resize",
    "sanitize",
    "view_recipe",
    "view_rng",
    "zoom_out",
]


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


def multiscale_sizes(base: int, repeat: int = 3) -> list[int]:
    """The reference's multi-scale list: from ~0.75x to ~1.25x of ``base`` in steps of 32, with
    ``base`` repeated ``repeat`` times."""
    lo, hi = int(base * 0.75 / 32) * 32, int(base * 1.25 / 32) * 32
    n = (base - lo) // 32
    return [lo + 32 * i for i in range(n)] + [base] * repeat + [hi - 32 * i for i in range(n)]


# --------------------------------------------------------------------------- the recipe

@dataclass
class AugmentConfig:
    """The reference schedule (DEIM / RT-DETRv4 S): epochs are 0-based.

    ``policy_epochs`` = [e0, e1, e2]: strong ops (Mosaic, photometric, zoom-out, IoU crop) off
    before e0 and from e2 on; Mosaic (with ``mosaic_prob``) only in [e0, e1), and never together
    with zoom-out/IoU crop in one sample. Mixup (``mixup_prob``) in [mixup_epochs[0],
    mixup_epochs[1]). Copy-Blend (``copyblend_prob``, DEIMv2) in [copyblend_epochs[0],
    copyblend_epochs[1]) on batches without Mixup. Multi-scale batches until ``multiscale_stop_epoch``.
    """

    size: int = 640
    policy_epochs: tuple[int, int, int] = (4, 64, 120)
    mosaic_prob: float = 0.5
    mosaic_tile: int | None = None  # default size // 2, as the reference's 320 for 640
    mosaic_affine: tuple[float, float, tuple[float, float]] = (10.0, 0.1, (0.5, 1.5))
    mixup_prob: float = 0.5
    mixup_epochs: tuple[int, int] = (4, 64)
    photometric_prob: float = 0.5
    zoom_out_ratio: tuple[float, float] = (1.0, 4.0)
    iou_crop_prob: float = 0.8
    flip_prob: float = 0.5
    multiscale_stop_epoch: int = 120
    fill: int = 0
    # DEIMv2's Copy-Blend (distillery.data.copy_blend): off in the RT-DETRv4 recipe; the
    # DEIMv2 recipes use it in [copyblend_epochs[0], copyblend_epochs[1]) for batches Mixup skips.
    copyblend_prob: float = 0.0
    copyblend_epochs: tuple[int, int] = (4, 120)


class Augmenter:
    """Applies :class:`AugmentConfig` to samples (image, boxes, feature layers) for one epoch."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.rng = random.Random(seed)

    def strong(self, epoch: int) -> bool:
        e0, _, e2 = self.cfg.policy_epochs
        return e0 <= epoch < e2

    def __call__(self, sample: Sample, epoch: int, pool: Sequence[Sample] = ()) -> Sample:
        """Augment one sample; ``pool`` supplies the other Mosaic images (e.g. the batch)."""
        cfg, rng = self.cfg, self.rng
        e0, e1, _ = cfg.policy_epochs
        strong = self.strong(epoch)
        # A cached view already went through photometric, zoom-out, IoU crop and flip (and the
        # teacher saw the result): only the batch-level ops (Mosaic, resize, Mixup, multi-scale)
        # remain for it. Plain samples (view 0) draw exactly as before.
        pre = sample.view > 0
        with_mosaic = strong and e0 <= epoch < e1 and len(pool) > 0 and rng.random() < cfg.mosaic_prob
        if with_mosaic:
            others = [pool[rng.randrange(len(pool))] for _ in range(3)]
            deg, trans, (smin, smax) = cfg.mosaic_affine
            tile = cfg.mosaic_tile or cfg.size // 2
            side = 2 * tile
            sample = mosaic([sample, *others], tile, angle=rng.uniform(-deg, deg),
                            translate=(rng.uniform(-trans, trans) * side, rng.uniform(-trans, trans) * side),
                            scale=rng.uniform(smin, smax), fill=cfg.fill)
        if strong and not pre and rng.random() < cfg.photometric_prob:
            sample = photometric(sample)
        if strong and not with_mosaic and not pre:
            if rng.random() < 0.5:  # RandomZoomOut's default p
                h, w = sample.size
                r = rng.uniform(*cfg.zoom_out_ratio)
                sample = zoom_out(sample, r, rng.randint(0, int(w * r) - w), rng.randint(0, int(h * r) - h), cfg.fill)
            if rng.random() < cfg.iou_crop_prob:
                params = iou_crop_params(sample, rng)
                if params is not None:
                    sample = crop(sample, *params)
            sample = sanitize(sample)
        if not pre and rng.random() < cfg.flip_prob:
            sample = hflip(sample)
        if not (pre and sample.size == (cfg.size, cfg.size)):  # a replayed view is at size already
            sample = resize(sample, (cfg.size, cfg.size))
        return sanitize(sample)

    def batch(self, samples: list[Sample], epoch: int) -> list[Sample]:
        """Per-sample ops, then batch Mixup (each with its predecessor, as the reference does)
        and multi-scale resize."""
        out = [self(s, epoch, pool=samples) for s in samples]
        lo, hi = self.cfg.mixup_epochs
        mixed = len(out) > 1 and lo <= epoch < hi and self.rng.random() < self.cfg.mixup_prob
        if mixed:
            w = self.rng.uniform(0.45, 0.55)
            out = [mixup(out[i], out[i - 1], w) for i in range(len(out))]
        # Copy-Blend and Mixup are alternatives for a batch, as in the DEIMv2 recipes. (No random
        # draw at all while Copy-Blend is off, so RT-DETRv4 batches are what they always were.)
        c_lo, c_hi = self.cfg.copyblend_epochs
        if (self.cfg.copyblend_prob > 0 and not mixed and len(out) > 1 and c_lo <= epoch < c_hi
                and self.rng.random() < self.cfg.copyblend_prob):
            from distillery.data.copy_blend import copy_blend

            donors = list(out)
            out = [copy_blend(s, donors, self.rng) for s in donors]
        if epoch < self.cfg.multiscale_stop_epoch:
            size = self.rng.choice(multiscale_sizes(self.cfg.size))
            if size != self.cfg.size:
                out = [resize(s, (size, size)) for s in out]
        return out


# --------------------------------------------------------------------------- cached views

# Zoom-out's probability in the recipe (RandomZoomOut's default p, as in Augmenter.__call__).
ZOOM_OUT_PROB = 0.5


def view_recipe(cfg: AugmentConfig) -> dict[str, Any]:
    """The recipe settings a cached view depends on (recorded in the cache manifest, so a
    training run with other probabilities can tell its views were drawn differently)."""
    return {"photometric_prob": float(cfg.photometric_prob), "zoom_out_ratio": [float(v) for v in cfg.zoom_out_ratio],
            "iou_crop_prob": float(cfg.iou_crop_prob), "flip_prob": float(cfg.flip_prob), "fill": int(cfg.fill)}


def view_rng(seed: int, image_id: int, view: int) -> random.Random:
    """The RNG of one (image, view): a pure function of its arguments, so any process that
    builds (or rebuilds) the cache draws the same view, and view k does not depend on K."""
    digest = hashlib.sha256(f"distillery-view:{int(seed)}:{int(image_id)}:{int(view)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def draw_view_params(size_hw: tuple[int, int], boxes_xyxy: torch.Tensor, cfg: AugmentConfig,
                     rng: random.Random) -> dict[str, Any]:
    """Draw one view's per-image strong ops, in the order and with the probabilities of
    :meth:`Augmenter.__call__` without Mosaic: photometric, zoom-out, IoU crop, flip; then the
    resize to ``cfg.size``. Only geometry is needed (the image size and boxes, for the IoU crop).
    Returns JSON-able parameters for :func:`apply_view`."""
    h, w = int(size_hw[0]), int(size_hw[1])
    params: dict[str, Any] = {"source_hw": [h, w], "size": int(cfg.size), "photometric": None,
                              "zoom_out": None, "crop": None, "flip": False}
    if rng.random() < cfg.photometric_prob:
        params["photometric"] = photometric_params(rng)
    boxes = boxes_xyxy.reshape(-1, 4).float()
    if rng.random() < ZOOM_OUT_PROB:
        r = rng.uniform(*cfg.zoom_out_ratio)
        left, top = rng.randint(0, int(w * r) - w), rng.randint(0, int(h * r) - h)
        params["zoom_out"] = {"ratio": r, "left": left, "top": top, "fill": int(cfg.fill)}
        h, w = int(h * r), int(w * r)
        boxes = boxes + torch.tensor([left, top, left, top], dtype=torch.float32)
    if rng.random() < cfg.iou_crop_prob:
        # iou_crop_params reads only the size and the boxes: a zero-cost stand-in image.
        probe = Sample(torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, h, w), boxes,
                       torch.zeros(len(boxes), dtype=torch.long))
        crop_box = iou_crop_params(probe, rng)
        params["crop"] = list(crop_box) if crop_box is not None else None
    params["flip"] = rng.random() < cfg.flip_prob
    return params


def apply_view(sample: Sample, params: dict[str, Any], view: int = 0) -> Sample:
    """Replay a view's parameters on a sample (image, boxes and any feature layers), exactly as
    :meth:`Augmenter.__call__` applies the same ops; ``view`` is recorded on the result."""
    h, w = sample.size
    if [h, w] != list(params["source_hw"]):
        raise ValueError(f"view parameters are for a {params['source_hw'][0]}x{params['source_hw'][1]} image, "
                         f"image {sample.image_id} is {h}x{w} (the dataset changed since the cache was built?)")
    if params["photometric"] is not None:
        sample = photometric_with(sample, params["photometric"])
    z = params["zoom_out"]
    if z is not None:
        sample = zoom_out(sample, z["ratio"], z["left"], z["top"], z["fill"])
    if params["crop"] is not None:
        sample = crop(sample, *params["crop"])
    sample = sanitize(sample)
    if params["flip"]:
        sample = hflip(sample)
    size = int(params["size"])
    sample = sanitize(resize(sample, (size, size)))
    return replace(sample, view=int(view))


def make_views(image: torch.Tensor, boxes_xywh: torch.Tensor, image_id: int, views: int, seed: int,
               cfg: AugmentConfig) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The K teacher inputs of one image: (uint8 (3, size, size) image, params) per view.

    View 0 is the plain image resized (no ops); views 1..K-1 are drawn with :func:`view_rng`.
    ``image`` is the decoded (3, H, W) uint8 image and ``boxes_xywh`` its training boxes."""
    plain = Sample.create(image, boxes_xywh, torch.zeros(boxes_xywh.reshape(-1, 4).shape[0], dtype=torch.long),
                          image_id=image_id)
    out = []
    for v in range(views):
        if v == 0:
            params = {"source_hw": list(plain.size), "size": int(cfg.size), "photometric": None,
                      "zoom_out": None, "crop": None, "flip": False}
        else:
            params = draw_view_params(plain.size, plain.boxes, cfg, view_rng(seed, image_id, v))
        out.append((apply_view(plain, params, v).image, params))
    return out


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
