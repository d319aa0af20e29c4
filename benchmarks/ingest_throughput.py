"""Training input pipeline alone, per CPU core: Distillery's cached-teacher ingest vs a reference loader.

Prints one JSON line. One process, one thread (``torch.set_num_threads(1)``): img/s is per core.
In one run, interleaved rounds over the same JPEGs (``--images`` synthetic 640x640 COCO images):

* ``distillery``: the training worker's path without Ray's transport: cache shard read (Parquet,
  the teacher grid of each image: ViT-B/16's 768 x 20 x 20 in fp16), the join to the
  annotations and the JPEG decode (``ingest.JoinAndDecode``), the feature decode
  (``ingest.rows_to_samples``), the recipe's augmentation on image, boxes *and* grid
  (``augment.Augmenter.batch`` in a strong epoch: photometric, zoom-out, IoU crop, flip, resize
  to 640, sanitize; ``--mosaic``/``--mixup`` probabilities, default 0 to match the baseline),
  ``collate`` and the teacher grid rendered at F5 (20 x 20) with its mask;
* ``baseline``: the same work the way the reference recipes load COCO: torchvision
  ``CocoDetection`` (PIL decode) wrapped for ``transforms.v2``, ``RandomPhotometricDistort``,
  ``RandomZoomOut``, ``RandomIoUCrop``, ``SanitizeBoundingBoxes``, ``RandomHorizontalFlip``,
  ``Resize(640)``, ``ToDtype`` and a collate that stacks images and normalises boxes; no teacher grid.

``ratio`` = distillery / baseline (goal >= 0.8: the grid costs something, not much).

    python benchmarks/ingest_throughput.py [--images 64] [--batch 8] [--rounds 3] [--size 640]
        [--mosaic 0.0] [--mixup 0.0] [--profile FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GRID = [768, 20, 20]  # DINOv3 ViT-B/16 at 320 px (RT-DETRv4's teacher input: 640 pooled by 2)


def build_inputs(work: Path, images: int, shard_size: int, seed: int = 0):
    """Synthetic COCO (640x640 JPEGs) and an fp16 feature cache of random grids for its train split."""
    from distillery.platform.datasets.coco import load_coco
    from distillery.platform.cache.feature_cache import FeatureCache, FeatureCacheWriter, plan_shards
    from distillery.platform.datasets.synthetic import generate_synthetic_coco

    paths = generate_synthetic_coco(work / "data", train=images, val=1, size=640, seed=seed)
    ds = load_coco(paths["train"], str(work / "data" / "images" / "train"), check_images="none")
    writer = FeatureCacheWriter(uri=str(work / "cache"), fingerprint={"model": "benchmark"}, grid=GRID,
                                dtype="fp16", shard_size=shard_size,
                                dataset={"annotation_uri": ds.annotation_uri, "num_images": len(ds)})
    shards = plan_shards(ds.image_ids, shard_size)
    writer.begin(shards)
    rng = np.random.default_rng(seed)
    written = [writer.write_shard(i, ids, rng.standard_normal((len(ids), *GRID)).astype(np.float32))
               for i, ids in enumerate(shards)]
    writer.finalize(len(shards), written)
    return ds, FeatureCache(str(work / "cache")), paths["train"]


def distillery_pass(ds, cache, args, epoch: int) -> int:
    import pyarrow.parquet as pq

    from distillery.platform.io import storage
    from distillery.data.augment import Augmenter
    from distillery.data.sample import collate
    from distillery.platform.config.augment import AugmentSettings, runtime_augment_config
    from distillery.platform.engine.ingest import JoinAndDecode, annotation_table, rows_to_samples

    join = JoinAndDecode(annotation_table(ds), "error", None)
    meta = {"dtype": cache.dtype, "grid": list(cache.grid), "views": cache.views, "uri": cache.uri}
    # The job's recipe (its translation included), strong from epoch 0.
    recipe = AugmentSettings(policy_epochs=(0, 10, 20), mosaic_prob=args.mosaic, mixup_prob=args.mixup,
                             mixup_epochs=(0, 10), multiscale=False)
    augmenter = Augmenter(runtime_augment_config(recipe, args.size), seed=epoch)
    f5 = (args.size // 32, args.size // 32)
    n = 0
    for uri in cache.shard_uris:
        table = pq.read_table(storage.filesystem(uri)[1], columns=["image_id", "view", "features", "scale"])
        cols = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in ("features", "scale")}
        cols["image_id"] = table.column("image_id").to_numpy()
        for i in range(0, len(cols["image_id"]), args.batch):
            rows = join({k: v[i:i + args.batch] for k, v in cols.items()})
            samples = augmenter.batch(rows_to_samples(rows, meta), epoch)
            batch = collate(samples, f5_hw=f5)
            assert batch["teacher_grid"].shape[1:] == (GRID[0], *f5)
            n += len(samples)
    return n


def baseline_pass(annotation_file: str, image_dir: str, args, epoch: int) -> int:
    from torchvision import tv_tensors
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2 as T

    torch.manual_seed(epoch)
    transforms = T.Compose([
        T.RandomApply([T.RandomPhotometricDistort(p=1.0)], p=0.5),
        T.RandomZoomOut(fill=0),
        T.RandomApply([T.RandomIoUCrop()], p=0.8),
        T.SanitizeBoundingBoxes(min_size=1),
        T.RandomHorizontalFlip(),
        T.Resize((args.size, args.size)),
        T.SanitizeBoundingBoxes(min_size=1),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.CXCYWH),
    ])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' loading messages: stdout is the JSON line
        coco = CocoDetection(image_dir, annotation_file, transforms=transforms)
    dataset = wrap_dataset_for_transforms_v2(coco, target_keys=("image_id", "boxes", "labels"))
    n = 0
    for i in range(0, len(dataset), args.batch):
        items = [dataset[j] for j in range(i, min(i + args.batch, len(dataset)))]
        images = torch.stack([im for im, _ in items])
        targets = [{"labels": t["labels"], "boxes": t["boxes"] / args.size} for _, t in items]
        assert images.shape[0] == len(targets)
        n += len(items)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--mosaic", type=float, default=0.0, help="Mosaic probability (ours only; not in torchvision)")
    parser.add_argument("--mixup", type=float, default=0.0, help="Mixup probability (ours only)")
    parser.add_argument("--profile", default=None, help="write a cProfile of one distillery pass here")
    args = parser.parse_args()

    import logging
    import warnings

    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    ds, cache, ann_file = build_inputs(work, args.images, args.shard_size)
    image_dir = str(work / "data" / "images" / "train")

    distillery_pass(ds, cache, args, 0)  # warm-up: page cache, allocator, lazy imports
    baseline_pass(ann_file, image_dir, args, 0)
    ours, base = [], []
    for r in range(args.rounds):  # interleaved, the order alternating: machines drift
        for name in (("distillery", "baseline") if r % 2 == 0 else ("baseline", "distillery")):
            t = time.perf_counter()
            n = distillery_pass(ds, cache, args, r + 1) if name == "distillery" else \
                baseline_pass(ann_file, image_dir, args, r + 1)
            (ours if name == "distillery" else base).append(n / (time.perf_counter() - t))
    if args.profile:
        import cProfile

        cProfile.runctx("distillery_pass(ds, cache, args, 1)", globals(), {"ds": ds, "cache": cache, "args": args},
                        args.profile)
    o, b = statistics.median(ours), statistics.median(base)
    print(json.dumps({
        "benchmark": "ingest_throughput", "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "images": args.images, "image_size": "640x640 JPEG", "output_size": args.size, "batch": args.batch,
        "teacher_grid": GRID, "cache_dtype": "fp16", "mosaic_prob": args.mosaic, "mixup_prob": args.mixup,
        "distillery_img_s_per_core": round(o, 2), "baseline_img_s_per_core": round(b, 2), "ratio": round(o / b, 3),
        "distillery_all": [round(v, 2) for v in ours], "baseline_all": [round(v, 2) for v in base]}))


if __name__ == "__main__":
    main()
