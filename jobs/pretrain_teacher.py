"""Build the domain teacher (a DINOv3 trained on synthetic images disjoint from the student's) and probe it.

    python jobs/pretrain_teacher.py [--config configs/X.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/pretrain_teacher.py

With no --config it builds the embedded defaults' teacher under runs/data/synthetic/teacher/ (or
reuses it), in Meta's DINOv3 checkpoint layout, and prints a linear probe of its patch features
against the random-weight teacher's. jobs/distill.py and jobs/cache_features.py build the same file
on first use; this job builds it ahead of them.
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from distillery.platform.config.sections import parse_job_args  # noqa: E402
from distillery.platform.config.teacher_pretrain import PretrainTeacherConfig  # noqa: E402
from distillery.platform.errors import exit_on_user_error  # noqa: E402
from distillery.platform.teacher_pretrain.job import run_pretrain_teacher  # noqa: E402


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_job_args(PretrainTeacherConfig, argv, description=__doc__.split("\n\n")[0])
    s = run_pretrain_teacher(cfg)
    print(f"teacher: {s['weights']}  ({'built' if s['built'] else 'reused'} in {s['seconds']} s)")
    print(f"  use it: teacher.weights={s['weights']} teacher.model_name={s['teacher_kwargs']['model_name']} "
          f"'teacher.model_kwargs={json.dumps(s['teacher_kwargs']['model_kwargs'])}'")
    if "probe" in s:
        p = s["probe"]
        print(f"linear probe, per-patch class, balanced accuracy on {p['probe']['test_images']} held-out images: "
              f"domain teacher {p['domain']['balanced_accuracy']:.3f}, random teacher "
              f"{p['random']['balanced_accuracy']:.3f}")
    print(json.dumps(s))
    return s


if __name__ == "__main__":
    exit_on_user_error(main)  # a user error: one "error: ..." block, exit status 2
