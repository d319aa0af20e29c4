"""COCO-format instance annotations: a validating reader, category mapping, the resize for models.

The reader checks every record while it loads and names the file and the record in its errors:
malformed JSON, duplicate image ids, unknown category ids, boxes with non-positive size or outside
their image, missing image files and images that do not decode. With ``bad_records="skip"`` the
bad records are dropped, counted in the log and written one per line (JSONL) to a report with
their reason: nothing is dropped silently.

Category ids are mapped to contiguous labels 0..C-1 explicitly (sorted by id), because users'
custom datasets have gaps in their ids and the detector's class head needs dense labels. The
mapping travels with the model so that detections are written back with the original ids.
"""

from __future__ import annotations

import hashlib
import json
import itertools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
import orjson

from distillery.platform.datasets.image_files import (CorruptImageError, ImageDecodeError, decode_image, probe_photo,
                                                      size_mismatch)
from distillery.platform.io import storage
from distillery.platform.errors import DeterministicError

__all__ = [
    "BORDER_TOLERANCE_PX",
    "training_target",
    "AnnotationError",
    "CategoryMap",
    "CocoDataset",
    "CorruptImageError",
    "ImageRecord",
    "SkippedRecord",
    "decode_image",
    "load_image_resized",
    "load_coco",
]

log = logging.getLogger(__name__)

BadRecordPolicy = Literal["error", "skip"]
ImageCheck = Literal["none", "exists", "header", "decode"]

# COCO boxes are often rounded a fraction of a pixel past the border; beyond this it is an error.
BORDER_TOLERANCE_PX = 1.0


class AnnotationError(ValueError, DeterministicError):
    """A bad annotation file or record; the message names the file and the record."""


@dataclass(frozen=True)
class CategoryMap:
    """Original category ids <-> contiguous labels (0..C-1, in ascending id order)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_categories(cls, categories: Iterable[dict[str, Any]]) -> "CategoryMap":
        cats = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_id_to_label", {cid: i for i, cid in enumerate(self.category_ids)})

    def to_label(self, category_id: int) -> int:
        return self._id_to_label[category_id]

    def to_category_id(self, label: int) -> int:
        return self.category_ids[label]

    def to_dict(self) -> dict[str, Any]:
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CategoryMap":
        return cls(tuple(int(i) for i in d["category_ids"]), tuple(d["names"]))


@dataclass(frozen=True)
class ImageRecord:
    """One image and its (valid) annotations. Boxes are absolute xywh in the image's pixels."""

    image_id: int
    file_name: str
    uri: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32, xywh
    labels: np.ndarray  # (n,) int64, contiguous labels
    iscrowd: np.ndarray  # (n,) bool


@dataclass(frozen=True)
class SkippedRecord:
    file: str
    kind: Literal["image", "annotation"]
    record_id: Any
    reason: str


@dataclass
class CocoDataset:
    annotation_uri: str
    image_root: str
    categories: CategoryMap
    records: list[ImageRecord]
    annotation_sha256: str
    skipped: list[SkippedRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def coco_gt_dict(self) -> dict[str, Any]:
        """A COCO ground-truth dict of the *validated* records (original category ids)."""
        images, anns = [], []
        ann_id = 1
        for r in self.records:
            images.append({"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height})
            for box, label, crowd in zip(r.boxes, r.labels, r.iscrowd):
                x, y, w, h = (float(v) for v in box)
                anns.append({"id": ann_id, "image_id": r.image_id, "bbox": [x, y, w, h], "area": w * h,
                             "category_id": self.categories.to_category_id(int(label)),
                             "iscrowd": int(crowd)})
                ann_id += 1
        cats = [{"id": cid, "name": name} for cid, name in zip(self.categories.category_ids, self.categories.names)]
        return {"images": images, "annotations": anns, "categories": cats}


def training_target(record: ImageRecord) -> dict[str, Any]:
    """A record's boxes as the students' criterion takes them: ``labels`` (int64) and ``boxes``
    in normalised cxcywh (float32), for single-process fitting and benchmarks."""
    import torch  # here, not at the top: data-side processes import this module without torch

    xywh = torch.from_numpy(record.boxes).float()
    cxcywh = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], dim=1)
    scale = torch.tensor([record.width, record.height, record.width, record.height], dtype=torch.float32)
    return {"labels": torch.from_numpy(record.labels).long(), "boxes": cxcywh / scale}


def load_image_resized(uri: str, size: int) -> np.ndarray:
    """Read, decode and resize one image to (3, size, size) uint8 (bilinear, antialiased).

    The one resize used everywhere an unaugmented image meets a model (feature cache, online
    teacher, evaluation), so cached features and training inputs line up exactly.
    """
    import torch  # here, not at the top: data-side processes import this module without torch
    from torchvision.transforms.v2 import functional as TF

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CorruptImageError(f"image file is missing: {uri}") from None
    arr = decode_image(data, uri)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    t = TF.resize(t, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return t.numpy()


def _check_image(uri: str, mode: ImageCheck, width: int, height: int) -> str | None:
    """Return None if the image passes ``mode``'s check, else the reason."""
    if mode == "none":
        return None
    if mode == "exists":
        return None if storage.exists(uri) else "image file is missing"
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return "image file is missing"
    try:
        size = probe_photo(data, decode=mode == "decode")
    except ImageDecodeError as exc:
        return f"image does not decode: {exc}"
    return size_mismatch(size, width, height, "the annotation")


def _fail_or_skip(policy: BadRecordPolicy, skipped: list[SkippedRecord], rec: SkippedRecord) -> None:
    if policy == "error":
        raise AnnotationError(f"{rec.file}: {rec.kind} {rec.record_id}: {rec.reason}")
    skipped.append(rec)


def _require(cond: bool, file: str, what: str) -> None:
    if not cond:
        raise AnnotationError(f"{file}: {what}")


def _parse_json(raw: bytes) -> Any:
    """orjson (twice as fast as the standard parser on a COCO-train-sized file); the standard
    parser for what orjson refuses (NaN/Infinity literals, which json accepts and the bbox check
    then names), which also raises the error for a file that is not JSON at all."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _annotation_problem(ann: Any, i: int, images: dict[int, dict[str, Any]],
                        id_to_label: dict[int, int]) -> tuple[Any, str | None]:
    """(record id, reason) for annotation ``i``; reason None when it is valid."""
    ann_id = ann.get("id", f"annotations[{i}]") if isinstance(ann, dict) else f"annotations[{i}]"
    if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann or "bbox" not in ann:
        return ann_id, "annotation needs image_id, category_id and bbox"
    if ann["image_id"] not in images:
        return ann_id, f"refers to unknown image id {ann['image_id']}"
    if ann["category_id"] not in id_to_label:
        return ann_id, f"unknown category id {ann['category_id']}"
    bbox = ann["bbox"]
    img = images[ann["image_id"]]
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return ann_id, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return ann_id, f"bbox {bbox} has non-positive size"
    if (bbox[0] < -BORDER_TOLERANCE_PX or bbox[1] < -BORDER_TOLERANCE_PX
            or bbox[0] + bbox[2] > img["width"] + BORDER_TOLERANCE_PX
            or bbox[1] + bbox[3] > img["height"] + BORDER_TOLERANCE_PX):
        return ann_id, f"bbox {bbox} lies outside image {ann['image_id']} ({img['width']}x{img['height']})"
    return ann_id, None


def _annotation_columns(anns: list, images: dict[int, dict[str, Any]], id_to_label: dict[int, int]
                        ) -> dict[str, np.ndarray] | None:
    """The columns of a well-formed annotation list in a few vectorised passes (COCO train has
    860k boxes: a Python check per number took most of the load time): ``boxes`` (n, 4) float64
    xywh, ``image`` (position of the image in ``images``, -1 unknown), ``label`` (-1 unknown),
    ``crowd``, and ``suspect``: the rows a check flags. None when the list is not regular enough
    for that (a non-dict row, a missing key, a box that is not 4 plain numbers): the caller then
    checks every row one by one. Suspect rows get the per-row check, so messages are the same."""
    position = {iid: k for k, iid in enumerate(images)}
    n = len(anns)
    try:
        image = np.fromiter((position.get(a["image_id"], -1) for a in anns), dtype=np.int64, count=n)
        label = np.fromiter((id_to_label.get(a["category_id"], -1) for a in anns), dtype=np.int64, count=n)
        crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), dtype=bool, count=n)
        bboxes = [a["bbox"] for a in anns]
    except (TypeError, KeyError, AttributeError):  # non-dict rows, missing keys, unhashable ids
        return None
    if any(type(b) is not list or len(b) != 4 for b in bboxes):
        return None
    values = itertools.chain.from_iterable(bboxes)
    if not set(map(type, values)) <= {int, float, bool}:  # strings, None, nested lists
        return None
    try:
        boxes = np.fromiter(itertools.chain.from_iterable(bboxes), dtype=np.float64, count=4 * n).reshape(n, 4)
    except OverflowError:
        return None
    size = np.array([(img["width"], img["height"]) for img in images.values()], dtype=np.float64).reshape(-1, 2)
    wh = size[image]  # (rows of unknown images are flagged below whatever this reads)
    tol = BORDER_TOLERANCE_PX
    with np.errstate(invalid="ignore"):
        ok = ((image >= 0) & (label >= 0) & np.isfinite(boxes).all(1) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
              & (boxes[:, 0] >= -tol) & (boxes[:, 1] >= -tol)
              & (boxes[:, 0] + boxes[:, 2] <= wh[:, 0] + tol) & (boxes[:, 1] + boxes[:, 3] <= wh[:, 1] + tol))
    return {"boxes": boxes, "image": image, "label": label, "crowd": crowd, "size": size, "suspect": ~ok}


def _annotations_by_image(anns: list, f: str, images: dict[int, dict[str, Any]], id_to_label: dict[int, int],
                          bad_records: BadRecordPolicy, skipped: list[SkippedRecord]
                          ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Validate the annotations (bad ones fail or are skipped, in file order) and group the valid
    ones by image: boxes (n, 4) float32 xywh clipped to the image, labels int64, iscrowd bool."""
    columns = _annotation_columns(anns, images, id_to_label)
    suspects = range(len(anns)) if columns is None else np.flatnonzero(columns["suspect"]).tolist()
    bad: list[int] = []
    for i in suspects:
        ann_id, reason = _annotation_problem(anns[i], i, images, id_to_label)
        if reason is not None:
            _fail_or_skip(bad_records, skipped, SkippedRecord(f, "annotation", ann_id, reason))
            bad.append(i)
    keep = np.ones(len(anns), dtype=bool)
    keep[bad] = False
    if columns is None:  # irregular file: every kept row passed the per-row check
        rows = [anns[i] for i in np.flatnonzero(keep)]
        position = {iid: k for k, iid in enumerate(images)}
        columns = {"boxes": np.array([[float(v) for v in a["bbox"]] for a in rows], dtype=np.float64).reshape(-1, 4),
                   "image": np.array([position[a["image_id"]] for a in rows], dtype=np.int64),
                   "label": np.array([id_to_label[a["category_id"]] for a in rows], dtype=np.int64),
                   "crowd": np.array([bool(a.get("iscrowd", 0)) for a in rows], dtype=bool),
                   "size": np.array([(img["width"], img["height"]) for img in images.values()],
                                    dtype=np.float64).reshape(-1, 2)}
    else:
        columns = {k: (v[keep] if k != "size" else v) for k, v in columns.items()}
    # Group by image, file order kept within an image.
    order = np.argsort(columns["image"], kind="stable")
    image, boxes = columns["image"][order], columns["boxes"][order]
    labels, crowd = columns["label"][order], columns["crowd"][order]
    # Clip the sub-pixel overshoot allowed above (in float64, as the per-row code did).
    wh = columns["size"][image]
    x0, y0 = np.maximum(boxes[:, 0], 0.0), np.maximum(boxes[:, 1], 0.0)
    x1, y1 = np.minimum(boxes[:, 0] + boxes[:, 2], wh[:, 0]), np.minimum(boxes[:, 1] + boxes[:, 3], wh[:, 1])
    clipped = np.stack([x0, y0, x1 - x0, y1 - y0], 1).astype(np.float32)
    empty_boxes, empty_labels, empty_crowd = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
    boxes_of = dict.fromkeys(images, empty_boxes)
    labels_of = dict.fromkeys(images, empty_labels)
    crowd_of = dict.fromkeys(images, empty_crowd)
    ids = list(images)
    positions, starts = np.unique(image, return_index=True)
    ends = np.append(starts[1:], len(image))
    for k, a, b in zip(positions.tolist(), starts.tolist(), ends.tolist()):
        iid = ids[k]
        boxes_of[iid], labels_of[iid], crowd_of[iid] = clipped[a:b], labels[a:b], crowd[a:b]
    return boxes_of, labels_of, crowd_of


def load_coco(annotation_uri: str, image_root: str, *, bad_records: BadRecordPolicy = "error",
              check_images: ImageCheck = "header", report_uri: str | None = None,
              io_threads: int = 16) -> CocoDataset:
    """Load and validate a COCO instances file; image paths are ``image_root/file_name``.

    ``check_images``: ``none`` trusts the files, ``exists`` checks presence, ``header`` opens each
    file and compares its size with the annotation (cheap), ``decode`` fully decodes each image.
    The size compared is the displayed one (EXIF orientation applied, :mod:`.image_files`): a
    record's ``width``/``height`` and boxes are in the pixels labelling tools show; a record that
    gives a rotated photo's stored size is a bad record whose reason says so.
    Images that fail later, mid-training, are handled by the data pipeline with the same policy.
    """
    if bad_records not in ("error", "skip"):
        raise ValueError(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
    try:
        raw = storage.read_bytes(annotation_uri)
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {annotation_uri}") from None
    sha = hashlib.sha256(raw).hexdigest()
    try:
        doc = _parse_json(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{annotation_uri}: malformed JSON: {exc}") from None
    f = annotation_uri
    _require(isinstance(doc, dict), f, "top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        _require(isinstance(doc.get(key), list), f, f"missing or non-list '{key}'")

    # Categories are structural: a broken category table is always an error.
    cat_ids: set[int] = set()
    for i, cat in enumerate(doc["categories"]):
        _require(isinstance(cat, dict) and isinstance(cat.get("id"), int) and "name" in cat, f,
                 f"categories[{i}] needs an integer 'id' and a 'name': {cat!r}")
        _require(cat["id"] not in cat_ids, f, f"categories[{i}]: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
    _require(bool(cat_ids), f, "no categories")
    categories = CategoryMap.from_categories(doc["categories"])
    # No boxes, no detector: a mature trainer refuses rather than train on nothing in silence.
    _require(bool(doc["annotations"]), f, "'annotations' is empty: there are no boxes to train or evaluate on")
    id_to_label = {cid: categories.to_label(cid) for cid in categories.category_ids}

    skipped: list[SkippedRecord] = []
    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(doc["images"]):
        ok = (isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
              and isinstance(img.get("width"), int) and isinstance(img.get("height"), int)
              and img["width"] > 0 and img["height"] > 0)
        if not ok:
            _fail_or_skip(bad_records, skipped, SkippedRecord(
                f, "image", img.get("id", f"images[{i}]") if isinstance(img, dict) else f"images[{i}]",
                f"image record needs integer id, file_name, positive width/height: {img!r}"))
            continue
        if img["id"] in images:
            _fail_or_skip(bad_records, skipped, SkippedRecord(
                f, "image", img["id"], f"duplicate image id (file_name {img['file_name']!r})"))
            continue
        images[img["id"]] = img

    boxes_of, labels_of, crowd_of = _annotations_by_image(doc["annotations"], f, images, id_to_label,
                                                          bad_records, skipped)

    # Image files: checked in parallel threads (I/O bound, local or S3).
    ordered = sorted(images)
    # storage.join per image, with its prefix computed once (118k calls were a second of the load).
    prefix = storage.join(image_root, "_")[:-1]
    uris = {iid: prefix + name if not name.startswith("/") else storage.join(image_root, name)
            for iid in ordered for name in (images[iid]["file_name"],)}

    def check(iid: int) -> str | None:
        problem = _check_image(uris[iid], check_images, images[iid]["width"], images[iid]["height"])
        if problem == "image file is missing" and "\\" in images[iid]["file_name"]:  # written on Windows
            problem += " (its file_name separates folders with '\\'; COCO paths use '/')"
        return problem

    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        problems = list(pool.map(check, ordered)) if check_images != "none" else [None] * len(ordered)

    records: list[ImageRecord] = []
    for iid, problem in zip(ordered, problems):
        if problem is not None:
            _fail_or_skip(bad_records, skipped, SkippedRecord(
                f, "image", iid, f"{problem}: {uris[iid]}"))
            continue
        img = images[iid]
        records.append(ImageRecord(
            image_id=iid, file_name=img["file_name"], uri=uris[iid], width=img["width"], height=img["height"],
            boxes=boxes_of[iid], labels=labels_of[iid], iscrowd=crowd_of[iid]))

    if skipped:
        by_kind = {k: sum(1 for s in skipped if s.kind == k) for k in ("image", "annotation")}
        if report_uri is None:
            raise AnnotationError(
                f"{f}: {len(skipped)} bad records skipped but no report path was given; "
                "pass report_uri so that every skipped record is written down")
        lines = "".join(json.dumps({"file": s.file, "kind": s.kind, "id": s.record_id, "reason": s.reason},
                                   default=str) + "\n" for s in skipped)
        storage.write_text(report_uri, lines)
        log.warning("%s: skipped %d bad records (%d images, %d annotations); report: %s",
                    f, len(skipped), by_kind["image"], by_kind["annotation"], report_uri)
    if not records:
        raise AnnotationError(f"{f}: no usable images")
    if not any(len(r.boxes) for r in records):
        raise AnnotationError(f"{f}: none of its {len(doc['annotations'])} annotations is usable: "
                              "there are no boxes to train or evaluate on")
    used = set(np.concatenate([r.labels for r in records]).tolist())
    unused = [f"{cid} {name!r}" for k, (cid, name) in enumerate(zip(categories.category_ids, categories.names))
              if k not in used]
    if unused:  # e.g. the dataset's own name, which Roboflow exports as category 0
        log.warning("%s: %d categories have no annotation in this file (classes it cannot teach): %s", f,
                    len(unused), ", ".join(unused[:10]) + (", ..." if len(unused) > 10 else ""))
    return CocoDataset(annotation_uri=annotation_uri, image_root=image_root, categories=categories,
                       records=records, annotation_sha256=sha, skipped=skipped)
