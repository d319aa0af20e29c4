"""RT-DETRv4 student speed: batch-1 latency, training-step throughput and GAM overhead, per size.

Prints one JSON line. For each size in ``--sizes`` (S/M/L/X at ``--input-size`` 640):

* ``latency_ms``: eval forward of the inference model (no post-processing), batch 1, median of
  ``--iters`` after ``--warmup`` runs; ``fps`` = 1000 / latency. Paper reference (T4, TensorRT
  FP16): 273 / 169 / 124 / 78 FPS for S / M / L / X.
* ``train``: the fit loop's training step (:func:`distillery.students.fit.make_step`: forward,
  DEIM losses + DSI against a 768-d teacher grid at F5's size, backward, clipping, AdamW with the
  recipe's groups, EMA) at ``--batch``; median step time and img/s.
* ``gam``: the same step with and without the GAM controller, interleaved (ABBA rounds on one
  model and optimizer; both steps compute the DSI loss, so the only difference is GAM's
  per-step gradient-norm accounting); ``ratio`` = median with / median without (goal < 1.03),
  ``ratio_paired`` = median over rounds of (with / without) within a round.
  ``accumulate_ms`` times that accounting alone on the step's real gradients (more precise than
  the ratio of two noisy medians); ``end_epoch_ms`` is the once-per-epoch update (one host sync).

Device: CUDA when available (bf16 autocast for the forward and the losses), else CPU.

    python benchmarks/student_speed.py [--sizes s m l x] [--iters 10] [--warmup 3] [--batch 2]
        [--input-size 640] [--no-train] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from distillery.students import build_criterion, build_student  # noqa: E402
from distillery.students.ema import ModelEMA  # noqa: E402
from distillery.students.fit import make_step  # noqa: E402
from distillery.students.gam import GAM_DEFAULTS, GAMController  # noqa: E402
from distillery.students.optim import OPTIM_DEFAULTS, build_optimizer  # noqa: E402
from distillery.students.training import compute_losses, named_grads  # noqa: E402
from benchmarks.timing import timed  # noqa: E402

TEACHER_DIM = 768  # DINOv3 ViT-B/16, as in RT-DETRv4



def _batch(b: int, size: int, device: torch.device, generator: torch.Generator) -> dict:
    """Random images, 6 objects per image, and a teacher grid at F5's size (640 / 32 = 20)."""
    f5 = size // 32
    targets = [{"labels": torch.randint(0, 80, (6,), generator=generator).to(device),
                "boxes": (torch.rand(6, 4, generator=generator) * 0.4 + 0.2).to(device)} for _ in range(b)]
    return {"images": torch.rand(b, 3, size, size, generator=generator).to(device), "targets": targets,
            "teacher_grid": torch.randn(b, TEACHER_DIM, f5, f5, generator=generator).to(device)}


def latency(model, size: int, iters: int, warmup: int, device: torch.device, dtype) -> dict:
    model.eval()
    images = torch.rand(1, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(images)
        times = [timed(lambda: model(images), device) * 1e3 for _ in range(iters)]
    ms = statistics.median(times)
    return {"latency_ms": round(ms, 2), "fps": round(1000.0 / ms, 2), "latency_ms_all": [round(t, 2) for t in times]}


def training(model, name: str, size: int, batch: int, iters: int, warmup: int, device: torch.device, dtype) -> dict:
    recipe = OPTIM_DEFAULTS[name]
    optimizer = build_optimizer(model, **recipe)
    criterion = build_criterion(num_classes=80)
    ema = ModelEMA(model, decay=recipe["ema_decay"], warmups=recipe["ema_warmups"])
    gam = GAMController(**GAM_DEFAULTS[name])
    common = dict(clip_max_norm=recipe["clip_max_norm"], ema=ema, autocast_dtype=dtype)
    # Two step functions over the same model, optimizer and EMA: only the GAM controller differs.
    without = make_step(model, criterion, optimizer, gam=None, **common)
    with_gam = make_step(model, criterion, optimizer, gam=gam, **common)
    batch_data = _batch(batch, size, device, torch.Generator().manual_seed(0))

    for _ in range(warmup):
        without(batch_data)
        with_gam(batch_data)
    plain, gammed = [], []
    for i in range(iters):  # ABBA: each side goes first half of the time
        order = ((without, plain), (with_gam, gammed)) if i % 2 == 0 else ((with_gam, gammed), (without, plain))
        for step, times in order:
            times.append(timed(lambda: step(batch_data), device) * 1e3)

    # The accounting alone, on the real gradients of one more step (read before the update).
    model.train()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        result = compute_losses(model, criterion, batch_data["images"], batch_data["targets"],
                                teacher_grid=batch_data["teacher_grid"], dsi_weight=gam.current_lambda)
    result.total.backward()
    accumulate = [timed(lambda: gam.accumulate(named_grads(model)), device) * 1e3 for _ in range(max(iters, 5))]
    optimizer.zero_grad(set_to_none=True)
    end_epoch_ms = timed(lambda: gam.end_epoch(0), device) * 1e3

    step_ms, gam_ms = statistics.median(plain), statistics.median(gammed)
    acc_ms = statistics.median(accumulate)
    return {
        "train": {"batch": batch, "step_ms": round(step_ms, 1), "img_s": round(batch * 1000.0 / step_ms, 3),
                  "step_ms_all": [round(t, 1) for t in plain]},
        "gam": {"step_ms_without": round(step_ms, 1), "step_ms_with": round(gam_ms, 1),
                "ratio": round(gam_ms / step_ms, 4),
                "ratio_paired": round(statistics.median(g / p for g, p in zip(gammed, plain)), 4),
                "step_ms_with_all": [round(t, 1) for t in gammed],
                "accumulate_ms": round(acc_ms, 3), "accumulate_fraction": round(acc_ms / step_ms, 5),
                "end_epoch_ms": round(end_epoch_ms, 3), "aifi_share": round(gam.history[-1]["ratio"], 5)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["s", "m", "l", "x"], choices=["s", "m", "l", "x"])
    parser.add_argument("--input-size", type=int, default=640)
    parser.add_argument("--iters", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="training batch size")
    parser.add_argument("--no-train", action="store_true", help="latency only")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    out = {"benchmark": "student_speed", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
           "autocast": str(dtype).replace("torch.", "") if dtype else "none", "torch": torch.__version__,
           "input_size": args.input_size, "iters": args.iters, "warmup": args.warmup, "results": {}}
    for size in args.sizes:
        name = f"rtdetrv4_{size}"
        model = build_student(name, eval_spatial_size=args.input_size, teacher_dim=TEACHER_DIM).to(device)
        row = {"params_m": round(model.num_inference_parameters() / 1e6, 2)}
        row.update(latency(model, args.input_size, args.iters, args.warmup, device, dtype))
        if not args.no_train:
            row.update(training(model, name, args.input_size, args.batch, args.iters, args.warmup, device, dtype))
        out["results"][name] = row
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
