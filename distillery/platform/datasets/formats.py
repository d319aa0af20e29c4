"""The user's dataset formats: YOLO and Pascal VOC read into the COCO reader's record types.

``load_split(data, split)`` is the one place the jobs load a split: ``data.format`` picks
:func:`~distillery.platform.datasets.coco.load_coco`, :func:`~distillery.platform.datasets.yolo.load_yolo`
or :func:`~distillery.platform.datasets.voc.load_voc`, and every
one returns a :class:`~distillery.platform.datasets.coco.CocoDataset` of validated
:class:`~distillery.platform.datasets.coco.ImageRecord` s (absolute xywh pixel boxes, contiguous labels),
with the same ``bad_records: error|skip`` policy and JSONL skip report. Everything downstream
(feature cache, ingest, training, evaluation) never learns which format the user had.

Parsing is our own on purpose: the formats are a few lines of text or XML each, and the job
needs what general converters do not give: an error naming the file and the line or field,
the skip report, and reading through fsspec (local or S3). YAML goes through ``yaml.safe_load``
and XML through ``defusedxml`` (files from user storage must not expand entities or reach out).

Choices a user should know (the README repeats them):

- Boxes may overshoot the image by up to one pixel (the COCO reader's tolerance; it absorbs float
  noise in normalised YOLO coordinates and VOC's 1-based rounding) and are clipped; further out
  is a bad record.
- YOLO class index = category id (detections map straight back to the label files); VOC class
  ``k`` in the class list gets category id ``k + 1``.
- VOC ``difficult`` objects become ``iscrowd`` regions: not trained on, ignored by COCO
  evaluation (as VOC's own evaluation ignores them). ``truncated`` objects are ordinary objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from distillery.platform.io import storage
from distillery.platform.datasets.coco import (AnnotationError, BadRecordPolicy, CategoryMap, CocoDataset, ImageCheck,
                                      ImageRecord, SkippedRecord, load_coco)

if TYPE_CHECKING:
    from distillery.platform.config.sections import DataConfig

__all__ = ["BORDER_TOLERANCE_PX", "DatasetFormat", "SplitBuilder", "box_in_image", "coco_split_paths", "load_split",
           "probe_image"]

log = logging.getLogger(__name__)

DatasetFormat = Literal["coco", "yolo", "voc"]

# The COCO reader's border tolerance (coco._BORDER_TOLERANCE_PX): one pixel past the image edge.
BORDER_TOLERANCE_PX = 1.0


def load_split(data: "DataConfig", split: Literal["train", "val"], *, report_uri: str | None = None,
               check_images: ImageCheck | None = None) -> CocoDataset:
    """The ``train`` or ``val`` split of a job's dataset, in the format ``data.format`` names.

    COCO splits are ``data.{train,val}_annotations`` / ``_images``; YOLO and VOC splits are
    named by ``data.train_split`` / ``data.val_split`` (a key of the YOLO dataset YAML, a file
    ``ImageSets/Main/<name>.txt`` of a VOC root)."""
    check = check_images or data.check_images
    if data.format == "coco":
        ann, images = data.split_paths(split)
        return load_coco(ann, images, bad_records=data.bad_records, check_images=check, report_uri=report_uri)
    name = data.train_split if split == "train" else data.val_split
    if data.format == "yolo":
        if data.classes is not None:
            raise AnnotationError("data.classes applies to VOC datasets; a YOLO dataset's classes are the "
                                  f"'names' of its dataset YAML ({data.root})")
        from distillery.platform.datasets.yolo import load_yolo

        return load_yolo(data.root, name, bad_records=data.bad_records, check_images=check, report_uri=report_uri)
    from distillery.platform.datasets.voc import load_voc

    return load_voc(data.root, name, classes=data.classes, bad_records=data.bad_records, check_images=check,
                    report_uri=report_uri)


def coco_split_paths(data: "DataConfig", split: Literal["train", "val"], dataset: CocoDataset,
                     out_dir: str) -> tuple[str, str]:
    """(annotation URI, image root URI) of a loaded split as a COCO file, for the training
    workers' evaluation: the configured files for COCO; for YOLO and VOC the validated records
    written once as ``out_dir/instances_<split>.json`` (atomic write). A COCO split with
    skipped bad records is written the same way, so that the workers score exactly the records
    the driver validated (reloading the original file would meet the bad records again)."""
    if data.format == "coco" and not dataset.skipped:
        return data.split_paths(split)
    uri = storage.join(out_dir, f"instances_{split}.json")
    storage.write_text(uri, json.dumps(dataset.coco_gt_dict()))
    return uri, dataset.image_root


# --------------------------------------------------------------------------- shared by the readers

class SplitBuilder:
    """Collects one split's records and bad records under the COCO reader's policy and report."""

    def __init__(self, source: str, bad_records: BadRecordPolicy):
        if bad_records not in ("error", "skip"):
            raise ValueError(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
        self.source = source
        self.policy = bad_records
        self.skipped: list[SkippedRecord] = []
        self.records: list[ImageRecord] = []
        self.sha = hashlib.sha256()

    def bad(self, file: str, kind: Literal["image", "annotation"], record_id, reason: str) -> None:
        """Raise (policy ``error``) or note (``skip``) one bad record, in the COCO reader's words."""
        rec = SkippedRecord(file, kind, record_id, reason)
        if self.policy == "error":
            raise AnnotationError(f"{rec.file}: {rec.kind} {rec.record_id}: {rec.reason}")
        self.skipped.append(rec)

    def hash_file(self, name: str, data: bytes) -> None:
        """Add a source file to the dataset's sha256 (lineage: same files, same digest)."""
        self.sha.update(name.encode() + b"\0" + hashlib.sha256(data).digest())

    def add(self, file_name: str, uri: str, width: int, height: int,
            objects: list[tuple[list[float], int, bool]]) -> None:
        self.records.append(ImageRecord(
            image_id=len(self.records) + 1, file_name=file_name, uri=uri, width=width, height=height,
            boxes=np.asarray([o[0] for o in objects], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray([o[1] for o in objects], dtype=np.int64),
            iscrowd=np.asarray([o[2] for o in objects], dtype=bool)))

    def finish(self, categories: CategoryMap, image_root: str, report_uri: str | None) -> CocoDataset:
        if self.skipped:
            if report_uri is None:
                raise AnnotationError(
                    f"{self.source}: {len(self.skipped)} bad records skipped but no report path was given; "
                    "pass report_uri so that every skipped record is written down")
            lines = "".join(json.dumps({"file": s.file, "kind": s.kind, "id": s.record_id, "reason": s.reason},
                                       default=str) + "\n" for s in self.skipped)
            storage.write_text(report_uri, lines)
            n_images = sum(1 for s in self.skipped if s.kind == "image")
            log.warning("%s: skipped %d bad records (%d images, %d annotations); report: %s", self.source,
                        len(self.skipped), n_images, len(self.skipped) - n_images, report_uri)
        if not self.records:
            raise AnnotationError(f"{self.source}: no usable images")
        return CocoDataset(annotation_uri=self.source, image_root=image_root, categories=categories,
                           records=self.records, annotation_sha256=self.sha.hexdigest(), skipped=self.skipped)


def probe_image(uri: str, mode: ImageCheck) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) of an image file, or (None, reason). Reads the header; ``decode``
    decodes the whole image. ``none`` and ``exists`` read the header too when called: a YOLO
    label is normalised, so its image's size is needed to place the boxes."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None, "image file is missing"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if mode == "decode":
                img.load()
            return img.size, None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return None, f"image does not decode: {exc}"


def box_in_image(x0: float, y0: float, x1: float, y1: float, width: int, height: int
                 ) -> tuple[list[float] | None, str | None]:
    """(clipped xywh box, None) or (None, reason): positive size, inside the image within
    :data:`BORDER_TOLERANCE_PX`."""
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, "box coordinates must be finite numbers"
    if x1 <= x0 or y1 <= y0:
        return None, f"box has non-positive size (x {x0:g}..{x1:g}, y {y0:g}..{y1:g} px)"
    tol = BORDER_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return None, (f"box x {x0:g}..{x1:g}, y {y0:g}..{y1:g} px lies outside the {width}x{height} image "
                      f"(more than {tol:g} px past the border)")
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    return [x0, y0, x1 - x0, y1 - y0], None
