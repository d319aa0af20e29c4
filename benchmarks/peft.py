"""PEFT on a DEIMv2 student: full fine-tuning vs LoRA vs AdaRoute on the same model, side by side.

Prints one JSON line. Three copies of the same DEIMv2 model (same seed, same initial weights):

* ``full``: every parameter trains (ordinary fine-tuning);
* ``adaroute``: the ViT backbone frozen, AdaRoute adapters (rank ``--rank``, experts = adapted
  blocks) on ``attn.proj`` and ``mlp.fc2`` of every block; STA, encoder and decoder train;
* ``lora``: the same, with LoRA on the same layers at the rank whose trainable count is closest
  to AdaRoute's adapter budget (``peft.lora_rank_for_budget``).

Measured, for each: trainable parameters (of the model, and adapters vs the backbone); the
training step (forward, DEIM loss, backward, AdamW step) timed in interleaved rounds on the same
batch (the order rotates every round), median seconds and the ratio to full fine-tuning; and the
step's memory. Memory on GPU: ``torch.cuda.max_memory_allocated`` during the step minus what
was allocated before it (activations, gradients, transient buffers), plus the model's resident
parameters and optimizer state. On CPU there is no allocator counter: each method runs in a fresh
subprocess and the figure is its peak resident-set growth over two training steps, measured from
after building the model (Linux: the VmHWM peak counter reset through ``/proc/self/clear_refs``;
elsewhere the ``resource`` ``ru_maxrss`` growth); it covers activations, gradients, optimizer
state and allocator slack. ``memory_method`` in the output says which was used.

``--ap``: also train each copy for ``--ap-steps`` steps on the same batches of the synthetic
shapes set (``distillery.platform.datasets.synthetic``) and report COCO AP on its val split. Without
``--backbone-weights`` the ViT is random, so a frozen backbone (LoRA / AdaRoute) cannot match
full fine-tuning: the AP comparison is only meaningful with pretrained DINOv3 weights.

    python benchmarks/peft.py [--model deimv2_s] [--input-size 320] [--batch 2] [--rounds 5]
        [--rank 16] [--backbone-weights FILE] [--ap --ap-steps 300 --ap-train 64 --ap-val 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("full", "lora", "adaroute")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(method: str, args, lora_rank: int | None = None):
    """(model, report) for one method; every method starts from the same weights (same seed)."""
    import torch

    from distillery.students.deimv2 import apply_backbone_peft, build_deimv2

    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DEIMv2 backbone")
        model = build_deimv2(args.model, num_classes=args.num_classes, eval_spatial_size=args.input_size,
                             backbone_weights=args.backbone_weights)
    if method == "full":
        report = apply_backbone_peft(model, "none")
    elif method == "adaroute":
        report = apply_backbone_peft(model, "adaroute", rank=args.rank)
    elif method == "lora":
        report = apply_backbone_peft(model, "lora", rank=lora_rank)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model.to(_device()).train(), report


def lora_rank(args) -> int:
    """The LoRA rank matching AdaRoute's adapter budget on the same layers."""
    from distillery.students.peft import lora_rank_for_budget

    adaroute, report = build("adaroute", args)
    return lora_rank_for_budget(adaroute.vit, report.adapter_params)


def optimizer_for(model, args):
    from distillery.students.optim import build_optimizer

    return build_optimizer(model, lr=args.lr, backbone_lr=args.backbone_lr, weight_decay=1e-4)


def fixed_batch(args):
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    device = _device()
    images = torch.rand(args.batch, 3, args.input_size, args.input_size, generator=g).to(device)
    targets = []
    for _ in range(args.batch):
        n = 6
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=g) * 0.25 + 0.05
        targets.append({"labels": torch.randint(0, args.num_classes, (n,), generator=g).to(device),
                        "boxes": torch.cat([centres, sizes], 1).to(device)})
    return images, targets


def train_step(model, criterion, optimizer, images, targets) -> float:
    import torch

    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):  # bf16 on GPU
        losses = criterion(model(images, targets), targets)
        loss = torch.stack(list(losses.values())).sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sync()
    return time.perf_counter() - start


def resident_bytes(model, optimizer) -> int:
    """Parameters, buffers and optimizer state of one model (what stays allocated between steps)."""
    import torch

    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_probe(method: str, args) -> dict:
    """CPU memory of one method in this (fresh) process: resident-set growth over two training steps.

    Linux: the peak-RSS counter (VmHWM) is reset after the model is built (``/proc/self/clear_refs``
    = 5), so the figure is the peak during the steps minus the resident size before them.
    Elsewhere (or if the reset is refused): the ``ru_maxrss`` growth, which can read low when the
    build itself set a higher water mark.
    """
    import gc

    from distillery.students import build_criterion

    model, _ = build(method, args, lora_rank=args.lora_rank)
    criterion = build_criterion(num_classes=args.num_classes)
    optimizer = optimizer_for(model, args)
    images, targets = fixed_batch(args)
    gc.collect()
    how = "ru_maxrss"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
        how = "VmHWM"
    except OSError:
        before = None
    if before is None:
        how = "ru_maxrss"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        train_step(model, criterion, optimizer, images, targets)
    after = _proc_status_kib("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if platform.system() == "Darwin" else 1024  # KiB on Linux (ru_maxrss: bytes on macOS)
    return {"method": method, "rss_growth_mib": (after - before) * scale / 2**20, "how": how}


def cpu_memory(args) -> dict[str, float]:
    out = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--memory-probe", method, "--lora-rank", str(args.lora_rank)]
        for key in ("model", "input_size", "batch", "rank", "num_classes", "seed", "lr", "backbone_lr"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if args.backbone_weights:
            cmd += ["--backbone-weights", args.backbone_weights]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        out[method] = probe["rss_growth_mib"]
        out["how"] = probe["how"]
    return out


def speed_and_memory(args, models: dict, criterion) -> dict:
    import torch

    images, targets = fixed_batch(args)
    optimizers = {m: optimizer_for(model, args) for m, model in models.items()}
    for m, model in models.items():  # warm-up: allocator, optimizer state, kernels
        train_step(model, criterion, optimizers[m], images, targets)
    times = {m: [] for m in models}
    peak_extra = {m: 0 for m in models}
    order = list(models)
    for r in range(args.rounds):
        for m in order[r % len(order):] + order[:r % len(order)]:
            if images.is_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times[m].append(train_step(models[m], criterion, optimizers[m], images, targets))
            if images.is_cuda:
                peak_extra[m] = max(peak_extra[m], torch.cuda.max_memory_allocated() - base)
    out = {"step_s": {m: statistics.median(t) for m, t in times.items()}}
    out["step_ratio_vs_full"] = {m: out["step_s"][m] / out["step_s"]["full"] for m in models}
    if images.is_cuda:
        out["memory_method"] = "cuda.max_memory_allocated during the step + resident params/buffers/optimizer state"
        out["peak_memory_mib"] = {m: (peak_extra[m] + resident_bytes(models[m], optimizers[m])) / 2**20
                                  for m in models}
    return out


def synthetic_ap(args, models: dict, criterion) -> dict:
    """Train each copy on the same synthetic batches, then COCO AP on the val split."""
    import random

    import torch

    from distillery.evaluation.loop import evaluate_detector
    from distillery.platform.datasets.coco import load_coco, load_image_resized
    from distillery.platform.datasets.synthetic import generate_synthetic_coco

    device = _device()
    size = args.input_size
    with tempfile.TemporaryDirectory() as tmp:
        uris = generate_synthetic_coco(tmp, train=args.ap_train, val=args.ap_val, size=size, seed=args.seed)
        splits = {s: load_coco(uris[s], os.path.join(tmp, "images", s)) for s in ("train", "val")}
        images = {s: {r.image_id: torch.from_numpy(load_image_resized(r.uri, size)) for r in ds.records}
                  for s, ds in splits.items()}
    train, val = splits["train"], splits["val"]
    if train.categories.num_classes != args.num_classes:
        raise ValueError(f"--num-classes {args.num_classes} but the synthetic set has "
                         f"{train.categories.num_classes} classes")

    def batch(records):
        x = torch.stack([images["train"][r.image_id] for r in records]).float().div(255).to(device)
        targets = []
        for r in records:
            b = torch.from_numpy(r.boxes).float().reshape(-1, 4)
            cxcywh = torch.cat([b[:, :2] + b[:, 2:] / 2, b[:, 2:]], 1) / torch.tensor(
                [r.width, r.height, r.width, r.height], dtype=torch.float32)
            targets.append({"labels": torch.from_numpy(r.labels).long().to(device), "boxes": cxcywh.to(device)})
        return x, targets

    rng = random.Random(args.seed)
    order = [rng.sample(train.records, args.batch) for _ in range(args.ap_steps)]
    optimizers = {m: optimizer_for(model, args) for m, model in models.items()}
    for step_records in order:  # interleaved: every method sees the same batch at the same step
        x, targets = batch(step_records)
        for m, model in models.items():
            train_step(model, criterion, optimizers[m], x, targets)

    gt = val.coco_gt_dict()
    label_to_cat = [val.categories.to_category_id(i) for i in range(val.categories.num_classes)]
    val_images = torch.stack([images["val"][r.image_id] for r in val.records])
    result = {m: evaluate_detector(model, val.records, val_images, label_to_cat, gt, batch_size=8)["AP"]
              for m, model in models.items()}
    return {"ap": result, "ap_steps": args.ap_steps, "ap_train_images": args.ap_train, "ap_val_images": args.ap_val}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deimv2_s")
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16, help="AdaRoute expert rank")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--backbone-lr", type=float, default=2.5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone-weights", default=None, help="local DINOv3 / distilled ViT checkpoint")
    parser.add_argument("--ap", action="store_true", help="also train on the synthetic set and report AP")
    parser.add_argument("--ap-steps", type=int, default=300)
    parser.add_argument("--ap-train", type=int, default=64)
    parser.add_argument("--ap-val", type=int, default=16)
    parser.add_argument("--no-cpu-memory", action="store_true",
                        help="on CPU, skip the per-method memory probes (a fresh process each)")
    parser.add_argument("--memory-probe", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--lora-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args)))
        return
    if args.ap:
        from distillery.platform.datasets.synthetic import SYNTHETIC_CATEGORIES

        args.num_classes = len(SYNTHETIC_CATEGORIES)  # the synthetic set's classes

    from distillery.students import build_criterion

    args.lora_rank = lora_rank(args)
    models, reports = {}, {}
    for method in METHODS:
        models[method], reports[method] = build(method, args, lora_rank=args.lora_rank)
    criterion = build_criterion(num_classes=args.num_classes)
    result = {
        "benchmark": "peft",
        "model": args.model,
        "input_size": args.input_size,
        "batch": args.batch,
        "device": str(_device()) if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "backbone_weights": bool(args.backbone_weights),
        "adaroute_rank": args.rank,
        "lora_rank": args.lora_rank,
    }
    total = sum(p.numel() for p in models["full"].parameters())
    result["params"] = {
        m: {"model_total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "trainable_fraction": sum(p.numel() for p in model.parameters() if p.requires_grad) / total,
            "backbone_trainable": reports[m].trainable_params,
            "backbone_trainable_fraction": reports[m].trainable_params / reports[m].original_params}
        for m, model in models.items()}
    result.update(speed_and_memory(args, models, criterion))
    if not torch.cuda.is_available() and not args.no_cpu_memory:
        growth = cpu_memory(args)
        how = growth.pop("how")
        result["memory_method"] = (f"cpu, fresh process per method: peak resident-set growth ({how}) from after "
                                   "building the model over two training steps (activations, gradients, "
                                   "optimizer state, allocator slack)")
        result["peak_memory_growth_mib"] = growth
    if args.ap:
        result.update(synthetic_ap(args, models, criterion))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
