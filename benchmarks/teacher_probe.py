"""The domain teacher: how long its build takes, and whether its features carry the domain.

Builds the domain teacher (``ensure_domain_teacher``: the synthetic pool of its own seed, dense
per-patch training, the Meta-layout file) in a fresh directory, so the build is always timed, then
probes it against the random-weight teacher of the same architecture
(``distillery.platform.teacher_pretrain.probe``: a linear probe of frozen patch features for the
per-patch class, background included, balanced accuracy on held-out images of another seed).
Prints one JSON line.

    python benchmarks/teacher_probe.py [--image-size 256] [--images 1500] [--steps 600] [--batch-size 16]
                                       [--probe-images 200] [--data-root DIR]

The defaults are the embedded default's teacher (256 px input pooled to 128: an 8x8 grid).
``--data-root`` reuses a teacher already built there (then ``built`` is false and the build time is
not measured).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

import torch  # noqa: E402

from distillery.platform.teacher_pretrain import ensure_domain_teacher  # noqa: E402
from distillery.platform.teacher_pretrain.probe import probe_domain_teacher  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--model-kwargs", default=None, help="JSON timm overrides (default: the domain teacher's)")
    parser.add_argument("--probe-images", type=int, default=200, help="probe train and test images, each")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)

    root = args.data_root or tempfile.mkdtemp(prefix="teacher-probe-")
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    t0, cpu0 = time.perf_counter(), time.process_time()
    teacher = ensure_domain_teacher(root, image_size=args.image_size, seed=args.seed, images=args.images,
                                    steps=args.steps, batch_size=args.batch_size, lr=args.lr, model_kwargs=kwargs)
    build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    made = json.loads(Path(teacher.weights).with_suffix(".json").read_text())
    probe = probe_domain_teacher(teacher, train_images=args.probe_images, test_images=args.probe_images,
                                 steps=args.probe_steps)
    out = {"benchmark": "teacher_probe", "built": teacher.built,
           "build_seconds": round(build_s, 1) if teacher.built else None,
           "build_cpu_seconds": round(build_cpu_s, 1) if teacher.built else None,
           "pool_seconds": made.get("pool_seconds"), "train_seconds": made.get("train_seconds"),
           "domain_balanced_accuracy": round(probe["domain"]["balanced_accuracy"], 4),
           "random_balanced_accuracy": round(probe["random"]["balanced_accuracy"], 4),
           "domain_accuracy": round(probe["domain"]["accuracy"], 4),
           "random_accuracy": round(probe["random"]["accuracy"], 4),
           "probe": probe["probe"], "settings": teacher.settings, "weights": teacher.weights,
           "weights_bytes": os.path.getsize(teacher.weights), "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
