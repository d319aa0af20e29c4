"""Post-processing: top-k over (query, class), box conversion, COCO records, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillery.students.postprocess import (
    DetectionPostProcessor,
    postprocess,
    postprocess_batched,
    to_coco_detections,
)


def make_outputs():
    # 2 images, 3 queries, 4 classes.
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 1, 2] = 3.0  # best of image 0: query 1, class 2
    logits[0, 0, 3] = 1.0  # second: query 0, class 3
    logits[0, 1, 0] = 0.5  # third: query 1 again, another class
    logits[1, 2, 1] = 2.0
    boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0], [0.1, 0.1, 0.1, 0.1]],
            [[0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2], [0.75, 0.25, 0.5, 0.5]],
        ]
    )
    sizes = torch.tensor([[200, 100], [640, 480]])  # (w, h)
    return logits, boxes, sizes


def test_topk_over_queries_and_classes_with_absolute_xyxy():
    logits, boxes, sizes = make_outputs()
    results = postprocess(logits, boxes, sizes, num_top=3)
    assert len(results) == 2
    r0 = results[0]
    assert r0["labels"].tolist() == [2, 3, 0]
    assert r0["labels"].dtype == torch.int64
    assert r0["scores"] == pytest.approx(torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])))
    # query 1: cx .25 cy .5 w .5 h 1 on a 200 x 100 image -> x 0..100, y 0..100
    assert r0["boxes"][0].tolist() == pytest.approx([0.0, 0.0, 100.0, 100.0])
    # query 0: cx .5 cy .5 w .2 h .4 -> x 80..120, y 30..70
    assert r0["boxes"][1].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])
    assert r0["boxes"][2].tolist() == pytest.approx([0.0, 0.0, 100.0, 100.0])  # same query, class 0
    r1 = results[1]
    assert r1["labels"][0].item() == 1
    assert r1["boxes"][0].tolist() == pytest.approx([320.0, 0.0, 640.0, 240.0])


def test_batched_shapes_default_and_small_k():
    logits, boxes, sizes = make_outputs()
    scores, labels, xyxy = postprocess_batched(logits, boxes, sizes)  # default 300 > Q*C = 12
    assert scores.shape == (2, 12) and labels.shape == (2, 12) and xyxy.shape == (2, 12, 4)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    big = torch.randn(3, 50, 7)
    s, l, b = postprocess_batched(big, torch.rand(3, 50, 4), torch.tensor([[10, 20]] * 3), num_top=30)
    assert s.shape == (3, 30) and l.max() < 7 and b.shape == (3, 30, 4)


def test_bad_shapes_raise():
    logits, boxes, sizes = make_outputs()
    with pytest.raises(ValueError, match="orig_sizes"):
        postprocess_batched(logits, boxes, sizes[:, :1])
    with pytest.raises(ValueError, match="boxes"):
        postprocess_batched(logits, boxes[..., :3], sizes)


def test_to_coco_detections_maps_noncontiguous_category_ids():
    logits, boxes, sizes = make_outputs()
    results = postprocess(logits, boxes, sizes, num_top=2)
    records = to_coco_detections(results, [42, 7], {0: 3, 1: 7, 2: 11, 3: 90})
    assert len(records) == 4
    first = records[0]
    assert first["image_id"] == 42 and first["category_id"] == 11
    assert first["bbox"] == pytest.approx([0.0, 0.0, 100.0, 100.0])  # xywh
    assert first["score"] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    assert records[1]["category_id"] == 90
    assert records[1]["bbox"] == pytest.approx([80.0, 30.0, 40.0, 40.0])
    assert {r["image_id"] for r in records[2:]} == {7}
    # A list works as a mapping too; a missing label is an error that names it.
    assert to_coco_detections(results, [42, 7], [3, 7, 11, 90]) == records
    with pytest.raises(KeyError, match="label 3"):
        to_coco_detections(results, [42, 7], [3, 7, 11])
    with pytest.raises(ValueError, match="image ids"):
        to_coco_detections(results, [42], [3, 7, 11, 90])


def test_onnx_export_matches_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    module = DetectionPostProcessor(num_top=5).eval()
    logits, boxes = torch.randn(2, 10, 3), torch.rand(2, 10, 4)
    sizes = torch.tensor([[640, 480], [320, 320]])
    path = tmp_path / "post.onnx"
    torch.onnx.export(
        module, (logits, boxes, sizes), str(path),
        input_names=["logits", "boxes", "orig_sizes"], output_names=["scores", "labels", "boxes_xyxy"],
        dynamic_axes={"logits": {0: "batch"}, "boxes": {0: "batch"}, "orig_sizes": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # A different batch size than the traced one: no batch loop was baked in.
    logits3, boxes3 = torch.randn(3, 10, 3), torch.rand(3, 10, 4)
    sizes3 = torch.tensor([[640, 480], [320, 320], [100, 50]])
    got = session.run(None, {"logits": logits3.numpy(), "boxes": boxes3.numpy(), "orig_sizes": sizes3.numpy()})
    want = module(logits3, boxes3, sizes3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-4)
