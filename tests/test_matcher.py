"""Hungarian matcher against brute force over all assignments, and the union-set matching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distillery.students import HungarianMatcher
from distillery.students.criterion import union_matching
from distillery.students.matcher import iou_order_cost, matching_cost


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centres, sizes], 1)


def _giou_xyxy(a: list[float], b: list[float]) -> float:
    """GIoU of two xyxy boxes, by hand."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _cxcywh_to_xyxy(b: list[float]) -> list[float]:
    return [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]


def test_cost_matrix_matches_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g)
    boxes = _random_boxes(4, g)
    labels = torch.tensor([2, 0])
    targets = _random_boxes(2, g)
    cost = matching_cost(logits, boxes, labels, targets)
    for q, j in itertools.product(range(4), range(2)):
        p = torch.sigmoid(logits[q, labels[j]]).item()
        focal = 0.25 * (1 - p) ** 2 * -torch.log(torch.tensor(p + 1e-8)).item() \
            - 0.75 * p ** 2 * -torch.log(torch.tensor(1 - p + 1e-8)).item()
        l1 = (boxes[q] - targets[j]).abs().sum().item()
        giou = _giou_xyxy(_cxcywh_to_xyxy(boxes[q].tolist()), _cxcywh_to_xyxy(targets[j].tolist()))
        assert cost[q, j].item() == pytest.approx(2 * focal + 5 * l1 - 2 * giou, abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_queries, num_classes = 6, 3
    sizes = [int(torch.randint(0, 5, (1,), generator=g)) for _ in range(3)]
    sizes[seed % 3] = max(sizes[seed % 3], 1)
    outputs = {"pred_logits": torch.randn(3, num_queries, num_classes, generator=g),
               "pred_boxes": torch.stack([_random_boxes(num_queries, g) for _ in range(3)])}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": _random_boxes(n, g)}
               for n in sizes]
    matcher = HungarianMatcher()
    indices = matcher(outputs, targets)
    assert len(indices) == 3
    for b, ((rows, cols), t) in enumerate(zip(indices, targets)):
        n = len(t["labels"])
        assert len(rows) == len(cols) == min(num_queries, n)
        assert len(set(rows.tolist())) == len(rows) and sorted(cols.tolist()) == list(range(n))
        if n == 0:
            continue
        cost = matching_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"])
        best = min(sum(cost[q, j].item() for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(num_queries), n))
        found = cost[rows, cols].sum().item()
        assert found == pytest.approx(best, abs=1e-5)


def test_more_objects_than_queries():
    g = torch.Generator().manual_seed(7)
    outputs = {"pred_logits": torch.randn(1, 3, 2, generator=g), "pred_boxes": _random_boxes(3, g)[None]}
    targets = [{"labels": torch.tensor([0, 1, 1, 0, 1]), "boxes": _random_boxes(5, g)}]
    (rows, cols), = HungarianMatcher()(outputs, targets)
    cost = matching_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                         targets[0]["boxes"])
    best = min(sum(cost[q, j].item() for q, j in enumerate(objs)) for objs in itertools.permutations(range(5), 3))
    assert sorted(rows.tolist()) == [0, 1, 2]
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_no_objects_anywhere():
    outputs = {"pred_logits": torch.randn(2, 5, 3), "pred_boxes": torch.rand(2, 5, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    for rows, cols in HungarianMatcher()(outputs, [empty, empty]):
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64


def test_matcher_checks():
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="2 images"):
        HungarianMatcher()({"pred_logits": torch.randn(2, 5, 3), "pred_boxes": torch.rand(2, 5, 4)},
                           [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}])


def test_union_matching():
    t = torch.tensor
    final = [(t([0, 3]), t([1, 0])), (t([], dtype=torch.long), t([], dtype=torch.long))]
    aux = [(t([0, 4]), t([1, 0])), (t([], dtype=torch.long), t([], dtype=torch.long))]
    enc = [(t([3, 4]), t([1, 0])), (t([2]), t([0]))]
    union = union_matching([final, aux, enc])
    # Image 0: query 0 -> 1 (twice); query 3 -> 0 once and -> 1 once: tie, smaller object wins;
    # query 4 -> 0 (twice). Image 1: only the encoder's pair.
    assert union[0][0].tolist() == [0, 3, 4] and union[0][1].tolist() == [1, 0, 0]
    assert union[1][0].tolist() == [2] and union[1][1].tolist() == [0]
    aux2 = [(t([3, 5]), t([1, 0])), (t([], dtype=torch.long), t([], dtype=torch.long))]
    union = union_matching([final, aux2, enc])  # now query 3 -> 1 twice
    assert union[0][0].tolist() == [0, 3, 4, 5] and union[0][1].tolist() == [1, 1, 0, 0]


def test_negative_predicted_size_costs_as_a_zero_size_box():
    """As the official matcher (box_cxcywh_to_xyxy clamps w/h to >= 0 before GIoU)."""
    logits = torch.zeros(2, 1)
    boxes = torch.tensor([[0.5, 0.5, -0.2, -0.1], [0.5, 0.5, 0.0, 0.0]])
    targets = torch.tensor([[0.4, 0.5, 0.2, 0.2]])
    cost = matching_cost(logits, boxes, torch.tensor([0]), targets)
    l1_difference = 5 * (0.2 + 0.1)
    assert cost[0, 0].item() == pytest.approx(cost[1, 0].item() + l1_difference, abs=1e-6)


# --------------------------------------------------------------------------- DEIMv2's matcher change
def _iou_xyxy(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_iou_order_cost_matches_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=g)
    boxes = _random_boxes(5, g)
    labels = torch.tensor([3, 0, 3])
    targets = _random_boxes(3, g)
    for alpha in (1.0, 4.0):
        cost = iou_order_cost(logits, boxes, labels, targets, alpha)
        for q, j in itertools.product(range(5), range(3)):
            p = torch.sigmoid(logits[q, labels[j]]).item()
            iou = _iou_xyxy(_cxcywh_to_xyxy(boxes[q].tolist()), _cxcywh_to_xyxy(targets[j].tolist()))
            assert cost[q, j].item() == pytest.approx(-(p * iou ** alpha), abs=1e-6)


def test_matcher_change_switches_the_assignment_at_its_epoch():
    """Query 0 sits exactly on the object with p = 0.5; query 1 is shifted by 0.04 (IoU 2/3) with
    p = sigmoid(3). The focal + L1 + GIoU cost prefers query 1 (-5.27 vs -2.17, by hand); the
    IoU-order cost -(p IoU^4) prefers query 0 (-0.5 vs -0.189), and ignores the class/L1/GIoU weights."""
    outputs = {"pred_logits": torch.tensor([[[0.0], [3.0]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.54, 0.5, 0.2, 0.2]]])}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    p1 = torch.sigmoid(torch.tensor(3.0)).item()
    focal = [2 * (0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2)) - 2.0,
             2 * (0.25 * (1 - p1) ** 2 * -math.log(p1 + 1e-8) - 0.75 * p1 ** 2 * -math.log(1 - p1 + 1e-8))
             + 5 * 0.04 - 2 * (2 / 3)]
    cost = matching_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                         targets[0]["boxes"])
    assert cost[:, 0].tolist() == pytest.approx(focal, abs=1e-5)
    changed = iou_order_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                             targets[0]["boxes"], 4.0)
    assert changed[:, 0].tolist() == pytest.approx([-0.5, -p1 * (2 / 3) ** 4], abs=1e-5)

    matcher = HungarianMatcher(change_epoch=50, iou_order_alpha=4.0)
    for epoch, query in ((0, 1), (49, 1), (50, 0), (67, 0)):
        matcher.set_epoch(epoch)
        (rows, cols), = matcher(outputs, targets)
        assert rows.tolist() == [query] and cols.tolist() == [0], epoch
    class_heavy = HungarianMatcher(cost_class=100.0, cost_bbox=0.0, cost_giou=0.0, change_epoch=10)
    (rows, _), = class_heavy(outputs, targets)
    assert rows.tolist() == [1]  # the class cost alone: the confident query
    class_heavy.set_epoch(10)
    (rows, _), = class_heavy(outputs, targets)
    assert rows.tolist() == [0]  # the changed cost replaces the weighted sum; the weights do not enter
    assert HungarianMatcher().changed is False and HungarianMatcher(change_epoch=0).changed is True
    with pytest.raises(ValueError, match="change_epoch"):
        HungarianMatcher(change_epoch=-1)
