"""The one evaluation loop: resize -> forward -> postprocess -> COCO detections -> score.

Plain PyTorch, used by the training engine (each rank predicts its shard, the engine gathers),
the benchmarks and the tests. The loop takes the images either as a tensor aligned with the
records or as a function that loads a batch of records, so it reads no files itself (the platform
passes :func:`distillery.platform.datasets.coco.load_image_resized`, which reads any storage).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence, Union

import torch
from torch import nn

from distillery.evaluation.coco_eval import coco_evaluate
from distillery.students.postprocess import postprocess, to_coco_detections

__all__ = ["EvalRecord", "ImageSource", "evaluate_detector", "predict_coco_detections", "shard"]


class EvalRecord(Protocol):
    """What the loop reads of a record (``distillery.platform.datasets.coco.ImageRecord`` has it)."""

    image_id: int
    width: int
    height: int


# A (N, 3, S, S) tensor aligned with the records, or records -> their (B, 3, S, S) batch.
# uint8 pixels are scaled to [0, 1]; float pixels are taken as already in [0, 1].
ImageSource = Union[torch.Tensor, Callable[[Sequence[Any]], torch.Tensor]]


def shard(items: Sequence[Any], index: int, count: int) -> Sequence[Any]:
    """Shard ``index`` of ``count``: every ``count``-th item from ``index`` (the ranks' split)."""
    if not 0 <= index < count:
        raise ValueError(f"shard: index must be in [0, {count}), got {index}")
    return items[index::count]


def _model_input(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(device).float().div_(255.0).to(dtype)
    return images.to(device=device, dtype=dtype)


def predict_coco_detections(model: nn.Module, records: Sequence[EvalRecord], images: ImageSource,
                            category_ids: Sequence[int] | Mapping[int, int], batch_size: int = 16,
                            num_top: int = 100, shard_index: int = 0, shard_count: int = 1) -> list[dict]:
    """COCO result records (``image_id``, ``category_id``, ``bbox`` xywh, ``score``) of ``model`` on
    shard ``shard_index`` of ``shard_count`` of ``records``, predicted ``batch_size`` images at a
    time; ``category_ids`` maps the model's contiguous labels back to the dataset's ids. The model
    runs in eval mode, on the device and dtype of its parameters; its mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"predict_coco_detections: batch_size must be >= 1, got {batch_size}")
    if isinstance(images, torch.Tensor):
        if images.shape[0] != len(records):
            raise ValueError(f"predict_coco_detections: {images.shape[0]} images for {len(records)} records")
        images = shard(images, shard_index, shard_count)
    records = shard(records, shard_index, shard_count)
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    detections: list[dict] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                pixels = images[start:start + batch_size] if isinstance(images, torch.Tensor) else images(chunk)
                out = model(_model_input(pixels, parameter.device, parameter.dtype))
                sizes = torch.tensor([[r.width, r.height] for r in chunk], device=parameter.device,
                                     dtype=torch.float32)
                results = postprocess(out["pred_logits"].float(), out["pred_boxes"].float(), sizes, num_top=num_top)
                detections += to_coco_detections(results, [r.image_id for r in chunk], category_ids)
    finally:
        model.train(was_training)
    return detections


def evaluate_detector(model: nn.Module, records: Sequence[EvalRecord], images: ImageSource,
                      category_ids: Sequence[int] | Mapping[int, int], ground_truth: Any,
                      batch_size: int = 16, num_top: int = 100) -> dict[str, float]:
    """COCO metrics (``AP``, ``AP50``, ...) of ``model`` on all of ``records`` in one process;
    ``ground_truth`` is what :func:`coco_evaluate` takes (a COCO dict, a path or a COCO object)."""
    detections = predict_coco_detections(model, records, images, category_ids, batch_size, num_top)
    return {k: float(v) for k, v in coco_evaluate(ground_truth, detections).items()}
