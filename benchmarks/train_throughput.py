"""Training throughput: cached teacher features vs the online teacher, and 2 workers vs 1.

Prints one JSON line with two measurements taken in one run:
1. ``cached_vs_online``: the student's training step (RT-DETRv4-S by default) in one process,
   with the teacher grid read from the batch (cached) vs computed by the frozen DINOv3 ViT-B/16
   on the same batch first (online, as RT-DETRv4's own code does); interleaved rounds, median
   img/s each, ratio cached/online (goal >= 1.6).
2. ``workers``: the whole distillation job (Ray Train + DeepSpeed + Ray Data ingest, cached
   teacher) with 1 worker holding every core vs 2 workers splitting them; img/s of the last
   epoch (the first warms up), ratio 2/1 (goal >= 1.7 when each worker has its own device; on a
   2-core CPU both share the same cores, so expect far less).

    python benchmarks/train_throughput.py [--student rtdetrv4_s] [--input-size 640] [--batch 4]
        [--rounds 3] [--job-input-size 320] [--job-images 48] [--skip-job] [--teacher-kwargs JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def step_throughput(args) -> dict:
    import torch

    from distillery.students import build_criterion, build_student
    from distillery.students.training import train_step
    from distillery.teachers import DinoV3Teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    size, b = args.input_size, args.batch
    teacher = DinoV3Teacher(allow_random_init=True, input_size=size, model_kwargs=json.loads(args.teacher_kwargs),
                            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    student = build_student(args.student, num_classes=80, eval_spatial_size=size,
                            teacher_dim=teacher.embed_dim).to(device).train()
    criterion = build_criterion(num_classes=80)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    images = torch.rand(b, 3, size, size, device=device)
    targets = [{"labels": torch.randint(0, 80, (6,), device=device),
                "boxes": torch.rand(6, 4, device=device) * 0.5 + 0.25} for _ in range(b)]
    cached_grid = teacher(images)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(online: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        grid = teacher(images) if online else cached_grid
        with autocast:  # bf16 on CUDA, as the distillation job's DeepSpeed engine
            train_step(student, criterion, {"images": images, "targets": targets, "teacher_grid": grid},
                       backward=lambda loss: loss.backward(), step=lambda: (opt.step(), opt.zero_grad()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return b / (time.perf_counter() - t)

    step(False), step(True)  # warm-up
    cached, online = [], []
    for _ in range(args.rounds):
        cached.append(step(False))
        online.append(step(True))
    c, o = statistics.median(cached), statistics.median(online)
    return {"student": args.student, "input_size": size, "batch": b, "device": str(device),
            "autocast": "bfloat16" if device.type == "cuda" else "none", "cached_img_s": round(c, 3), "online_img_s": round(o, 3), "ratio": round(c / o, 3)}


def job_throughput(args, workers: int) -> float:
    from distillery.platform.config.sections import load_config
    from distillery.platform.distill.driver import run_distill
    from distillery.platform.config.distill import DistillConfig

    cpus = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix=f"train-bench-{workers}w-"))
    s = args.job_input_size
    cfg = load_config(DistillConfig, None, [
        f"data.root={args.data}", f"cache.uri={args.data}-cache", f"student.name={args.student}",
        f"student.input_size={s}", "teacher.allow_random_init=true", f"teacher.input_size={s}", f"train.num_workers={workers}",
        f"train.cpus_per_worker={max(1, cpus // workers)}", "train.epochs=2", f"train.batch_size={args.batch}",
        "train.eval_every=100", f"output.storage_path={work / 'train'}", f"output.local_dir={work}",
        "tracking.log_model=false", "tracking.system_metrics=false", "tracking.num_val_images=0",
        "optim.no_aug_epochs=0", "optim.flat_epochs=2", "augment.policy_epochs=[0,0,100]",
        "augment.mixup_epochs=[0,0]"])
    summary = run_distill(cfg)
    return float(summary["metrics"]["images_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="rtdetrv4_s")
    parser.add_argument("--input-size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--job-input-size", type=int, default=320)
    parser.add_argument("--job-images", type=int, default=48)
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--teacher-kwargs", default="{}", help="timm overrides of the ViT-B/16 teacher (CI: a tiny one)")
    args = parser.parse_args()

    import logging

    logging.disable(logging.INFO)
    result = {"benchmark": "train_throughput", "teacher": "vit_base_patch16_dinov3 (random init)",
              "teacher_kwargs": json.loads(args.teacher_kwargs),
              "cpus": os.cpu_count(), "cached_vs_online": step_throughput(args)}
    if not args.skip_job:
        from distillery.platform.datasets.synthetic import generate_synthetic_coco

        args.data = str(Path(tempfile.mkdtemp(prefix="train-bench-data-")) / "data")
        generate_synthetic_coco(args.data, train=args.job_images, val=4, size=args.job_input_size, seed=0)
        one = job_throughput(args, 1)
        two = job_throughput(args, 2)
        result["workers"] = {"student": args.student, "input_size": args.job_input_size, "batch_per_worker": args.batch,
                             "one_worker_img_s": round(one, 3), "two_workers_img_s": round(two, 3),
                             "ratio": round(two / one, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
