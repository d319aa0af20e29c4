"""COCO box AP with faster-coco-eval (pycocotools as the reference), quietly.

:func:`coco_evaluate` takes the ground truth (a ``pycocotools.coco.COCO`` or the path of a COCO
JSON file) and detections as COCO result records (``image_id``, ``category_id`` in the dataset's
own ids, ``bbox`` as ``[x, y, w, h]`` in pixels, ``score``; see
``distillery.students.postprocess.to_coco_detections``) and returns the standard numbers as
floats: AP (IoU .50:.95), AP50, AP75, APs/APm/APl, and the recalls AR1/AR10/AR100/ARs/ARm/ARl.

Differences from calling ``COCO.loadRes`` + ``COCOeval`` by hand:

* an empty detection list is a valid result (AP 0), where ``loadRes`` raises an IndexError;
* the caller's records are not modified (``loadRes`` adds ``id``/``area``/``segmentation`` keys
  to them in place);
* records naming an image or a category the ground truth does not have are refused with the
  offending ids, instead of an assertion (images) or a silent drop (categories: with a wrong
  label-to-category mapping COCOeval would just report a low AP);
* pycocotools' prints go into the summary string (logged at INFO, or returned by
  :func:`coco_evaluate_with_summary`), not to stdout;
* COCOeval's ``-1`` ("no ground truth in this area range") becomes ``nan``, so every number is
  either in [0, 1] or explicitly undefined.

Backends: ``faster_coco_eval`` (the default; what the DEIM/D-FINE repos use: the same matching
and accumulation in C++) and ``pycocotools`` (the reference). At COCO val size (5,000 images x
100 detections) the evaluation takes seconds instead of about a minute; ``benchmarks/eval_scale.py``
measures both, and tests/test_evaluation.py checks that they agree to 1e-6.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import faster_coco_eval
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["COCO_METRIC_NAMES", "DEFAULT_BACKEND", "coco_evaluate", "coco_evaluate_with_summary",
           "load_coco_ground_truth"]

Backend = Literal["faster_coco_eval", "pycocotools"]
DEFAULT_BACKEND: Backend = "faster_coco_eval"
# Ground-truth classes of each backend (a COCO object of the other one is converted from its dict).
_COCO_CLASSES = {"pycocotools": COCO, "faster_coco_eval": faster_coco_eval.COCO}

log = logging.getLogger(__name__)

# Order of COCOeval.stats for iouType="bbox".
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _check_backend(backend: str) -> None:
    if backend not in _COCO_CLASSES:
        raise ValueError(f"coco_evaluate: backend must be one of {sorted(_COCO_CLASSES)}, got {backend!r}")


def load_coco_ground_truth(path: str | Path | Mapping, backend: Backend = DEFAULT_BACKEND) -> COCO:
    """A ``COCO`` object (of ``backend``) from a JSON file (or an already-loaded COCO dict, e.g.
    ``CocoDataset.coco_gt_dict()``), with a clear error naming the file when it is unusable."""
    _check_backend(backend)
    if isinstance(path, Mapping):
        dataset, path = dict(path), "<ground-truth dict>"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"coco_evaluate: ground-truth file {str(path)!r} does not exist")
        try:
            dataset = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"coco_evaluate: ground-truth file {str(path)!r} is not valid JSON: {err}") from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset, dict) or not isinstance(dataset.get(key), list):
            raise ValueError(f"coco_evaluate: ground-truth file {str(path)!r} lacks a {key!r} list")
    coco = _COCO_CLASSES[backend]()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results_coco(coco_gt: COCO, detections: Sequence[Mapping]) -> COCO:
    """The detections as a ``COCO`` result object (what ``loadRes`` builds), validated, copied."""
    image_ids = set(coco_gt.getImgIds())
    category_ids = set(coco_gt.getCatIds())
    annotations = []
    bad_images, bad_categories = set(), set()
    for i, det in enumerate(detections):
        try:
            image_id, category_id = int(det["image_id"]), int(det["category_id"])
            x, y, w, h = (float(v) for v in det["bbox"])
            score = float(det["score"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"coco_evaluate: detection {i} is not a COCO result record "
                f"(image_id, category_id, bbox [x, y, w, h], score): {det!r}"
            ) from err
        if not all(math.isfinite(v) for v in (x, y, w, h, score)):
            raise ValueError(f"coco_evaluate: detection {i} has a non-finite box or score: {det!r}")
        if image_id not in image_ids:
            bad_images.add(image_id)
        if category_id not in category_ids:
            bad_categories.add(category_id)
        annotations.append(
            {
                "id": i + 1,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": w * h,
                "score": score,
                "iscrowd": 0,
            }
        )
    if bad_images:
        raise ValueError(
            f"coco_evaluate: detections on images not in the ground truth: {sorted(bad_images)[:10]}"
        )
    if bad_categories:
        raise ValueError(
            f"coco_evaluate: detections use category ids {sorted(bad_categories)} that the ground truth "
            f"does not have (its ids: {sorted(category_ids)}); map contiguous labels to dataset ids first"
        )
    res = type(coco_gt)()
    res.dataset = {
        "info": dict(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate_with_summary(
    coco_gt: COCO | str | Path,
    detections: Sequence[Mapping],
    image_ids: Iterable[int] | None = None,
    backend: Backend = DEFAULT_BACKEND,
) -> tuple[dict[str, float], str]:
    """Box AP of ``detections`` against ``coco_gt``: (metrics, the backend's printed summary).

    ``image_ids`` restricts the evaluation to those images (default: every ground-truth image).
    """
    _check_backend(backend)
    if isinstance(coco_gt, tuple(_COCO_CLASSES.values())) and not isinstance(coco_gt, _COCO_CLASSES[backend]):
        coco_gt = coco_gt.dataset  # the other backend's object: rebuild from its dict
    if not isinstance(coco_gt, _COCO_CLASSES[backend]):
        coco_gt = load_coco_ground_truth(coco_gt, backend)
    missing_area = [a.get("id") for a in coco_gt.dataset["annotations"] if "area" not in a or "bbox" not in a]
    if missing_area:
        raise ValueError(
            f"coco_evaluate: ground-truth annotations without 'bbox' or 'area' (COCOeval needs both): "
            f"ids {missing_area[:10]}"
        )
    if not isinstance(detections, Sequence):
        detections = list(detections)
    coco_dt = _results_coco(coco_gt, detections)

    buffer = io.StringIO()
    if backend == "pycocotools":
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    else:
        evaluator = faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, iouType="bbox",
                                                     print_function=lambda *a: print(*a, file=buffer))
    if image_ids is not None:
        wanted = sorted({int(i) for i in image_ids})
        unknown = sorted(set(wanted) - set(coco_gt.getImgIds()))
        if unknown:
            raise ValueError(f"coco_evaluate: image_ids not in the ground truth: {unknown[:10]}")
        if not wanted:
            raise ValueError("coco_evaluate: image_ids is empty")
        evaluator.params.imgIds = wanted

    with contextlib.redirect_stdout(buffer):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {
        name: (float("nan") if value < 0 else float(value))
        for name, value in zip(COCO_METRIC_NAMES, evaluator.stats[:len(COCO_METRIC_NAMES)])
    }
    return metrics, buffer.getvalue()


def coco_evaluate(
    coco_gt: COCO | str | Path,
    detections: Sequence[Mapping],
    image_ids: Iterable[int] | None = None,
    backend: Backend = DEFAULT_BACKEND,
) -> dict[str, float]:
    """Box AP as a dict: AP, AP50, AP75, APs, APm, APl (+ AR*); the summary is logged at INFO."""
    metrics, summary = coco_evaluate_with_summary(coco_gt, detections, image_ids, backend)
    log.info("COCO bbox evaluation:\n%s", summary)
    return metrics
