"""Feature-cache throughput: bare teacher forward vs the end-to-end Ray Data cache job.

Prints one JSON line. In one run, on the same images:
- ``bare_img_s``: the teacher's forward alone on pre-decoded, pre-resized images (same device,
  dtype, batch size and thread count as a cache actor);
- ``job_img_s``: the cache job end to end (decode + resize in CPU tasks, teacher actor, Parquet
  shard writes, manifest), fp16 storage, wall time including actor start-up; ``ratio`` = job /
  bare (goal >= 0.9); ``job_steady_img_s``/``steady_ratio``: from the first teacher forward to
  the last shard written (start-up excluded: what a long job over a large dataset sees);
- ``bytes_per_image`` for fp16 and int8 storage, and the cosine similarity of int8 vs fp16
  features (goal >= 0.995), from a second (int8) run of the job.

    python benchmarks/cache_throughput.py [--images 64] [--input-size 640] [--batch 16]
        [--teacher-kwargs '{"embed_dim": 64, "depth": 2, "num_heads": 2}'] [--device auto]

Default teacher: DINOv3 ViT-B/16 (random weights: throughput does not depend on them) at the
RT-DETRv4 input (640 px pooled by 2 to 320 px, a 20x20 grid).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=640)
    parser.add_argument("--image-size", type=int, default=640, help="side of the synthetic JPEGs")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--teacher-kwargs", default="{}")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=None)
    return parser


def run(args) -> dict:
    """The measurement (see the module docstring) as a dict; starts and stops its own Ray."""
    import numpy as np
    import ray
    import torch

    from distillery.platform.cache.job import CacheFeaturesConfig, build_teacher, run_cache_job
    from distillery.platform.datasets.coco import load_coco, load_image_resized
    from distillery.platform.config.sections import load_config
    from distillery.platform.cache.feature_cache import FeatureCache
    from distillery.platform.datasets.synthetic import generate_synthetic_coco

    gpu = torch.cuda.is_available()
    cpus = os.cpu_count() or 2
    cpus_per_actor = args.cpus_per_actor or (4.0 if gpu else float(cpus))
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    generate_synthetic_coco(work / "data", train=args.images, val=1, size=args.image_size, seed=0)
    kwargs = json.loads(args.teacher_kwargs)

    def cfg(uri: str, dtype: str):
        return load_config(CacheFeaturesConfig, None, [
            f"data.root={work / 'data'}", f"cache.uri={uri}", f"cache.dtype={dtype}",
            f"cache.shard_size={args.shard_size}", "teacher.allow_random_init=true", f"teacher.input_size={args.input_size}",
            f"teacher.model_kwargs={json.dumps(kwargs)}", f"compute.batch_size={args.batch}",
            f"compute.actors={args.actors}", f"compute.cpus_per_actor={cpus_per_actor}",
            "data.check_images=none"])

    # Ray gets one more logical CPU than the actors hold so decode/write tasks can run beside them.
    ray.init(num_cpus=int(cpus_per_actor * args.actors) + (cpus if gpu else 1), include_dashboard=False,
             log_to_driver=False)
    try:
        c = cfg(str(work / "fp16"), "fp16")
        dtype = "bfloat16" if gpu else "float32"
        device = torch.device("cuda" if gpu else "cpu")
        torch.set_num_threads(max(1, int(cpus_per_actor)))
        teacher = build_teacher(c.teacher.model_dump(), dtype).to(device)
        ds = load_coco(*c.data.split_paths("train"), check_images="none")
        images = torch.from_numpy(np.stack([load_image_resized(r.uri, args.input_size) for r in ds.records]))

        def bare_pass() -> float:
            t = time.perf_counter()
            for i in range(0, len(images), args.batch):
                x = images[i:i + args.batch].to(device, non_blocking=True).float().div_(255.0)
                teacher(x).float().cpu()
            if gpu:
                torch.cuda.synchronize()
            return len(images) / (time.perf_counter() - t)

        bare_pass()  # warm-up (allocator, kernels)
        bare = bare_pass()
        del teacher
        fp16 = run_cache_job(c)["train"]
        int8 = run_cache_job(cfg(str(work / "int8"), "int8"))["train"]
        bare_again = 0.0
        teacher = build_teacher(c.teacher.model_dump(), dtype).to(device)
        bare_again = bare_pass()  # bracket the job: machines drift
        bare_mean = (bare + bare_again) / 2

        a, b = FeatureCache(fp16["uri"]), FeatureCache(int8["uri"])
        cos = []
        for r in ds.records:
            x, y = a.get(r.image_id).reshape(a.grid[0], -1), b.get(r.image_id).reshape(b.grid[0], -1)
            cos.append(((x * y).sum(0) / (np.linalg.norm(x, axis=0) * np.linalg.norm(y, axis=0) + 1e-12)).min())
        result = {
            "benchmark": "cache_throughput",
            "device": torch.cuda.get_device_name(0) if gpu else f"cpu x{cpus} ({platform.processor() or platform.machine()})",
            "teacher": c.teacher.model_name, "teacher_kwargs": kwargs, "weights": "random-init",
            "input_size": args.input_size, "grid": fp16["grid"], "compute_dtype": dtype,
            "images": args.images, "batch": args.batch, "actors": args.actors, "cpus_per_actor": cpus_per_actor,
            "decode": "cpu-tasks",
            "bare_img_s": round(bare_mean, 2), "job_img_s": fp16["images_per_second"],
            "ratio": round(fp16["images_per_second"] / bare_mean, 3),
            "job_steady_img_s": fp16["steady_images_per_second"],
            "steady_ratio": round(fp16["steady_images_per_second"] / bare_mean, 3)
            if fp16["steady_images_per_second"] else None,
            "int8_job_img_s": int8["images_per_second"],
            "bytes_per_image_fp16": fp16["bytes_per_image"], "bytes_per_image_int8": int8["bytes_per_image"],
            "cos_int8_vs_fp16_min": round(float(min(cos)), 5),
            "cos_int8_vs_fp16_mean": round(float(np.mean(cos)), 5),
        }
    finally:
        ray.shutdown()
    return result


def main() -> None:
    print(json.dumps(run(parser().parse_args())))


if __name__ == "__main__":
    main()
