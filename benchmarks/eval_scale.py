"""Evaluation and annotation loading at COCO scale.

Prints one JSON line with two side-by-side measurements, taken in one run:

1. ``evaluation``: COCO val size (``--images`` 5,000 images, ``--dets`` 100 detections each, with
   ground truth generated around them): the evaluation path as the training job runs it
   (detections gathered from per-image model outputs, COCO result records built, AP computed)
   with pycocotools' ``COCOeval`` and with ``faster-coco-eval``
   (:func:`distillery.evaluation.coco_eval.coco_evaluate`, backend chosen by ``backend=``);
   seconds each, ``speedup`` = pycocotools / faster, and the largest |AP difference| over the 12
   numbers (goal: equal to 1e-6).
2. ``load``: a COCO-train-sized annotation file (``--train-images`` 118,287 images,
   ``--train-boxes`` 860,001 boxes; written under a temporary directory) read by
   ``distillery.platform.datasets.coco.load_coco`` (every validation on, ``check_images="none"``) vs
   pycocotools' own ``COCO(file)``; ``ratio`` = ours / pycocotools (goal <= 1.5).

    python benchmarks/eval_scale.py [--images 5000] [--dets 100] [--train-images 118287]
        [--train-boxes 860001] [--skip-load] [--skip-eval]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

COCO_CATEGORY_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
                     28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
                     54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
                     81, 82, 84, 85, 86, 87, 88, 89, 90]


def synthetic_coco(images: int, boxes: int, seed: int) -> dict:
    """A COCO instances dict: 640x480 images, ``boxes`` boxes spread over them, COCO's 80 ids."""
    rng = np.random.default_rng(seed)
    per_image = np.bincount(rng.integers(0, images, boxes), minlength=images)
    image_ids = np.repeat(np.arange(1, images + 1), per_image)
    wh = rng.uniform(4, 200, (boxes, 2)).round(2)
    xy = (rng.uniform(0, 1, (boxes, 2)) * (np.array([640.0, 480.0]) - wh)).round(2)
    cats = rng.choice(COCO_CATEGORY_IDS, boxes)
    crowd = rng.random(boxes) < 0.01
    anns = [{"id": i + 1, "image_id": int(image_ids[i]), "category_id": int(cats[i]),
             "bbox": [float(xy[i, 0]), float(xy[i, 1]), float(wh[i, 0]), float(wh[i, 1])],
             "area": float(wh[i, 0] * wh[i, 1]), "iscrowd": int(crowd[i])} for i in range(boxes)]
    return {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480}
                       for i in range(1, images + 1)],
            "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]}


def model_outputs(gt: dict, dets: int, seed: int) -> list[dict]:
    """Per-image post-processed outputs (what the evaluation loop gathers from a detector):
    ``dets`` boxes per image, the ground-truth boxes jittered plus random false positives."""
    rng = np.random.default_rng(seed)
    by_image: dict[int, list] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        by_image[a["image_id"]].append((a["bbox"], a["category_id"]))
    outputs = []
    for image_id, objs in by_image.items():
        n_true = min(len(objs), dets)
        boxes = rng.uniform(0, 1, (dets, 4)) * np.array([600.0, 440.0, 120.0, 120.0]) + np.array([0, 0, 4.0, 4.0])
        cats = rng.choice(COCO_CATEGORY_IDS, dets)
        for k, (bbox, cat) in enumerate(objs[:n_true]):
            boxes[k] = np.asarray(bbox) + rng.normal(0, 2.0, 4) * np.array([1, 1, 0.5, 0.5])
            boxes[k, 2:] = np.maximum(boxes[k, 2:], 1.0)
            cats[k] = cat if rng.random() < 0.9 else rng.choice(COCO_CATEGORY_IDS)
        outputs.append({"image_id": image_id, "boxes": boxes.astype(np.float32),
                        "scores": rng.random(dets).astype(np.float32), "category_ids": cats})
    return outputs


def gather(outputs: list[dict]) -> list[dict]:
    """Per-image outputs -> COCO result records (the job's detection gathering)."""
    records = []
    for out in outputs:
        image_id = int(out["image_id"])
        for box, score, cat in zip(out["boxes"].tolist(), out["scores"].tolist(), out["category_ids"].tolist()):
            records.append({"image_id": image_id, "category_id": int(cat), "bbox": box, "score": score})
    return records


def evaluation(args) -> dict:
    from distillery.evaluation.coco_eval import coco_evaluate, load_coco_ground_truth

    gt = synthetic_coco(args.images, args.images * 7, seed=0)  # COCO val: ~7.3 boxes per image
    outputs = model_outputs(gt, args.dets, seed=1)
    result = {"images": args.images, "detections_per_image": args.dets, "gt_boxes": len(gt["annotations"])}
    metrics = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        gc.collect()
        t = time.perf_counter()
        records = gather(outputs)
        coco_gt = load_coco_ground_truth(gt, backend=backend)
        metrics[backend] = coco_evaluate(coco_gt, records, backend=backend)
        result[f"{backend}_s"] = round(time.perf_counter() - t, 2)
    result["speedup"] = round(result["pycocotools_s"] / result["faster_coco_eval_s"], 2)
    result["AP"] = {k: round(v, 6) for k, v in metrics["pycocotools"].items()}
    diffs = [abs(metrics["pycocotools"][k] - metrics["faster_coco_eval"][k]) for k in metrics["pycocotools"]
             if not (np.isnan(metrics["pycocotools"][k]) and np.isnan(metrics["faster_coco_eval"][k]))]
    result["max_abs_metric_diff"] = float(max(diffs))
    return result


def load(args) -> dict:
    from pycocotools.coco import COCO

    from distillery.platform.datasets.coco import load_coco

    work = Path(tempfile.mkdtemp(prefix="eval-scale-"))
    path = work / "instances_train.json"
    path.write_text(json.dumps(synthetic_coco(args.train_images, args.train_boxes, seed=2)))
    size_mb = os.path.getsize(path) / 2 ** 20
    times: dict[str, list[float]] = {"load_coco": [], "pycocotools": []}
    for _ in range(args.rounds):  # interleaved: the machine drifts
        gc.collect()
        t = time.perf_counter()
        ds = load_coco(str(path), str(work / "images"), check_images="none")
        times["load_coco"].append(time.perf_counter() - t)
        n_records = len(ds)
        del ds
        gc.collect()
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
        times["pycocotools"].append(time.perf_counter() - t)
        del coco
    path.unlink()
    ours, ref = min(times["load_coco"]), min(times["pycocotools"])
    return {"images": args.train_images, "boxes": args.train_boxes, "file_mb": round(size_mb, 1),
            "records": n_records, "rounds": args.rounds, "load_coco_s": round(ours, 2),
            "pycocotools_s": round(ref, 2), "ratio": round(ours / ref, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--train-images", type=int, default=118287)
    parser.add_argument("--train-boxes", type=int, default=860001)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved load rounds (best of)")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()

    import logging

    logging.disable(logging.INFO)
    out = {"benchmark": "eval_scale", "cpus": os.cpu_count()}
    if not args.skip_eval:
        out["evaluation"] = evaluation(args)
    if not args.skip_load:
        out["load"] = load(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
