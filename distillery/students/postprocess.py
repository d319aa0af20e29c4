"""Detections from DETR outputs: top-k over (query, class) sigmoid scores, boxes in pixels.

As in the RT-DETR family's focal-loss post-processor: each of the Q x C (query, class) pairs is
a candidate with score ``sigmoid(logit)``; the ``num_top`` best pairs are kept (so one query may
yield several classes), and their normalised ``cxcywh`` boxes become absolute ``xyxy`` boxes in
the original image size ``(w, h)``. No NMS.

:func:`postprocess_batched` is the tensor path: no Python loop over the batch, no data-dependent
control flow, only ops that ONNX exports (sigmoid, flatten, topk, integer division, gather), so
it can be traced into an exported detector (see :class:`DetectionPostProcessor`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "DetectionPostProcessor",
    "postprocess",
    "postprocess_batched",
    "to_coco_detections",
]


def postprocess_batched(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    orig_sizes: torch.Tensor,
    num_top: int = 300,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k detections for a batch.

    Args:
        logits: (B, Q, C) class logits (sigmoid / focal-style, no background class).
        boxes: (B, Q, 4) boxes, normalised ``cx, cy, w, h`` in [0, 1].
        orig_sizes: (B, 2) original image sizes as ``(w, h)`` in pixels.
        num_top: detections kept per image (K = min(num_top, Q * C)).

    Returns:
        ``(scores (B, K), labels (B, K) int64 contiguous class ids, boxes (B, K, 4) absolute xyxy)``,
        each image's detections sorted by decreasing score.
    """
    tracing = torch.jit.is_tracing()  # shape checks would only add TracerWarnings to an export
    if not tracing and (logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4):
        raise ValueError(
            f"postprocess: expected logits (B, Q, C) and boxes (B, Q, 4), got {tuple(logits.shape)} "
            f"and {tuple(boxes.shape)}"
        )
    if not tracing and (orig_sizes.dim() != 2 or orig_sizes.shape[-1] != 2):
        raise ValueError(f"postprocess: orig_sizes must be (B, 2) as (w, h), got {tuple(orig_sizes.shape)}")
    num_classes = logits.shape[-1]
    # Q and C are fixed by the model (only the batch is dynamic in an export): K is a constant.
    k = int(num_top) if tracing else min(int(num_top), logits.shape[1] * num_classes)

    scores, index = torch.topk(logits.sigmoid().flatten(1), k, dim=1)
    # index = query * C + class. Integer division and a subtraction instead of `%`: the modulo
    # op is missing from some older ONNX/TensorRT runtimes.
    query = torch.div(index, num_classes, rounding_mode="floor")
    labels = index - query * num_classes

    picked = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
    cx, cy, w, h = picked.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    scale = orig_sizes.to(xyxy.dtype).repeat(1, 2).unsqueeze(1)  # (B, 1, 4): w, h, w, h
    return scores, labels, xyxy * scale


def postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    orig_sizes: torch.Tensor,
    num_top: int = 300,
) -> list[dict[str, torch.Tensor]]:
    """:func:`postprocess_batched`, split per image into ``{"scores", "labels", "boxes"}`` dicts."""
    scores, labels, xyxy = postprocess_batched(logits, boxes, orig_sizes, num_top)
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


class DetectionPostProcessor(nn.Module):
    """Module form of :func:`postprocess_batched`, for ``torch.onnx.export`` behind a detector."""

    def __init__(self, num_top: int = 300) -> None:
        super().__init__()
        if num_top < 1:
            raise ValueError(f"DetectionPostProcessor: num_top must be >= 1, got {num_top}")
        self.num_top = int(num_top)

    def forward(
        self, logits: torch.Tensor, boxes: torch.Tensor, orig_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return postprocess_batched(logits, boxes, orig_sizes, self.num_top)

    def extra_repr(self) -> str:
        return f"num_top={self.num_top}"


def to_coco_detections(
    results: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Mapping[int, int] | Sequence[int],
) -> list[dict]:
    """COCO result records ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

    ``label_to_category_id`` maps the contiguous label ids of the model to the dataset's original
    category ids (a dict, or a sequence indexed by label).
    """
    if len(results) != len(image_ids):
        raise ValueError(f"to_coco_detections: {len(results)} results but {len(image_ids)} image ids")
    if isinstance(label_to_category_id, Mapping):
        mapping = {int(k): int(v) for k, v in label_to_category_id.items()}
    else:
        mapping = {i: int(v) for i, v in enumerate(label_to_category_id)}

    records: list[dict] = []
    for result, image_id in zip(results, image_ids):
        xyxy = result["boxes"].detach().float().cpu()
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
        labels = result["labels"].detach().cpu().tolist()
        scores = result["scores"].detach().float().cpu().tolist()
        for label, box, score in zip(labels, xywh, scores):
            category = mapping.get(int(label))
            if category is None:
                raise KeyError(
                    f"to_coco_detections: label {label} has no category id in label_to_category_id "
                    f"(known labels 0..{max(mapping) if mapping else -1})"
                )
            records.append({"image_id": int(image_id), "category_id": category, "bbox": box, "score": score})
    return records
