"""Hungarian matching of DETR predictions to ground truth (one-to-one), focal class cost + L1 + GIoU.

Cost of assigning prediction ``q`` to object ``j`` (the reference's ``HungarianMatcher`` with
``use_focal_loss``):

    C = w_class * (pos(p) - neg(p)) + w_bbox * |b_q - b_j|_1 - w_giou * GIoU(b_q, b_j)
    pos(p) = alpha (1 - p)^gamma (-log(p + 1e-8)),  neg(p) = (1 - alpha) p^gamma (-log(1 - p + 1e-8))

with ``p = sigmoid(logit_q[class_j])``, boxes normalised ``cxcywh`` for L1 and ``xyxy`` for GIoU
(negative predicted widths/heights clamped to 0 first, as the official ``box_cxcywh_to_xyxy``).
Defaults are the reference's (class 2, bbox 5, giou 2, alpha 0.25, gamma 2). Each image is
solved with ``scipy.optimize.linear_sum_assignment``; NaN costs are replaced by 1 as there.

DEIMv2's matcher change (official ``change_matcher``, ``iou_order_alpha``, ``matcher_change_epoch``):
from epoch ``change_epoch`` on, the cost is

    C = -(p * IoU(b_q, b_j)^iou_order_alpha)

alone: the class, L1 and GIoU weights no longer enter (the official matcher replaces the whole
cost, it does not add this term). The epoch comes from :meth:`HungarianMatcher.set_epoch`
(the criterion's, called by the job at each epoch start); ``change_epoch=None`` never changes.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou

from .box_ops import cxcywh_to_xyxy

__all__ = ["HungarianMatcher", "iou_order_cost", "matching_cost"]


@torch.no_grad()
def matching_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
                  cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25,
                  gamma: float = 2.0) -> torch.Tensor:
    """(Q, n) cost matrix: ``logits`` (Q, C), ``boxes`` (Q, 4), ``labels`` (n,), ``target_boxes`` (n, 4)."""
    prob = logits.float().sigmoid()[:, labels]  # (Q, n)
    neg = (1 - alpha) * prob.pow(gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * (1 - prob).pow(gamma) * (-(prob + 1e-8).log())
    class_cost = pos - neg
    l1 = torch.cdist(boxes.float(), target_boxes.float(), p=1)
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes.float()),
                               cxcywh_to_xyxy(target_boxes.float()))
    return cost_bbox * l1 + cost_class * class_cost - cost_giou * giou


@torch.no_grad()
def iou_order_cost(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
                   iou_order_alpha: float = 4.0) -> torch.Tensor:
    """(Q, n) cost of DEIMv2's changed matcher: ``-(sigmoid(logit_q[class_j]) * IoU(b_q, b_j)^alpha)``."""
    prob = logits.float().sigmoid()[:, labels]
    iou = box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(target_boxes.float()))
    return -(prob * iou.pow(iou_order_alpha))


class HungarianMatcher(nn.Module):
    """``matcher(outputs, targets) -> [(pred_idx, target_idx), ...]`` per image, int64 on CPU.

    ``change_epoch`` (None: never) and ``iou_order_alpha``: DEIMv2's matcher change (module docstring).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0, change_epoch: int | None = None,
                 iou_order_alpha: float = 4.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        if change_epoch is not None and change_epoch < 0:
            raise ValueError(f"HungarianMatcher: change_epoch must be >= 0 or None, got {change_epoch}")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma
        self.change_epoch, self.iou_order_alpha = change_epoch, float(iou_order_alpha)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The training epoch (0-based, as the official solver counts) the next matchings belong to."""
        self.epoch = int(epoch)

    @property
    def changed(self) -> bool:
        """Whether the IoU-order cost is in use (the epoch has reached ``change_epoch``)."""
        return self.change_epoch is not None and self.epoch >= self.change_epoch

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``outputs``: ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4); ``targets``: per image
        ``labels`` (n,) and ``boxes`` (n, 4).

        Returns, per image, prediction indices (ascending) and the object index each is matched to;
        ``min(Q, n)`` pairs.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries = logits.shape[:2]
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {batch} images of predictions but {len(targets)} targets")
        sizes = [int(t["labels"].numel()) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in targets]
        # One cost matrix for the whole batch (predictions of all images x objects of all images),
        # moved to the CPU once; image b's block is its own predictions x its own objects.
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device)
        if self.changed:
            cost = iou_order_cost(logits.flatten(0, 1), boxes.flatten(0, 1), labels, target_boxes,
                                  self.iou_order_alpha)
        else:
            cost = matching_cost(logits.flatten(0, 1), boxes.flatten(0, 1), labels, target_boxes, self.cost_class,
                                 self.cost_bbox, self.cost_giou, self.alpha, self.gamma)
        cost = torch.nan_to_num(cost, nan=1.0).reshape(batch, num_queries, -1).cpu()
        indices = []
        for b, block in enumerate(cost.split(sizes, dim=-1)):
            if sizes[b] == 0:
                indices.append((empty.clone(), empty.clone()))
                continue
            rows, cols = linear_sum_assignment(block[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
