"""Cached views (``cache.views: K``): per image, K-1 pre-augmented teacher inputs next to the plain one.

A view is the per-image strong ops of the recipe (photometric, zoom-out, IoU crop, flip, then the
resize to the teacher input), drawn by :func:`draw_view_params` from an RNG seeded per (image,
view) and recorded as plain JSON parameters; :func:`apply_view` replays them on the decoded image
and its boxes. The cache job and the training worker run the same :func:`apply_view` on the same
decoded image, so the training image is exactly the one the teacher saw and the view's cached
grid needs no approximation (``Sample.view > 0`` tells the
:class:`~distillery.data.augment.Augmenter` to skip those ops).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from typing import Any

import torch

from distillery.data.augment import ZOOM_OUT_PROB, AugmentConfig
from distillery.data.sample import Sample
from distillery.data.transforms import (crop, hflip, iou_crop_params, photometric_params, photometric_with, resize,
                                        sanitize, zoom_out)

__all__ = ["apply_view", "draw_view_params", "make_views", "view_recipe", "view_rng"]

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
