"""A deterministic, learnable, COCO-format synthetic detection dataset of real JPEG files.

Why: tests, benchmarks and the embedded default must train and evaluate detectors without
downloading anything. The images are easy enough to learn in minutes on a CPU (each class is a
distinct shape *and* colour) yet not trivial (textured backgrounds, several objects per image,
varied sizes, JPEG artefacts, colour jitter).

    python -m distillery.platform.datasets.synthetic --out DIR [--train N] [--val N] [--size PX] [--seed S]

writes ``DIR/images/{train,val}/*.jpg`` and ``DIR/annotations/instances_{train,val}.json``.
The same arguments always give byte-identical files. Category ids are deliberately
non-contiguous (like COCO's), so every run exercises the id -> label mapping.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from distillery.platform.io import storage

__all__ = ["SYNTHETIC_CATEGORIES", "generate_synthetic_coco", "main", "synthetic_images"]


@dataclass(frozen=True)
class _ShapeClass:
    id: int
    name: str
    shape: str
    rgb: tuple[int, int, int]


# Non-contiguous ids on purpose (COCO's run 1..90 with gaps).
SYNTHETIC_CATEGORIES: tuple[_ShapeClass, ...] = (
    _ShapeClass(1, "circle", "circle", (220, 40, 40)),
    _ShapeClass(3, "square", "square", (40, 180, 60)),
    _ShapeClass(4, "triangle", "triangle", (40, 80, 230)),
    _ShapeClass(7, "star", "star", (240, 210, 30)),
    _ShapeClass(9, "ring", "ring", (230, 120, 20)),
    _ShapeClass(12, "cross", "cross", (170, 50, 200)),
)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Muted textured background: smooth noise + stripes or checks + fine grain."""
    base = rng.uniform(70, 170, size=3)
    coarse = rng.normal(0, 1, size=(6, 6, 3))
    coarse_img = Image.fromarray(np.uint8(np.clip(128 + 40 * coarse, 0, 255))).resize(
        (size, size), Image.BICUBIC)
    img = np.asarray(coarse_img, dtype=np.float32) - 128 + base
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(0, 3)
    period = rng.uniform(size / 24, size / 8)
    if kind == 0:  # stripes at a random angle
        angle = rng.uniform(0, math.pi)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        img += 18 * wave[..., None]
    elif kind == 1:  # checks
        checks = ((xx // period).astype(int) + (yy // period).astype(int)) % 2
        img += 16 * (checks[..., None] - 0.5)
    img += rng.normal(0, 8, size=img.shape)  # grain
    return Image.fromarray(np.uint8(np.clip(img, 0, 255)))


def _polygon_star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = rot + i * math.pi / 5
        pts.append((cx + rad * math.sin(a), cy - rad * math.cos(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rot: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        # Corners at distance r from the centre: the shape stays inside its placement circle.
        pts = [(cx + r * math.cos(rot + k * math.pi / 2), cy + r * math.sin(rot + k * math.pi / 2))
               for k in range(4)]
        draw.polygon(pts, fill=255)
    elif shape == "triangle":
        pts = [(cx + r * math.sin(rot + k * 2 * math.pi / 3), cy - r * math.cos(rot + k * 2 * math.pi / 3))
               for k in range(3)]
        draw.polygon(pts, fill=255)
    elif shape == "star":
        draw.polygon(_polygon_star(cx, cy, r, rot), fill=255)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.5
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "cross":
        w = r * 0.35
        c, s = math.cos(rot), math.sin(rot)

        def rect(hx: float, hy: float) -> list[tuple[float, float]]:
            corners = [(-hx, -hy), (hx, -hy), (hx, hy), (-hx, hy)]
            return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]

        draw.polygon(rect(r, w), fill=255)
        draw.polygon(rect(w, r), fill=255)
    else:  # pragma: no cover - the table above is the only source of shapes
        raise ValueError(f"unknown shape {shape!r}")


def _make_image(rng: np.random.Generator, size: int, max_objects: int
                ) -> tuple[bytes, list[tuple[int, list[float]]]]:
    img = _background(rng, size)
    n_obj = int(rng.integers(1, max_objects + 1))
    placed: list[tuple[float, float, float, float]] = []
    anns: list[tuple[int, list[float]]] = []
    for _ in range(n_obj):
        cls = SYNTHETIC_CATEGORIES[int(rng.integers(0, len(SYNTHETIC_CATEGORIES)))]
        for _attempt in range(20):
            r = float(rng.uniform(0.06, 0.18) * size)
            cx = float(rng.uniform(r, size - r))
            cy = float(rng.uniform(r, size - r))
            box = (cx - r, cy - r, cx + r, cy + r)
            # No occlusion: keep the boxes apart so every annotation is fully visible.
            if all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3] for p in placed):
                break
        else:
            continue
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), cls.shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        mask = mask.filter(ImageFilter.GaussianBlur(0.6))
        jitter = rng.integers(-25, 26, size=3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(cls.rgb, jitter))
        img.paste(Image.new("RGB", (size, size), colour), (0, 0), mask)
        ys, xs = np.nonzero(np.asarray(mask) > 127)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        placed.append(box)
        anns.append((cls.id, [x0, y0, x1 - x0, y1 - y0]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue(), anns


def synthetic_images(count: int, size: int, seed: int, stream: int = 0, max_objects: int = 6
                     ) -> Iterator[tuple[bytes, list[tuple[int, list[float]]]]]:
    """``count`` images of one random stream: (JPEG bytes, [(category id, [x, y, w, h])]).

    ``generate_synthetic_coco(seed=s)`` draws its train split from stream ``(s, 0)`` and its val
    split from ``(s, 1)``; another seed gives images disjoint from both (the domain teacher's pool).
    """
    rng = np.random.default_rng([seed, stream])
    for _ in range(count):
        yield _make_image(rng, size, max_objects)


def generate_synthetic_coco(out: str | os.PathLike, train: int = 200, val: int = 50,
                            size: int = 320, seed: int = 0, max_objects: int = 6) -> dict[str, str]:
    """Write the dataset under ``out`` (a local path or URI); return the annotation URIs per split."""
    if train < 1 or val < 1:
        raise ValueError("synthetic dataset needs at least one train and one val image")
    if size < 64:
        raise ValueError(f"synthetic image size must be >= 64 px, got {size}")
    out = str(out)
    result: dict[str, str] = {}
    categories = [{"id": c.id, "name": c.name, "supercategory": "shape"} for c in SYNTHETIC_CATEGORIES]
    for split, count, id_base, split_seed in (("train", train, 1, 0), ("val", val, 100001, 1)):
        images, annotations = [], []
        ann_id = 1 if split == "train" else 1_000_001
        for i, (jpeg, anns) in enumerate(synthetic_images(count, size, seed, split_seed, max_objects)):
            image_id = id_base + i
            file_name = f"{image_id:08d}.jpg"
            storage.write_bytes(storage.join(out, "images", split, file_name), jpeg)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for cat_id, bbox in anns:
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat_id,
                                    "bbox": [round(v, 2) for v in bbox],
                                    "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0})
                ann_id += 1
        doc = {"info": {"description": f"Distillery synthetic shapes ({split})", "seed": seed},
               "images": images, "annotations": annotations, "categories": categories}
        ann_uri = storage.join(out, "annotations", f"instances_{split}.json")
        storage.write_text(ann_uri, json.dumps(doc, indent=1))
        result[split] = ann_uri
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (local path or s3:// URI)")
    parser.add_argument("--train", type=int, default=200, help="number of training images")
    parser.add_argument("--val", type=int, default=50, help="number of validation images")
    parser.add_argument("--size", type=int, default=320, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=6)
    args = parser.parse_args(argv)
    uris = generate_synthetic_coco(args.out, args.train, args.val, args.size, args.seed, args.max_objects)
    for split, uri in uris.items():
        print(f"{split}: {uri}")


if __name__ == "__main__":
    main()
