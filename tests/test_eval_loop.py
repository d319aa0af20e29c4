"""The one eval loop (distillery.evaluation.loop) with an oracle model on hand-made ground truth."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distillery.evaluation.loop import evaluate_detector, predict_coco_detections, shard
from test_evaluation import CATEGORY_IDS, ground_truth

SIZE = 8


class OracleDetector(nn.Module):
    """Returns the ground truth of the image whose index (0, 1, 2) is encoded in its pixels, as
    logits and normalised cxcywh boxes, so a correct loop scores AP 1.0."""

    def __init__(self, gt: dict):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.outputs = []
        for image in gt["images"]:
            anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
            logits = torch.full((2, len(CATEGORY_IDS)), -10.0)
            boxes = torch.full((2, 4), 0.5)
            for q, a in enumerate(anns):
                x, y, w, h = a["bbox"]
                logits[q, CATEGORY_IDS.index(a["category_id"])] = 10.0
                boxes[q] = torch.tensor([x + w / 2, y + h / 2, w, h]) / torch.tensor([image["width"], image["height"]] * 2)
            self.outputs.append((logits, boxes))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        assert not self.training and images.dtype == torch.float32 and float(images.max()) <= 1.0
        index = (images[:, 0, 0, 0] * 255).round().long().tolist()
        return {"pred_logits": torch.stack([self.outputs[i][0] for i in index]) * self.scale,
                "pred_boxes": torch.stack([self.outputs[i][1] for i in index])}


def _records_and_images():
    gt = ground_truth()
    records = [SimpleNamespace(image_id=i["id"], width=i["width"], height=i["height"]) for i in gt["images"]]
    images = torch.arange(len(records), dtype=torch.uint8)[:, None, None, None].expand(-1, 3, SIZE, SIZE).clone()
    return gt, records, images


def test_oracle_scores_ap_one_with_a_tensor_or_a_loader_and_restores_the_mode():
    gt, records, images = _records_and_images()
    model = OracleDetector(gt).train()
    by_id = {r.image_id: images[k] for k, r in enumerate(records)}
    metrics = evaluate_detector(model, records, images, CATEGORY_IDS, gt, batch_size=2)
    assert metrics["AP"] == pytest.approx(1.0)
    assert model.training
    loaded = evaluate_detector(model, records, lambda chunk: torch.stack([by_id[r.image_id] for r in chunk]),
                               CATEGORY_IDS, gt, batch_size=1)
    assert loaded == metrics
    floats = evaluate_detector(model, records, images.float() / 255, CATEGORY_IDS, gt)
    assert floats == metrics


def test_shards_partition_the_records():
    gt, records, images = _records_and_images()
    model = OracleDetector(gt)
    full = predict_coco_detections(model, records, images, CATEGORY_IDS, batch_size=2)
    parts = [predict_coco_detections(model, records, images, CATEGORY_IDS, batch_size=2, shard_index=k, shard_count=2)
             for k in range(2)]
    assert {d["image_id"] for d in parts[0]} == {1, 5} and {d["image_id"] for d in parts[1]} == {2}
    key = lambda d: (d["image_id"], d["category_id"], d["score"])  # noqa: E731
    assert sorted(parts[0] + parts[1], key=key) == sorted(full, key=key)


def test_bad_arguments_fail_clearly():
    gt, records, images = _records_and_images()
    model = OracleDetector(gt)
    with pytest.raises(ValueError, match="3 images for 2 records"):
        predict_coco_detections(model, records[:2], images, CATEGORY_IDS)
    with pytest.raises(ValueError, match="batch_size"):
        predict_coco_detections(model, records, images, CATEGORY_IDS, batch_size=0)
    with pytest.raises(ValueError, match="index"):
        shard(records, 2, 2)
