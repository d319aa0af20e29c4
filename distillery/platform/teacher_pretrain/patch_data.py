"""A detection dataset as the dense objective sees it: images resized to the teacher's square input
and per-patch classes from their boxes (:func:`~distillery.teachers.dense_pretrain.patch_labels_from_boxes`:
the class of the box holding a patch's centre, ``label + 1``; 0 the background).

Used by the driver (class weights of the train split, from the annotations alone) and the workers
(ingest rows, the val and probe images); no DeepSpeed here: the driver imports it before Ray starts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from distillery.platform.datasets.coco import CocoDataset, load_coco, load_image_resized
from distillery.teachers.dense_pretrain import class_weights_of_counts, patch_labels_from_boxes

__all__ = ["batch_patches", "image_patch_labels", "load_patch_split", "split_class_weights"]


def image_patch_labels(boxes: np.ndarray, labels: np.ndarray, width: int, height: int, size: int,
                       side: int) -> torch.Tensor:
    """(side, side) per-patch classes of one image of ``width`` x ``height`` px resized to ``size``:
    ``boxes`` (n, 4) xywh in its pixels, ``labels`` (n,) contiguous."""
    sx, sy = size / width, size / height
    resized = [(int(c) + 1, (x * sx, y * sy, (x + w) * sx, (y + h) * sy))
               for c, (x, y, w, h) in zip(np.asarray(labels).tolist(), np.asarray(boxes).reshape(-1, 4).tolist())]
    return patch_labels_from_boxes([resized], size, side)[0]


def _training_boxes(record) -> tuple[np.ndarray, np.ndarray]:
    keep = ~record.iscrowd  # as the ingest's annotation table: crowd regions are no training targets
    return record.boxes[keep], record.labels[keep]


def split_class_weights(dataset: CocoDataset, num_classes: int, size: int, side: int) -> tuple[list[float], list[int]]:
    """(the dense loss's class weights, the per-class patch counts) of a split, from its annotations."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for r in dataset.records:
        counts += torch.bincount(image_patch_labels(*_training_boxes(r), r.width, r.height, size, side).flatten(),
                                 minlength=num_classes)
    return class_weights_of_counts(counts).tolist(), counts.tolist()


def load_patch_split(annotations: str, images: str, size: int, side: int, limit: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of a COCO split (all: None) as (N, 3, S, S) uint8, resized as every
    evaluation resizes (``load_image_resized``), and their (N, side, side) per-patch classes."""
    records = load_coco(annotations, images, check_images="none").records[:limit]
    x = torch.stack([torch.from_numpy(load_image_resized(r.uri, size)) for r in records])
    y = torch.stack([image_patch_labels(*_training_boxes(r), r.width, r.height, size, side) for r in records])
    return x, y


def batch_patches(batch: dict[str, Any], size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Ray Data numpy batch of the training ingest (decoded HWC images, flat xywh boxes, labels) as
    (N, 3, S, S) uint8 images and (N, side, side) per-patch classes."""
    images: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    for image, boxes, labels in zip(batch["image"], batch["boxes"], batch["labels"]):
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        height, width = int(t.shape[1]), int(t.shape[2])
        images.append(TF.resize(t, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True))
        grids.append(image_patch_labels(np.asarray(boxes, dtype=np.float32), np.asarray(labels), width, height,
                                        size, side))
    return torch.stack(images), torch.stack(grids)
