"""Fine-tuning from a checkpoint vs training from scratch, same student, same budget, other classes.

Prints one JSON line. On the synthetic shapes (``distillery.platform.datasets.synthetic``):

1. **base**: ``rtdetrv4_tiny`` trains ``--base-steps`` steps on set A (``--base-train`` images,
   seed 0) labelled with the 6 shape classes, and is saved in the official release layout
   (``{"model": ..., "ema": {"module": ...}}``);
2. **target**: set B (other images, seed 1) relabelled into 3 *other* classes: ``round`` (circle,
   ring), ``polygon`` (square, triangle), ``spiky`` (star, cross);
3. **finetune**: ``build_student(weights=base.pth, num_classes=3)`` (the class-dependent tensors
   are re-initialised, everything else loaded) and **scratch**: ``build_student(num_classes=3)``
   from the same seed, each trained ``--epochs`` x ``--steps-per-epoch`` steps on set B's train
   split with the same optimiser, learning rates, batches and flip augmentation; COCO AP /
   AP50 on set B's val split after every epoch (the trained weights, no EMA).

``ap_ratio_last`` = fine-tune AP / scratch AP after the last epoch. Single process, CPU or GPU.
``--tracking-uri``: both curves also go to an MLflow run (metrics per epoch and a plot).

    python benchmarks/finetune_vs_scratch.py [--size 128] [--base-steps 300] [--epochs 5]
        [--steps-per-epoch 12] [--batch 8] [--threads 1] [--out DIR] [--tracking-uri sqlite:///runs/mlflow.db]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distillery.platform.datasets.coco import load_coco, load_image_resized, training_target  # noqa: E402
from distillery.evaluation.loop import evaluate_detector  # noqa: E402
from distillery.platform.datasets.synthetic import generate_synthetic_coco  # noqa: E402
from distillery.students import build_criterion, build_student  # noqa: E402
from distillery.students.fit import make_step  # noqa: E402
from distillery.students.optim import build_optimizer  # noqa: E402

TARGET_CLASSES = {"round": ("circle", "ring"), "polygon": ("square", "triangle"), "spiky": ("star", "cross")}


def relabel(annotation_file: Path, out: Path) -> Path:
    """Set B's annotations with the 3 target classes instead of the 6 shapes."""
    doc = json.loads(annotation_file.read_text())
    shape_name = {c["id"]: c["name"] for c in doc["categories"]}
    target_id = {shape: i + 1 for i, shapes in enumerate(TARGET_CLASSES.values()) for shape in shapes}
    for ann in doc["annotations"]:
        ann["category_id"] = target_id[shape_name[ann["category_id"]]]
    doc["categories"] = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(TARGET_CLASSES)]
    out.write_text(json.dumps(doc))
    return out


def load_split(annotations: Path, images: Path, size: int):
    """(images (N, 3, S, S) in [0, 1], targets with normalised cxcywh boxes, dataset)."""
    dataset = load_coco(str(annotations), str(images))
    pixels = torch.stack([torch.from_numpy(load_image_resized(r.uri, size)) for r in dataset.records])
    targets = [training_target(r) for r in dataset.records]
    return pixels.float() / 255.0, targets, dataset


def batches(images: torch.Tensor, targets: list[dict], batch: int, seed: int, device: torch.device):
    """Endless shuffled batches, each image flipped horizontally with probability 1/2 (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start:start + batch]
            flip = torch.rand(batch, generator=generator) < 0.5
            chosen = images[index]
            out_targets = []
            for flipped, i in zip(flip.tolist(), index.tolist()):
                boxes = targets[i]["boxes"].clone()
                if flipped:
                    boxes[:, 0] = 1.0 - boxes[:, 0]
                out_targets.append({"labels": targets[i]["labels"].to(device), "boxes": boxes.to(device)})
            yield {"images": torch.where(flip[:, None, None, None], chosen.flip(-1), chosen).to(device),
                   "targets": out_targets}


def coco_ap(model, images, dataset, device) -> dict[str, float]:
    metrics = evaluate_detector(model, dataset.records, images.to(device), list(dataset.categories.category_ids),
                                dataset.coco_gt_dict())
    return {"AP": round(metrics["AP"], 4), "AP50": round(metrics["AP50"], 4)}


def train(model, num_classes: int, data, steps: int, args, device, seed: int, val=None, every: int = 0):
    """``steps`` steps of the shared train step (AdamW, constant rates, clip 0.1); AP every ``every``."""
    images, targets, _ = data
    criterion = build_criterion(num_classes=num_classes)
    optimizer = build_optimizer(model, lr=args.lr, backbone_lr=args.backbone_lr, weight_decay=1e-4)
    step = make_step(model, criterion, optimizer, clip_max_norm=0.1)
    stream = batches(images, targets, args.batch, seed, device)
    history, losses = [], []
    for i in range(1, steps + 1):
        model.train()
        losses.append(float(step(next(stream)).as_floats()["loss"]))
        if i % 20 == 0 or i == steps:  # progress on stderr; the result is the one JSON line on stdout
            print(f"step {i}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}", file=sys.stderr, flush=True)
        if every and i % every == 0:
            history.append({"epoch": i // every, "loss": round(sum(losses[-every:]) / every, 4),
                            **coco_ap(model, val[0], val[2], device)})
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--base-train", type=int, default=96)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--target-train", type=int, default=48)
    parser.add_argument("--target-val", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone-lr", type=float, default=5e-4)
    # One intra-op thread by default: on shared cores, two OpenMP threads spin-wait for each other
    # (measured here under load: 5 CPU-s and 10 s per step with 2 threads, 0.35 CPU-s and 0.5 s with 1).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="where the data and the base checkpoint go (default: a temp dir)")
    parser.add_argument("--tracking-uri", help="also log both AP curves and their plot to an MLflow run there")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        a = generate_synthetic_coco(root / "a", train=args.base_train, val=1, size=args.size, seed=0)
        b = generate_synthetic_coco(root / "b", train=args.target_train, val=args.target_val, size=args.size, seed=1)
        base_data = load_split(Path(a["train"]), root / "a" / "images" / "train", args.size)
        target_train = load_split(relabel(Path(b["train"]), root / "b" / "train_3cls.json"),
                                  root / "b" / "images" / "train", args.size)
        target_val = load_split(relabel(Path(b["val"]), root / "b" / "val_3cls.json"),
                                root / "b" / "images" / "val", args.size)
        common = dict(eval_spatial_size=args.size, dsi=False)

        torch.manual_seed(0)
        base = build_student("rtdetrv4_tiny", num_classes=6, **common).to(device)
        train(base, 6, base_data, args.base_steps, args, device, seed=0)
        base_ap = coco_ap(base, base_data[0], base_data[2], device)
        checkpoint = root / "base_rtdetrv4_tiny.pth"
        state = {k: v.cpu() for k, v in base.state_dict().items()}
        torch.save({"model": state, "ema": {"module": state, "updates": args.base_steps}}, checkpoint)
        t_base = time.perf_counter() - t0

        steps = args.epochs * args.steps_per_epoch
        runs, reports = {}, None
        for name in ("finetune", "scratch"):
            torch.manual_seed(1)  # same fresh class heads / whole model init for both
            model = build_student("rtdetrv4_tiny", weights=checkpoint if name == "finetune" else None,
                                  num_classes=3, **common).to(device)
            if name == "finetune":
                reports = model.weights_report.as_dict()
            start = coco_ap(model, target_val[0], target_val[2], device)
            runs[name] = [{"epoch": 0, **start}] + train(model, 3, target_train, steps, args, device, seed=1,
                                                         val=target_val, every=args.steps_per_epoch)
    last = {k: v[-1]["AP"] for k, v in runs.items()}
    result = {
        "benchmark": "finetune_vs_scratch", "device": str(device), "threads": args.threads, "size": args.size,
        "base": {"classes": 6, "train_images": args.base_train, "steps": args.base_steps, "train_AP": base_ap,
                 "seconds": round(t_base, 1)},
        "target": {"classes": list(TARGET_CLASSES), "train_images": args.target_train,
                   "val_images": args.target_val, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
                   "batch": args.batch, "lr": args.lr, "backbone_lr": args.backbone_lr},
        "reinitialised": reports["reinitialised"], "loaded_tensors": reports["loaded"],
        "finetune": runs["finetune"], "scratch": runs["scratch"],
        "ap_finetune_last": last["finetune"], "ap_scratch_last": last["scratch"],
        "ap_ratio_last": round(last["finetune"] / last["scratch"], 2) if last["scratch"] > 0 else None,
        "seconds": round(time.perf_counter() - t0, 1)}
    if args.tracking_uri:
        result["mlflow_run_id"] = log_to_mlflow(args.tracking_uri, result)
    print(json.dumps(result))


def log_to_mlflow(tracking_uri: str, result: dict) -> str:
    """Both AP curves as metrics (finetune/AP, scratch/AP per epoch) and as plots/finetune_vs_scratch.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("finetune-vs-scratch")
    with mlflow.start_run(run_name="finetune_vs_scratch") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_params({"base_steps": result["base"]["steps"], **{k: v for k, v in result["target"].items()
                                                                      if k != "classes"}})
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("finetune", "scratch"):
            for row in result[name]:
                mlflow.log_metrics({f"{name}/AP": row["AP"], f"{name}/AP50": row["AP50"]}, step=row["epoch"])
            ax.plot([r["epoch"] for r in result[name]], [r["AP"] for r in result[name]], "o-",
                    label=f"{name} (AP {result[name][-1]['AP']:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val AP")
        ax.set_title("3 new classes: from the 6-class checkpoint vs from scratch")
        ax.legend()
        fig.tight_layout()
        path = Path(tmp) / "finetune_vs_scratch.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        mlflow.log_artifact(str(path), artifact_path="plots")
        return run.info.run_id


if __name__ == "__main__":
    main()
