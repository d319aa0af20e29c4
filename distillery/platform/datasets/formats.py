"""The user's dataset formats: YOLO and Pascal VOC read into the COCO reader's record types.

``load_split(data, split)`` is the one place the jobs load a split: ``data.format`` picks
:func:`~distillery.platform.datasets.coco.load_coco`, :func:`~distillery.platform.datasets.yolo.load_yolo`
or :func:`~distillery.platform.datasets.voc.load_voc`, and every
one returns a :class:`~distillery.platform.datasets.coco.CocoDataset` of validated
:class:`~distillery.platform.datasets.coco.ImageRecord` s (absolute xywh pixel boxes, contiguous labels),
with the same ``bad_records: error|skip`` policy and JSONL skip report. Everything downstream
(feature cache, ingest, training, evaluation) never learns which format the user had. The
readers share :mod:`distillery.platform.datasets.split_builder`.

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

import json
from typing import TYPE_CHECKING, Literal

from distillery.platform.io import storage
from distillery.platform.datasets.coco import AnnotationError, CocoDataset, ImageCheck, load_coco
from distillery.platform.datasets.voc import load_voc
from distillery.platform.datasets.yolo import load_yolo

if TYPE_CHECKING:
    from distillery.platform.config.sections import DataConfig

__all__ = ["DatasetFormat", "coco_split_paths", "load_split", "refuse_roboflow_export_without_its_paths"]

DatasetFormat = Literal["coco", "yolo", "voc"]


def load_split(data: "DataConfig", split: Literal["train", "val"], *, report_uri: str | None = None,
               check_images: ImageCheck | None = None) -> CocoDataset:
    """The ``train`` or ``val`` split of a job's dataset, in the format ``data.format`` names.

    COCO splits are ``data.{train,val}_annotations`` / ``_images``; YOLO and VOC splits are
    named by ``data.train_split`` / ``data.val_split`` (a key of the YOLO dataset YAML, a file
    ``ImageSets/Main/<name>.txt`` of a VOC root)."""
    check = check_images or data.check_images
    if data.format == "coco":
        ann, images = data.split_paths(split)
        refuse_roboflow_export_without_its_paths(data, ann)
        return load_coco(ann, images, bad_records=data.bad_records, check_images=check, report_uri=report_uri)
    name = data.train_split if split == "train" else data.val_split
    if data.format == "yolo":
        if data.classes is not None:
            raise AnnotationError("data.classes applies to VOC datasets; a YOLO dataset's classes are the "
                                  f"'names' of its dataset YAML ({data.root})")
        return load_yolo(data.root, name, bad_records=data.bad_records, check_images=check, report_uri=report_uri)
    return load_voc(data.root, name, classes=data.classes, bad_records=data.bad_records, check_images=check,
                    report_uri=report_uri)


ROBOFLOW_SPLITS = {"train": "train", "val": "valid"}  # Roboflow's COCO export: <split>/_annotations.coco.json


def refuse_roboflow_export_without_its_paths(data: "DataConfig", ann: str) -> None:
    """A Roboflow COCO export under ``data.root`` read with the default COCO paths: say which
    overrides read it, rather than only that ``annotations/instances_train.json`` is missing."""
    if storage.exists(ann) or not storage.exists(storage.join(data.root, "train", "_annotations.coco.json")):
        return
    overrides = " ".join(f"data.{s}_annotations={d}/_annotations.coco.json data.{s}_images={d}"
                         for s, d in ROBOFLOW_SPLITS.items()) + (" data.synthetic=null" if data.synthetic else "")
    raise AnnotationError(f"annotation file not found: {ann}; {data.root} holds a Roboflow COCO export "
                          f"(train/_annotations.coco.json): read it with {overrides}")


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
