"""Build the domain teacher and probe it, or (--engine) pretrain a DINOv3 teacher on your dataset.

    python jobs/pretrain_teacher.py [--config configs/X.yaml] [dotted.key=value ...]
    python jobs/pretrain_teacher.py --engine [--config configs/teacher_pretrain_tiny.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/pretrain_teacher.py --engine data.root=/data/coco ...

Without --engine (one process, a few CPU minutes): it builds the embedded defaults' domain teacher
under runs/data/synthetic/teacher/ (or reuses it), in Meta's DINOv3 checkpoint layout, and prints a
linear probe of its patch features against the random-weight teacher's. jobs/distill.py and
jobs/cache_features.py build the same file on first use; this builds it ahead of them.

With --engine: the teacher_pretrain job on the training engine (Ray Train + DeepSpeed workers, a
checkpoint per epoch, output.resume_from, one MLflow run). It trains a DINOv3 ViT (model.*; from
model.init_weights, e.g. Meta's .pth, or from random weights) on the train split of data.*
(COCO, YOLO or VOC, as the other jobs read it) to tell each patch's box class, evaluates a linear
probe of its patch features on the val split each epoch (balanced per-patch accuracy), and writes
the best epoch's ViT in Meta's layout to <output.storage_path>/<output.name>/teacher.pth, which
teacher.weights= of jobs/distill.py and jobs/cache_features.py loads (the line it prints says how).
"""

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from distillery.platform.config.sections import parse_job_args  # noqa: E402
from distillery.platform.config.teacher_pretrain import PretrainTeacherConfig  # noqa: E402
from distillery.platform.errors import exit_on_user_error  # noqa: E402
from distillery.platform.teacher_pretrain.config import TeacherPretrainConfig  # noqa: E402
from distillery.platform.teacher_pretrain.domain_job import run_pretrain_teacher  # noqa: E402
from distillery.platform.teacher_pretrain.driver import run_teacher_pretrain  # noqa: E402

ENGINE_FLAG = "--engine"


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if ENGINE_FLAG in argv:
        argv.remove(ENGINE_FLAG)
        return on_the_engine(argv)
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


def on_the_engine(argv: list[str]) -> dict:
    cfg = parse_job_args(TeacherPretrainConfig, argv, description=__doc__.split("\n\n")[0])
    s = run_teacher_pretrain(cfg)
    t, best, before = s["teacher"], s["best_metrics"], s["initial_metrics"] or {}
    print(f"val balanced per-patch accuracy (linear probe): {best['balanced_accuracy']:.3f} at epoch "
          f"{s['checkpoint_epoch'] + 1}, {before.get('balanced_accuracy', float('nan')):.3f} before training")
    print(f"teacher: {t['weights']}")
    print(f"  use it: teacher.weights={t['weights']} teacher.model_name={t['model_name']} "
          f"'teacher.model_kwargs={json.dumps(t['model_kwargs'])}' teacher.input_size={t['input_size']} "
          f"teacher.pool={t['pool']}")
    print(f"MLflow run: {s['run_id']}  (tracking URI {s['tracking_uri']}, experiment {s['experiment']})")
    print(f"checkpoints: {s['run_storage']}  (best: {s['best_checkpoint']})")
    print(json.dumps(s, default=str))
    return s


if __name__ == "__main__":
    exit_on_user_error(main)  # a user error: one "error: ..." block, exit status 2
