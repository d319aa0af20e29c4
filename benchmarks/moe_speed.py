"""Dynamic-DINO MoE vs dense decoder: latency, throughput, parameters (and optionally AP), one JSON line.

The open-vocabulary detector (RT-DETRv4 ``--name`` parts, region-text head over the 80 COCO
names) is built once; its decoder is timed as it is (dense) and after MoE-tuning with N=16 copies
at granularity k=2 (the paper's best) and at ``--other`` (default N=8, k=4), all with the same
weights at step 0 (so every variant computes the same detections). Top-k equals the granularity, so
every variant runs the dense FFN's FLOPs per token: the *active* parameters are equal up to the
router (a ``d``-row per copy and per expert) and ``k - 1`` extra copies of the second bias.

* ``decoder``: the D-FINE decoder alone on fixed encoder features (query selection, all layers,
  heads), eval mode: median latency at batch 1 and throughput (images/s) at ``--batch`` (32),
  measured interleaved: every round times each variant once, in a rotating order, so a slower
  period of the machine hits all variants alike. ``ratio`` = MoE median / dense median.
* ``detector_latency_ms``: the whole detector at batch 1 (backbone and encoder included), same
  interleaving.
* ``params``: total and active, whole detector and decoder FFNs.
* ``--quality``: on the synthetic dataset, a dense base is trained for ``--base-steps``, then
  fine-tuned for ``--tune-steps`` twice from the same weights with the same batches: dense, and
  MoE (N=16, k=2, load-balancing loss 0.01); COCO AP of both with pycocotools.

Paper reference (Dynamic-DINO on A100): 98 FPS MoE vs 109 FPS dense; goal here: MoE <= 1.15x the
dense batch-1 latency at equal active parameters.

    python benchmarks/moe_speed.py [--name rtdetrv4_s] [--input-size 640] [--batch 32] [--iters 20]
        [--other 8 4] [--device auto|cpu|cuda] [--quality --base-steps 300 --tune-steps 150]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from distillery.evaluation.loop import evaluate_detector  # noqa: E402
from distillery.platform.datasets.coco import load_coco, load_image_resized  # noqa: E402
from distillery.platform.datasets.synthetic import generate_synthetic_coco  # noqa: E402
from distillery.students.criterion import build_criterion  # noqa: E402
from distillery.students.moe import MoEFFN, collect_aux_loss  # noqa: E402
from distillery.students.open_vocab import build_open_vocab, moe_tune_decoder  # noqa: E402
from distillery.students.optim import build_optimizer  # noqa: E402
from distillery.students.text import HashingPhraseEncoder  # noqa: E402
from distillery.students.vocabulary import COCO_CATEGORY_NAMES  # noqa: E402
from benchmarks.timing import timed  # noqa: E402



def _interleaved(fns: dict[str, callable], iters: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds per call of each function, rounds in a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            times[n].append(timed(fns[n], device) * 1e3)
    return times


def _ffn_params(model) -> dict[str, int]:
    """Total and active parameters of the decoder FFNs (MoE layers: router included)."""
    total = active = 0
    for layer in model.decoder.layers:
        ffn = layer.linear1
        if isinstance(ffn, MoEFFN):
            n = sum(p.numel() for p in ffn.parameters())
            total += n
            active += n - (ffn.num_experts - ffn.top_k) * ffn.expert_parameter_count()
        else:
            n = sum(p.numel() for p in (*layer.linear1.parameters(), *layer.linear2.parameters()))
            total += n
            active += n
    return {"total": total, "active": active}


def speed(args, device: torch.device, dtype) -> dict:
    phrases = [COCO_CATEGORY_NAMES[i] for i in sorted(COCO_CATEGORY_NAMES)]
    torch.manual_seed(0)
    dense = build_open_vocab(args.name, phrases, encoder=HashingPhraseEncoder(dim=args.text_dim),
                             eval_spatial_size=args.input_size).to(device).eval()
    variants = {"dense": dense}
    for copies, k in (tuple(args.main), tuple(args.other)):
        m = copy.deepcopy(dense)
        moe_tune_decoder(m, copies, k)
        variants[f"moe_n{copies}_k{k}"] = m.eval()

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    out: dict = {"params": {}, "decoder": {}, "detector_latency_ms": {}}
    for name, model in variants.items():
        counts = model.parameter_counts()
        out["params"][name] = {"total": counts["total"], "active": counts["active"], "decoder_ffn": _ffn_params(model)}

    g = torch.Generator().manual_seed(1)
    with torch.inference_mode(), autocast:
        # Encoder features once per batch size (the decoder variants read the same ones).
        features = {}
        for b in (1, args.batch):
            images = torch.rand(b, 3, args.input_size, args.input_size, generator=g).to(device)
            feats = dense.backbone(images)
            features[b] = dense.encoder(feats)[0]

        def decoder_call(model, b):
            def call():
                model.bank.text = model.text_embeddings
                try:
                    model.decoder(features[b])
                finally:
                    model.bank.text = None
            return call

        # Step 0: every variant gives the dense detections (the timing compares equal work).
        check = {}
        for name, model in variants.items():
            model.bank.text = model.text_embeddings
            check[name] = model.decoder(features[1])["pred_boxes"].float()
            model.bank.text = None
        out["step0_max_abs_diff_boxes"] = {n: float((c - check["dense"]).abs().max()) for n, c in check.items()}

        for b, key in ((1, "latency_ms_b1"), (args.batch, f"ms_b{args.batch}")):
            times = _interleaved({n: decoder_call(m, b) for n, m in variants.items()}, args.iters, args.warmup,
                                 device)
            for n, t in times.items():
                row = out["decoder"].setdefault(n, {})
                row[key] = round(statistics.median(t), 3)
                if b != 1:
                    row[f"images_per_s_b{b}"] = round(b * 1000.0 / statistics.median(t), 2)
        for n, row in out["decoder"].items():
            row["latency_ratio_b1"] = round(row["latency_ms_b1"] / out["decoder"]["dense"]["latency_ms_b1"], 3)
            row[f"throughput_ratio_b{args.batch}"] = round(
                row[f"images_per_s_b{args.batch}"] / out["decoder"]["dense"][f"images_per_s_b{args.batch}"], 3)

        image = torch.rand(1, 3, args.input_size, args.input_size, generator=g).to(device)
        times = _interleaved({n: (lambda m=m: m(image)) for n, m in variants.items()}, args.iters, args.warmup,
                             device)
        dense_ms = statistics.median(times["dense"])
        for n, t in times.items():
            out["detector_latency_ms"][n] = {"median": round(statistics.median(t), 3),
                                             "ratio": round(statistics.median(t) / dense_ms, 3)}
    return out


# ---------------------------------------------------------------------------------------------- quality
def _load_split(root: Path, split: str, size: int):
    ds = load_coco(str(root / "annotations" / f"instances_{split}.json"), str(root / "images" / split),
                   check_images="none")
    images, targets = [], []
    for r in ds.records:
        images.append(torch.from_numpy(load_image_resized(r.uri, size)))
        keep = ~r.iscrowd
        xywh = torch.from_numpy(r.boxes[keep]).float()
        scale = torch.tensor([r.width, r.height, r.width, r.height], dtype=torch.float32)
        cxcywh = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], dim=1) / scale
        targets.append({"labels": torch.from_numpy(r.labels[keep]).long(), "boxes": cxcywh})
    return ds, torch.stack(images), targets


def _batches(images, targets, batch: int, steps: int, seed: int):
    """The same sequence of (flipped at random) batches for every arm."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        flip = torch.rand(batch, generator=g) < 0.5
        x = images[idx].float() / 255.0
        ts = []
        for j, i in enumerate(idx.tolist()):
            t = {k: v.clone() for k, v in targets[i].items()}
            if flip[j]:
                x[j] = x[j].flip(-1)
                t["boxes"][:, 0] = 1.0 - t["boxes"][:, 0]
            ts.append(t)
        yield x, ts


def _train(model, criterion, batches, lr: float, device: torch.device) -> float:
    optimizer = build_optimizer(model, lr=lr, backbone_lr=lr / 2, weight_decay=1e-4)
    model.train()
    loss = torch.zeros(())
    for x, ts in batches:
        ts = [{k: v.to(device) for k, v in t.items()} for t in ts]
        out = model(x.to(device), ts)
        loss = torch.stack(list(criterion(out, ts).values())).sum()
        aux = collect_aux_loss(model)   # the MoE load-balancing loss (weight 0.01); None when dense
        if aux is not None:
            loss = loss + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    return float(loss.detach())


def _ap(model, ds, images, device: torch.device) -> float:
    """COCO AP on the val split (``images`` aligned with ``ds.records``; the model is on ``device``)."""
    return evaluate_detector(model, ds.records, images, list(ds.categories.category_ids), ds.coco_gt_dict(),
                             batch_size=16, num_top=100)["AP"]


def quality(args, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthetic_coco(root, train=args.train_images, val=args.val_images, size=args.quality_size, seed=0)
        train_ds, train_x, train_t = _load_split(root, "train", args.quality_size)
        val_ds, val_x, _ = _load_split(root, "val", args.quality_size)
    phrases = list(train_ds.categories.names)
    torch.manual_seed(0)
    dense = build_open_vocab(args.quality_model, phrases, encoder=HashingPhraseEncoder(dim=args.text_dim),
                             eval_spatial_size=args.quality_size).to(device)
    criterion = build_criterion(num_classes=len(phrases))
    t0 = time.perf_counter()
    _train(dense, criterion, _batches(train_x, train_t, args.quality_batch, args.base_steps, seed=1), args.lr, device)
    base_ap = _ap(dense, val_ds, val_x, device)
    arms = {"dense": copy.deepcopy(dense)}
    arms["moe_n16_k2"] = copy.deepcopy(dense)
    moe_tune_decoder(arms["moe_n16_k2"], 16, 2)
    result = {"model": args.quality_model, "input_size": args.quality_size, "train_images": args.train_images,
              "val_images": args.val_images, "batch": args.quality_batch, "base_steps": args.base_steps,
              "tune_steps": args.tune_steps, "base_AP": round(base_ap, 4)}
    for name, model in arms.items():
        torch.manual_seed(2)
        final = _train(model, criterion, _batches(train_x, train_t, args.quality_batch, args.tune_steps, seed=2),
                       args.tune_lr, device)
        result[f"{name}_AP"] = round(_ap(model, val_ds, val_x, device), 4)
        result[f"{name}_final_loss"] = round(final, 4)
    result["AP_gain_moe_minus_dense"] = round(result["moe_n16_k2_AP"] - result["dense_AP"], 4)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="rtdetrv4_s", help="RT-DETRv4 student whose parts are used")
    parser.add_argument("--input-size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--main", type=int, nargs=2, default=[16, 2], metavar=("N", "K"))
    parser.add_argument("--other", type=int, nargs=2, default=[8, 4], metavar=("N", "K"))
    parser.add_argument("--text-dim", type=int, default=384, help="phrase-embedding width (MiniLM's is 384)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--quality", action="store_true", help="also compare dense vs MoE AP after fine-tuning")
    parser.add_argument("--quality-model", default="rtdetrv4_tiny")
    parser.add_argument("--quality-size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--quality-batch", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--tune-steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tune-lr", type=float, default=2e-4)
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else None
    out = {"benchmark": "moe_speed", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
           "autocast": str(dtype).replace("torch.", "") if dtype else "none", "torch": torch.__version__,
           "name": args.name, "input_size": args.input_size, "batch": args.batch, "iters": args.iters}
    if not args.no_speed:
        out.update(speed(args, device, dtype))
    if args.quality:
        out["quality"] = quality(args, device)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
