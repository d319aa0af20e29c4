"""Training augmentation that keeps cached teacher features faithful.

The reference recipe (D-FINE/DEIM/RT-DETRv4) augments each image with photometric distortion,
zoom-out, IoU crop, horizontal flip and a resize, plus Mosaic (Dense O2O) in an epoch window and
Mixup in the batch. With a *cached* teacher the features were computed once on the unaugmented
image, so every geometric transform must also be applied to the cached grid.

How: a :class:`~distillery.data.sample.Sample` carries, next to its image and boxes, one or more :class:`FeatureLayer`
s: a cached grid plus the 3x3 map from the *current* image's normalised coordinates ([0, 1]^2,
pixel edges at 0 and 1) to that grid's source image's normalised coordinates. Each geometric
op composes its inverse pixel map onto every layer; nothing is resampled until
:func:`~distillery.data.sample.render_features` samples the layers once, at the student's F5 resolution, with
``grid_sample``. Positions that map outside their source image (zoom-out borders, Mosaic fill)
are marked invalid in a mask, and the DSI loss ignores them. Photometric ops touch only the
image. Mixup blends the two samples' layers with the same weight as the images: an
approximation (the teacher is not linear), measured by ``benchmarks/cache_fidelity.py``.

The pieces: :mod:`distillery.data.sample` (the sample and its feature layers, rendering,
collation), :mod:`distillery.data.transforms` (the ops), :mod:`distillery.data.copy_blend`
(DEIMv2's Copy-Blend), :mod:`distillery.data.views` (cached views); this module holds the
recipe (:class:`AugmentConfig`) and the :class:`Augmenter` that applies it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from distillery.data.copy_blend import copy_blend
from distillery.data.sample import Sample
from distillery.data.transforms import (crop, hflip, iou_crop_params, mixup, mosaic, multiscale_sizes, photometric,
                                        resize, sanitize, zoom_out)

__all__ = ["ZOOM_OUT_PROB", "AugmentConfig", "Augmenter"]

# Zoom-out's probability in the recipe (RandomZoomOut's default p); cached views draw with it too.
ZOOM_OUT_PROB = 0.5


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
    multiscale_repeat: int = 3  # the base size's count in the size list (official base_size_repeat)
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
            if rng.random() < ZOOM_OUT_PROB:
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
            donors = list(out)
            out = [copy_blend(s, donors, self.rng) for s in donors]
        if epoch < self.cfg.multiscale_stop_epoch:
            size = self.rng.choice(multiscale_sizes(self.cfg.size, self.cfg.multiscale_repeat))
            if size != self.cfg.size:
                out = [resize(s, (size, size)) for s in out]
        return out
