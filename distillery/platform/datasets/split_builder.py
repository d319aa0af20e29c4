"""The pieces the YOLO and VOC readers share: a split's records collected under the COCO
reader's bad-record policy and skip report (:class:`SplitBuilder`), the image probe and the box
check with the COCO reader's border tolerance."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Literal

import numpy as np

from distillery.platform.io import storage
from distillery.platform.datasets.coco import (BORDER_TOLERANCE_PX, AnnotationError, BadRecordPolicy, CategoryMap,
                                               CocoDataset, ImageCheck, ImageRecord, SkippedRecord)
from distillery.platform.datasets.image_files import ImageDecodeError, PhotoSize, probe_photo

__all__ = ["SplitBuilder", "box_in_image", "probe_image"]

log = logging.getLogger(__name__)


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


def probe_image(uri: str, mode: ImageCheck) -> tuple[PhotoSize | None, str | None]:
    """(displayed size, None) of an image file, or (None, reason). Reads the header; ``decode``
    decodes the whole image. ``none`` and ``exists`` read the header too when called: a YOLO
    label is normalised, so its image's size is needed to place the boxes."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None, "image file is missing"
    try:
        return probe_photo(data, decode=mode == "decode"), None
    except ImageDecodeError as exc:
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
