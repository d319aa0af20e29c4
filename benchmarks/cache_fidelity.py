"""Cache fidelity: how faithful are cached teacher features after augmentation?

For each transform of the training recipe, and for the whole pipeline, compare two grids at
the student's F5 resolution for the same augmented image:
- *cached*: the teacher's grid of the unaugmented image, carried through the transform by
  :mod:`distillery.platform.augment` (affine map + resampling; Mixup blends two grids);
- *online*: the teacher run on the augmented image (what RT-DETRv4's own code does each step).
Prints one JSON line with the mean (and 10th-percentile) per-position cosine similarity over the
valid positions, per transform. Transforms below 0.9 are candidates for pre-augmented cached views.

    python benchmarks/cache_fidelity.py [--images 16] [--input-size 640] [--weights PATH]

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
    args = parser.parse_args()

    import numpy as np
    import torch

    from distillery.platform import augment as A
    from distillery.platform.coco import decode_image, load_coco
    from distillery.platform import storage
    from distillery.platform.synthetic import generate_synthetic_coco
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
        x = A.resize(A.Sample.create(image_u8, torch.zeros(0, 4), torch.zeros(0)), (size, size)).image
        return teacher(x[None].to(device).float() / 255.0)[0].cpu()

    samples = []
    for r in ds.records:
        img = torch.from_numpy(decode_image(storage.read_bytes(r.uri), r.uri)).permute(2, 0, 1)
        samples.append(A.Sample.create(img, torch.from_numpy(r.boxes), torch.from_numpy(r.labels),
                                       grid=run_teacher(img), image_id=r.image_id))
    f5 = (size // 32, size // 32)
    cfg = A.AugmentConfig(size=size)

    def finish(s: A.Sample) -> A.Sample:
        return A.resize(s, (size, size))

    def zoom(s):
        h, w = s.size
        r = rng.uniform(1.0, 4.0)
        return finish(A.zoom_out(s, r, rng.randint(0, int(w * r) - w), rng.randint(0, int(h * r) - h)))

    def iou_crop(s):
        for _ in range(20):
            p = A.iou_crop_params(s, rng)
            if p is not None:
                return finish(A.crop(s, *p))
        return finish(s)

    def mosaic(s):
        others = rng.sample(samples, 3)
        deg, trans, (lo, hi) = cfg.mosaic_affine
        side = size
        return finish(A.mosaic([s, *others], size // 2, angle=rng.uniform(-deg, deg),
                               translate=(rng.uniform(-trans, trans) * side, rng.uniform(-trans, trans) * side),
                               scale=rng.uniform(lo, hi)))

    def multiscale(s):
        out = rng.choice([x for x in A.multiscale_sizes(size) if x != size])
        return A.resize(s, (out, out))

    transforms = {
        "identity": finish,
        "hflip": lambda s: finish(A.hflip(s)),
        "photometric": lambda s: finish(A.photometric(s)),
        "zoom_out": zoom,
        "iou_crop": iou_crop,
        "multiscale_resize": multiscale,
        "mosaic": mosaic,
        "mixup": lambda s: A.mixup(finish(s), finish(rng.choice(samples)), rng.uniform(0.45, 0.55)),
        "pipeline_strong": lambda s: A.Augmenter(cfg, seed=rng.randrange(10 ** 6))(s, epoch=10, pool=samples),
    }
    results = {}
    t0 = time.time()
    for name, fn in transforms.items():
        cos_all = []
        for s in samples[: args.images]:
            aug = fn(s)
            hw = (aug.size[0] // 32, aug.size[1] // 32)
            cached, mask = A.render_features(aug, hw)
            # The teacher runs at its input size; a multi-scale image's grid is then resized to F5.
            online = run_teacher(aug.image)
            online = torch.nn.functional.interpolate(online[None], size=hw, mode="bilinear",
                                                     align_corners=False)[0] if online.shape[-2:] != hw else online
            cos = torch.nn.functional.cosine_similarity(cached, online, dim=0)[mask]
            cos_all.append(cos)
        c = torch.cat(cos_all).numpy()
        results[name] = {"mean": round(float(c.mean()), 4), "p10": round(float(np.percentile(c, 10)), 4)}
    poor = sorted(k for k, v in results.items() if v["mean"] < 0.9)
    print(json.dumps({
        "benchmark": "cache_fidelity", "teacher": teacher.model_name,
        "weights": "random-init (geometry/resampling only; not semantic fidelity)" if args.weights is None
        else args.weights, "input_size": size, "f5": list(f5), "images": args.images,
        "cosine_cached_vs_online": results, "below_0.9": poor, "seconds": round(time.time() - t0, 1),
        "device": str(device)}))


if __name__ == "__main__":
    main()
