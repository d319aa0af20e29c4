"""COCO evaluation (faster-coco-eval, the default, and pycocotools, the reference) on hand-made ground truth."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from pycocotools.coco import COCO

from distillery.evaluation.coco_eval import (
    coco_evaluate,
    coco_evaluate_with_summary,
    load_coco_ground_truth,
)
from distillery.students.postprocess import postprocess, to_coco_detections

CATEGORY_IDS = (3, 7, 11)  # non-contiguous, as in COCO


def ground_truth() -> dict:
    # Three 200 x 200 images; boxes of different sizes so that small/medium/large all occur.
    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in (1, 2, 5)]
    boxes = [
        (1, 3, [10, 10, 100, 120]),  # large (12000 px)
        (1, 7, [120, 20, 40, 50]),   # medium (2000)
        (2, 11, [50, 60, 20, 20]),   # small (400)
        (2, 3, [100, 100, 90, 80]),  # medium (7200)
        (5, 7, [0, 0, 150, 150]),    # large
    ]
    annotations = [
        {"id": k + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for k, (img, cat, box) in enumerate(boxes)
    ]
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def gt_coco() -> COCO:
    coco = COCO()
    coco.dataset = ground_truth()
    coco.createIndex()
    return coco


def perfect_detections() -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(map(float, a["bbox"])), "score": 0.9}
        for a in ground_truth()["annotations"]
    ]


def test_perfect_detections_give_ap_one(capsys):
    gt = gt_coco()
    capsys.readouterr()  # building the test's own COCO object prints; ours must not
    metrics, summary = coco_evaluate_with_summary(gt, perfect_detections())
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert metrics[key] == pytest.approx(1.0), key
    assert "Average Precision" in summary
    assert capsys.readouterr().out == ""  # pycocotools' prints were captured


def test_shifted_boxes_score_lower():
    detections = perfect_detections()
    for det in detections:
        x, y, w, h = det["bbox"]
        det["bbox"] = [x + 0.15 * w, y + 0.15 * h, w, h]  # IoU ~0.52 with the ground truth
    metrics = coco_evaluate(gt_coco(), detections)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(0.0)
    assert 0.0 < metrics["AP"] < 0.5


def test_wrong_class_and_missed_objects_lower_ap():
    detections = perfect_detections()
    detections[0]["category_id"] = 11  # a valid id, but the wrong class
    metrics = coco_evaluate(gt_coco(), detections)
    assert metrics["AP"] < 1.0


def test_empty_detections_give_zero_without_crash():
    metrics = coco_evaluate(gt_coco(), [])
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[key] == 0.0, key


def test_area_range_without_ground_truth_is_nan():
    # Only image 5 (one large box): no small or medium ground truth there.
    metrics = coco_evaluate(gt_coco(), perfect_detections(), image_ids=[5])
    assert metrics["AP"] == pytest.approx(1.0)
    assert math.isnan(metrics["APs"]) and math.isnan(metrics["APm"])


def test_image_ids_restrict_the_evaluation():
    detections = [d for d in perfect_detections() if d["image_id"] != 2]  # image 2 missed entirely
    assert coco_evaluate(gt_coco(), detections)["AP"] < 1.0
    assert coco_evaluate(gt_coco(), detections, image_ids=[1, 5])["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"image_ids not in the ground truth: \[99\]"):
        coco_evaluate(gt_coco(), detections, image_ids=[1, 99])


def test_detections_are_not_modified():
    detections = perfect_detections()
    before = copy.deepcopy(detections)
    coco_evaluate(gt_coco(), detections)
    assert detections == before


def test_unknown_ids_and_bad_records_are_refused():
    detections = perfect_detections()
    detections[0]["category_id"] = 0  # a contiguous label that was never mapped
    with pytest.raises(ValueError, match=r"category ids \[0\].*\[3, 7, 11\]"):
        coco_evaluate(gt_coco(), detections)
    detections = perfect_detections()
    detections[0]["image_id"] = 42
    with pytest.raises(ValueError, match=r"images not in the ground truth: \[42\]"):
        coco_evaluate(gt_coco(), detections)
    with pytest.raises(ValueError, match="detection 0"):
        coco_evaluate(gt_coco(), [{"image_id": 1, "category_id": 3, "score": 0.5}])


def test_ground_truth_from_path_and_broken_files(tmp_path, caplog):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ground_truth()))
    with caplog.at_level(logging.INFO, logger="distillery.evaluation.coco_eval"):
        assert coco_evaluate(str(path), perfect_detections())["AP"] == pytest.approx(1.0)
    assert "Average Precision" in caplog.text
    assert len(load_coco_ground_truth(path).getImgIds()) == 3
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco_evaluate(tmp_path / "missing.json", [])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        coco_evaluate(broken, [])
    no_cats = tmp_path / "nocats.json"
    no_cats.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="categories"):
        coco_evaluate(no_cats, [])


def test_end_to_end_from_model_outputs_with_noncontiguous_ids():
    """Logits/boxes -> postprocess -> COCO records with ids 3/7/11 -> AP 1.0."""
    gt = ground_truth()
    label_to_category = list(CATEGORY_IDS)  # label 0 -> 3, 1 -> 7, 2 -> 11
    image_ids = [1, 2, 5]
    num_queries = 4
    logits = torch.full((3, num_queries, 3), -8.0)
    boxes = torch.full((3, num_queries, 4), 0.05)
    for b, image_id in enumerate(image_ids):
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        for q, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            boxes[b, q] = torch.tensor([(x + w / 2) / 200, (y + h / 2) / 200, w / 200, h / 200])
            logits[b, q, label_to_category.index(ann["category_id"])] = 4.0
    results = postprocess(logits, boxes, torch.tensor([[200, 200]] * 3), num_top=10)
    records = to_coco_detections(results, image_ids, label_to_category)
    metrics = coco_evaluate(gt_coco(), records)
    assert metrics["AP"] == pytest.approx(1.0)
    # The same outputs with the identity mapping (labels used as ids) are refused, not scored 0.
    with pytest.raises(ValueError, match="category ids"):
        coco_evaluate(gt_coco(), to_coco_detections(results, image_ids, [0, 1, 2]))


def test_faster_coco_eval_agrees_with_pycocotools():
    """The default backend against the reference on the same detections: every one of the 12
    numbers equal to 1e-6, on a generated set with crowd boxes, misses, duplicates, wrong classes
    and >100 detections on some images (maxDets cut-offs)."""
    import numpy as np

    from benchmarks.eval_scale import gather, model_outputs, synthetic_coco

    gt = synthetic_coco(images=60, boxes=420, seed=5)
    detections = gather(model_outputs(gt, dets=110, seed=6))
    reference = coco_evaluate(gt, detections, backend="pycocotools")
    faster = coco_evaluate(gt, detections, backend="faster_coco_eval")
    assert 0.05 < reference["AP"] < 0.95
    for name, value in reference.items():
        if math.isnan(value):
            assert math.isnan(faster[name]), name
        else:
            assert abs(faster[name] - value) <= 1e-6, (name, faster[name], value)
    # A subset of images and a COCO object of the other backend give the same numbers too.
    ids = sorted(np.unique([d["image_id"] for d in detections])[:20].tolist())
    sub_ref = coco_evaluate(load_coco_ground_truth(gt, backend="pycocotools"), detections, ids, backend="pycocotools")
    sub_fast = coco_evaluate(load_coco_ground_truth(gt, backend="pycocotools"), detections, ids)
    assert all(abs(sub_ref[k] - sub_fast[k]) <= 1e-6 for k in sub_ref if not math.isnan(sub_ref[k]))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        coco_evaluate(ground_truth(), perfect_detections(), backend="nope")
