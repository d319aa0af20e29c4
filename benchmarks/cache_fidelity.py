"""Cache fidelity: how faithful are cached teacher features after augmentation?

For each transform of the training recipe, and for the whole pipeline, compare two grids at
the student's F5 resolution for the same augmented image:
- *cached*: the teacher's grid of the unaugmented image, carried through the transform by
  :mod:`distillery.data.augment` (affine map + resampling; Mixup blends two grids);
- *online*: the teacher run on the augmented image (what RT-DETRv4's own code does each step).
Prints one JSON line with the mean (and 10th-percentile) per-position cosine similarity over the
valid positions, per transform. Transforms below 0.9 are candidates for pre-augmented cached views.

Then the cached-views trade-off (``cache.views: K``), for each K of ``--views``:
- bytes per image of a real cache (Parquet shards written by FeatureCacheWriter: K grids plus
  their params, fp16 and int8);
- the expected fidelity of the strong pipeline: a fraction f = (K-1)/K of the samples of a strong
  epoch is served by an exact view (counted as 1.0), the rest (view 0) by the online-augmented
  plain grid at the K=1 fidelity;
- a direct measurement: the training path itself (view chosen by ``ingest.select_view``, replayed
  by ``views.apply_view``, then ``Augmenter.batch`` with Mosaic/Mixup/multi-scale per schedule)
  over ``--view-epochs`` strong epochs, cos-sim of the rendered grid against the online teacher
  on the final augmented image; K=1 is "views off". Measured in two regimes of the reference
  schedule: inside the Mosaic/Mixup window and after it.

    python benchmarks/cache_fidelity.py [--images 16] [--input-size 640] [--weights PATH]
                                        [--views 1,2,4,8] [--view-epochs 8]

Without --weights the teacher has random weights (stated in the output): the numbers then
measure geometry and resampling, not semantics; run with the official checkpoint for real ones.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=640)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--teacher-kwargs", default="{}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--views", default="1,2,4,8", help="K values for the cached-views trade-off ('' skips it)")
    parser.add_argument("--view-epochs", type=int, default=8, help="strong epochs simulated per K (direct measurement)")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the simulated training batches")
    args = parser.parse_args()

    import numpy as np
    import torch

    from distillery.data import augment as A, sample as S, transforms as T
    from distillery.platform.datasets.coco import decode_image, load_coco
    from distillery.platform.io import storage
    from distillery.platform.datasets.synthetic import generate_synthetic_coco
    from distillery.teachers import DinoV3Teacher

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.input_size
    teacher = DinoV3Teacher(weights=args.weights, allow_random_init=args.weights is None, input_size=size,
                            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            model_kwargs=json.loads(args.teacher_kwargs) or None).to(device)
    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    generate_synthetic_coco(work, train=args.images + 4, val=1, size=size, seed=args.seed)
    ds = load_coco(str(work / "annotations" / "instances_train.json"), str(work / "images" / "train"))

    def run_teacher(image_u8: torch.Tensor) -> torch.Tensor:
        x = T.resize(S.Sample.create(image_u8, torch.zeros(0, 4), torch.zeros(0)), (size, size)).image
        return teacher(x[None].to(device).float() / 255.0)[0].cpu()

    samples = []
    for r in ds.records:
        img = torch.from_numpy(decode_image(storage.read_bytes(r.uri), r.uri)).permute(2, 0, 1)
        samples.append(S.Sample.create(img, torch.from_numpy(r.boxes), torch.from_numpy(r.labels),
                                       grid=run_teacher(img), image_id=r.image_id))
    f5 = (size // 32, size // 32)
    cfg = A.AugmentConfig(size=size)

    def finish(s: S.Sample) -> S.Sample:
        return T.resize(s, (size, size))

    def zoom(s):
        h, w = s.size
        r = rng.uniform(1.0, 4.0)
        return finish(T.zoom_out(s, r, rng.randint(0, int(w * r) - w), rng.randint(0, int(h * r) - h)))

    def iou_crop(s):
        for _ in range(20):
            p = T.iou_crop_params(s, rng)
            if p is not None:
                return finish(T.crop(s, *p))
        return finish(s)

    def mosaic(s):
        others = rng.sample(samples, 3)
        deg, trans, (lo, hi) = cfg.mosaic_affine
        side = size
        return finish(T.mosaic([s, *others], size // 2, angle=rng.uniform(-deg, deg),
                               translate=(rng.uniform(-trans, trans) * side, rng.uniform(-trans, trans) * side),
                               scale=rng.uniform(lo, hi)))

    def multiscale(s):
        out = rng.choice([x for x in T.multiscale_sizes(size) if x != size])
        return T.resize(s, (out, out))

    transforms = {
        "identity": finish,
        "hflip": lambda s: finish(T.hflip(s)),
        "photometric": lambda s: finish(T.photometric(s)),
        "zoom_out": zoom,
        "iou_crop": iou_crop,
        "multiscale_resize": multiscale,
        "mosaic": mosaic,
        "mixup": lambda s: T.mixup(finish(s), finish(rng.choice(samples)), rng.uniform(0.45, 0.55)),
        "pipeline_strong": lambda s: A.Augmenter(cfg, seed=rng.randrange(10 ** 6))(s, epoch=10, pool=samples),
    }
    results = {}
    t0 = time.time()
    for name, fn in transforms.items():
        cos_all = []
        for s in samples[: args.images]:
            aug = fn(s)
            hw = (aug.size[0] // 32, aug.size[1] // 32)
            cached, mask = S.render_features(aug, hw)
            # The teacher runs at its input size; a multi-scale image's grid is then resized to F5.
            online = run_teacher(aug.image)
            online = torch.nn.functional.interpolate(online[None], size=hw, mode="bilinear",
                                                     align_corners=False)[0] if online.shape[-2:] != hw else online
            cos = torch.nn.functional.cosine_similarity(cached, online, dim=0)[mask]
            cos_all.append(cos)
        c = torch.cat(cos_all).numpy()
        results[name] = {"mean": round(float(c.mean()), 4), "p10": round(float(np.percentile(c, 10)), 4)}
    poor = sorted(k for k, v in results.items() if v["mean"] < 0.9)
    ks = [int(k) for k in args.views.split(",") if k.strip()]
    views = views_tradeoff(ks, samples[: args.images], ds, run_teacher, cfg, size, args, work) if ks else None
    print(json.dumps({
        "benchmark": "cache_fidelity", "teacher": teacher.model_name,
        "weights": "random-init (geometry/resampling only; not semantic fidelity)" if args.weights is None
        else args.weights, "input_size": size, "f5": list(f5), "images": args.images,
        "cosine_cached_vs_online": results, "below_0.9": poor, "views": views,
        "seconds": round(time.time() - t0, 1), "device": str(device)}))


def views_tradeoff(ks, samples, ds, run_teacher, cfg, size, args, work: Path) -> dict:
    """Cache size against fidelity for K cached views per image (see the module docstring)."""
    import numpy as np
    import torch

    from distillery.data import augment as A, sample as S, views as V
    from distillery.platform.datasets.coco import decode_image
    from distillery.platform.io import storage
    from distillery.platform.cache.codec import decode_features, encode_features
    from distillery.platform.cache.feature_cache import FeatureCacheWriter, plan_shards
    from distillery.platform.engine.ingest import select_view

    k_max = max(ks)
    records = {r.image_id: r for r in ds.records}

    def fp16(grid):  # what the training worker reads back from an fp16 cache
        return torch.from_numpy(decode_features(*encode_features(grid.numpy(), "fp16"), "fp16", list(grid.shape)))

    # The K_max views of every image (view k does not depend on K: a K cache is views 0..K-1).
    views = {}
    for s in samples:
        r = records[s.image_id]
        image = torch.from_numpy(decode_image(storage.read_bytes(r.uri), r.uri)).permute(2, 0, 1)
        boxes = torch.from_numpy(r.boxes[~r.iscrowd])
        rendered = V.make_views(image, boxes, s.image_id, k_max, args.seed, cfg)
        views[s.image_id] = {"image": image, "boxes": boxes, "labels": torch.from_numpy(r.labels[~r.iscrowd]),
                             "params": [p for _, p in rendered], "grids": [fp16(run_teacher(im)) for im, _ in rendered]}

    # Bytes per image of real shards.
    grid_shape = list(views[samples[0].image_id]["grids"][0].shape)
    sizes = {}
    for k in ks:
        sizes[k] = {}
        for dtype in ("fp16", "int8"):
            ids = sorted(views)
            writer = FeatureCacheWriter(str(work / f"cache-k{k}-{dtype}"), {"benchmark": True}, grid_shape, dtype,
                                        len(ids), {}, views=k, view_recipe=V.view_recipe(cfg) if k > 1 else None)
            shards = plan_shards(ids, len(ids))
            writer.begin(shards)
            rows = [(iid, v) for iid in ids for v in range(k)]
            info = writer.write_shard(0, [iid for iid, _ in rows],
                                      np.stack([views[iid]["grids"][v].numpy() for iid, v in rows]),
                                      views=[v for _, v in rows] if k > 1 else None,
                                      params=[json.dumps(views[iid]["params"][v], sort_keys=True) for iid, v in rows]
                                      if k > 1 else None)
            sizes[k][dtype] = round(info.bytes / len(ids), 1)

    def training_sample(iid: int, view: int):
        """What ingest.rows_to_samples hands the augmenter for this image and view."""
        v = views[iid]
        if view == 0:
            return S.Sample.create(v["image"], v["boxes"], v["labels"], grid=v["grids"][0], image_id=iid)
        s = V.apply_view(S.Sample.create(v["image"], v["boxes"], v["labels"], image_id=iid), v["params"][view], view)
        s.layers = [S.FeatureLayer(v["grids"][view], torch.eye(3))]
        return s

    def cos_of(aug) -> torch.Tensor:
        hw = (aug.size[0] // 32, aug.size[1] // 32)
        cached, mask = S.render_features(aug, hw)
        online = run_teacher(aug.image)
        if online.shape[-2:] != hw:
            online = torch.nn.functional.interpolate(online[None], size=hw, mode="bilinear", align_corners=False)[0]
        return torch.nn.functional.cosine_similarity(cached, online, dim=0)[mask]

    e0, e1, _ = cfg.policy_epochs
    regimes = {"mosaic_mixup_window": e0, "after_mosaic_window": e1}
    direct: dict = {name: {} for name in regimes}
    ids = sorted(views)
    for name, epoch in regimes.items():
        for k in ks:
            cos_all, cos_view, cos_plain, exact, total = [], [], [], 0, 0
            for e in range(args.view_epochs):
                batch = [training_sample(iid, select_view(args.seed, e, iid, k)) for iid in ids]
                exact += sum(s.view > 0 for s in batch)
                total += len(batch)
                # The same augmenter seed for every K: only the views differ between the runs.
                augmenter = A.Augmenter(cfg, seed=args.seed * 1000 + e)
                for i in range(0, len(batch), args.batch):
                    chunk = batch[i:i + args.batch]
                    for source, aug in zip(chunk, augmenter.batch(chunk, epoch)):  # output j is input j's
                        c = cos_of(aug)
                        cos_all.append(c)
                        (cos_view if source.view > 0 else cos_plain).append(c)
            c = torch.cat(cos_all).numpy()

            def mean(parts):
                return round(float(torch.cat(parts).mean()), 4) if parts else None

            direct[name][str(k)] = {"mean": round(float(c.mean()), 4), "p10": round(float(np.percentile(c, 10)), 4),
                                    "exact_view_fraction": round(exact / total, 3),
                                    "mean_on_view_samples": mean(cos_view), "mean_on_plain_samples": mean(cos_plain)}
    out = {}
    for k in ks:
        f = (k - 1) / k
        out[str(k)] = {
            "bytes_per_image": sizes[k],
            "exact_view_fraction": round(f, 3),
            # The brief's estimate: exact views at 1.0, the rest at the K=1 (views off) fidelity.
            "expected_fidelity": {name: round(f * 1.0 + (1 - f) * direct[name][str(min(ks))]["mean"], 4)
                                  if min(ks) == 1 else None for name in regimes},
            "direct_fidelity": {name: direct[name][str(k)] for name in regimes},
        }
    return {"note": "views 1..K-1 are exact for photometric/zoom-out/IoU crop/flip; Mosaic, Mixup and "
                    "multi-scale still act on them online, so direct < expected",
            "grid": grid_shape, "images": len(ids), "view_epochs": args.view_epochs, "batch": args.batch,
            "regime_epochs": regimes, "per_K": out}


if __name__ == "__main__":
    main()
