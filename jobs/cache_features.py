"""Build the teacher-feature cache of a COCO dataset with Ray Data.

    python jobs/cache_features.py [--config configs/X.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/cache_features.py --config configs/X.yaml

With no --config it runs the embedded default: the synthetic dataset (generated if absent), the
DINOv3 ViT-B/16 teacher (random weights unless teacher.weights is set), a local Ray instance.
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from distillery.platform.cache.job import CacheFeaturesConfig, run_cache_job  # noqa: E402
from distillery.platform.config.sections import parse_job_args  # noqa: E402
from distillery.platform.errors import exit_on_user_error  # noqa: E402


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_args(CacheFeaturesConfig, argv, description=__doc__.split("\n\n")[0])
    summary = run_cache_job(cfg)
    for split, s in summary.items():
        print(f"[{split}] cache: {s['uri']}  images: {s['images']}  shards: {s['shards']} "
              f"(computed {s['shards_computed']}, reused {s['shards_reused']})  "
              f"teacher forwards: {s['teacher_forwards']}  grid: {s['grid']} {s['dtype']}  "
              f"{s['bytes_per_image']:.0f} bytes/image  "
              f"{s['images_per_second'] or '-'} img/s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    exit_on_user_error(main)  # a user error: one "error: ..." block, exit status 2
