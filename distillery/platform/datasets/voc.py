"""Pascal VOC datasets read into the COCO reader's record types.

Layout (a ``VOCdevkit/VOC2007``-style root)::

    Annotations/000005.xml        <size>, <filename>, <object>: name, difficult, bndbox
    JPEGImages/000005.jpg         the image named by <filename> (000005.jpg when it has none)
    ImageSets/Main/train.txt      one image id per line; one file per split

Choices (the README repeats them):

- Classes: ``classes`` (``data.classes``) fixes the table and its order; an object of another
  class is a bad record. Without it the classes are discovered: every object name in every XML
  file under ``Annotations/``, sorted (the official VOC order for the 20 VOC classes), so train
  and val agree even when a class is missing from one of them. Class ``k`` has category id
  ``k + 1``. Names are matched ignoring case and surrounding whitespace (``Dog`` and ``dog `` are
  one class, as a labeller meant): discovery merges such spellings into the most frequent one
  (the first in sorted order of equally frequent ones) with a warning naming each spelling and
  a file using it; ``data.classes`` naming one class twice that way is refused.
- VOC pixel coordinates are 1-based: ``xmin``/``ymin``/``xmax``/``ymax`` become the 0-based
  box ``[xmin - 1, ymin - 1, xmax - xmin, ymax - ymin]`` (as Ultralytics' and MMDetection's VOC
  conversions do); the one-pixel border tolerance absorbs the 0-based files some tools write.
- ``difficult`` objects become ``iscrowd`` regions (not trained on, ignored by COCO evaluation,
  as VOC's evaluation ignores them); ``truncated`` and ``occluded`` objects are ordinary objects.
- An XML without ``<size>`` is a bad record: the size is what the boxes are checked against.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from distillery.platform.io import storage
from distillery.platform.datasets.coco import AnnotationError, BadRecordPolicy, CategoryMap, CocoDataset, ImageCheck
from distillery.platform.datasets.image_files import size_mismatch
from distillery.platform.datasets.split_builder import SplitBuilder, box_in_image, probe_image

__all__ = ["class_key", "discover_voc_classes", "load_voc"]

log = logging.getLogger(__name__)


def _parse_xml(data: bytes) -> ET.Element:
    return SafeET.fromstring(data)


def _read(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return None


def _read_all(uris: list[str], io_threads: int) -> list[bytes | None]:
    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        return list(pool.map(_read, uris))


def class_key(name: str) -> str:
    """The form under which VOC class names are compared: case and surrounding whitespace ignored."""
    return name.strip().casefold()


def discover_voc_classes(root: str, io_threads: int = 16) -> list[str]:
    """Sorted object names of every XML file under ``root/Annotations`` (files that do not parse
    are left to the split that lists them to report); spellings of one name that differ only in
    case or surrounding whitespace are merged into the most frequent, with a warning."""
    ann_dir = storage.join(root, "Annotations")
    uris = sorted(storage.join(ann_dir, n) for n in storage.listdir(ann_dir) if n.endswith(".xml"))
    spellings: dict[str, dict[str, list]] = {}  # key -> spelling -> [objects, first file]
    for uri, data in zip(uris, _read_all(uris, io_threads)):
        try:
            doc = _parse_xml(data) if data is not None else None
        except (ET.ParseError, DefusedXmlException):
            continue
        for obj in doc.findall("object") if doc is not None else []:
            name = (obj.findtext("name") or "").strip()
            if name:
                seen = spellings.setdefault(class_key(name), {}).setdefault(name, [0, uri])
                seen[0] += 1
    if not spellings:
        raise AnnotationError(f"{ann_dir}: no object names found in any XML file to discover the classes from; "
                              "set data.classes")
    names = []
    for variants in spellings.values():
        chosen = min(variants, key=lambda n: (-variants[n][0], n))
        if len(variants) > 1:
            log.warning("%s: VOC class names that differ only in case are one class, %r: %s", ann_dir, chosen,
                        "; ".join(f"{n!r} ({count} objects, first in {first})"
                                  for n, (count, first) in sorted(variants.items())))
        names.append(chosen)
    return sorted(names)


def _number(parent: ET.Element, tag: str) -> float:
    text = parent.findtext(tag)
    if text is None:
        raise ValueError(f"<{tag}> is missing")
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"<{tag}> is not a number: {text.strip()!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"<{tag}> is not finite: {text.strip()!r}")
    return value


def _image_size(doc: ET.Element) -> tuple[int, int]:
    size = doc.find("size")
    if size is None:
        raise ValueError("XML has no <size>: the image's width and height are needed to check its boxes")
    width, height = _number(size, "width"), _number(size, "height")
    if width != int(width) or height != int(height) or width <= 0 or height <= 0:
        raise ValueError(f"<size> must have positive integer width and height, got {width:g}x{height:g}")
    return int(width), int(height)


def _objects(builder: SplitBuilder, xml_uri: str, doc: ET.Element, labels: dict[str, int], width: int,
             height: int) -> list[tuple[list[float], int, bool]]:
    objects = []
    for k, obj in enumerate(doc.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        record_id = f"object {k} ({name!r})" if name else f"object {k}"
        if class_key(name) not in labels or not name:
            reason = ("object has no <name>" if not name else
                      f"unknown class name {name!r} (not among the {len(labels)} classes of data.classes)")
            builder.bad(xml_uri, "annotation", record_id, reason)
            continue
        bndbox = obj.find("bndbox")
        try:
            if bndbox is None:
                raise ValueError("object has no <bndbox>")
            xmin, ymin, xmax, ymax = (_number(bndbox, t) for t in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.findtext("difficult")
            difficult_flag = bool(int(float(difficult.strip()))) if difficult and difficult.strip() else False
        except ValueError as exc:
            builder.bad(xml_uri, "annotation", record_id, str(exc))
            continue
        box, reason = box_in_image(xmin - 1, ymin - 1, xmax - 1, ymax - 1, width, height)
        if reason is not None:
            builder.bad(xml_uri, "annotation", record_id,
                        f"bndbox xmin {xmin:g} ymin {ymin:g} xmax {xmax:g} ymax {ymax:g} (1-based): {reason}")
            continue
        objects.append((box, labels[class_key(name)], difficult_flag))
    return objects


def _image_problem(uri: str, mode: ImageCheck, width: int, height: int) -> str | None:
    """None if the image passes ``mode``'s check (as the COCO reader checks), else the reason."""
    if mode == "none":
        return None
    if mode == "exists":
        return None if storage.exists(uri) else "image file is missing"
    size, problem = probe_image(uri, mode)
    return problem if problem is not None else size_mismatch(size, width, height, "the XML's <size>")


def _split_ids(builder: SplitBuilder, split_uri: str, split: str) -> list[str]:
    try:
        raw = storage.read_bytes(split_uri)
    except FileNotFoundError:
        raise AnnotationError(f"{split_uri}: VOC split list not found (data.train_split / data.val_split name "
                              f"a file ImageSets/Main/<name>.txt; split '{split}')") from None
    builder.hash_file(f"ImageSets/Main/{split}.txt", raw)
    ids, seen = [], set()
    for line_no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] in seen:
            builder.bad(split_uri, "image", tokens[0], f"line {line_no}: image id listed twice")
            continue
        seen.add(tokens[0])
        ids.append(tokens[0])
    return ids


def load_voc(root: str, split: str, *, classes: Sequence[str] | None = None, bad_records: BadRecordPolicy = "error",
             check_images: ImageCheck = "header", report_uri: str | None = None,
             io_threads: int = 16) -> CocoDataset:
    """Load and validate split ``split`` (``ImageSets/Main/<split>.txt``) of the VOC dataset at ``root``.

    Image ids are 1..N in the split file's order; ``file_name`` is ``JPEGImages/<filename>``."""
    split_uri = storage.join(root, "ImageSets", "Main", f"{split}.txt")
    builder = SplitBuilder(split_uri, bad_records)
    names = list(classes) if classes else discover_voc_classes(root, io_threads)
    if len({class_key(n) for n in names}) != len(names):
        raise AnnotationError(f"data.classes lists a class twice (names are compared ignoring case and "
                              f"surrounding whitespace): {names}")
    builder.hash_file("classes", "\n".join(names).encode())
    labels = {class_key(name): i for i, name in enumerate(names)}
    ids = _split_ids(builder, split_uri, split)
    xml_uris = [storage.join(root, "Annotations", f"{i}.xml") for i in ids]

    parsed = []  # (file_name, uri, width, height, objects)
    for image_id, xml_uri, data in zip(ids, xml_uris, _read_all(xml_uris, io_threads)):
        if data is None:
            builder.bad(xml_uri, "image", image_id, f"annotation file is missing (listed in {split_uri})")
            continue
        builder.hash_file(f"Annotations/{image_id}.xml", data)
        try:
            doc = _parse_xml(data)
            width, height = _image_size(doc)
        except (ET.ParseError, DefusedXmlException) as exc:
            builder.bad(xml_uri, "image", image_id, f"malformed XML: {exc}")
            continue
        except ValueError as exc:
            builder.bad(xml_uri, "image", image_id, str(exc))
            continue
        file_name = "JPEGImages/" + ((doc.findtext("filename") or "").strip() or f"{image_id}.jpg")
        objects = _objects(builder, xml_uri, doc, labels, width, height)
        parsed.append((image_id, xml_uri, file_name, storage.join(root, file_name), width, height, objects))

    def check(item) -> str | None:
        return _image_problem(item[3], check_images, item[4], item[5])

    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        problems = list(pool.map(check, parsed))
    for (image_id, xml_uri, file_name, uri, width, height, objects), problem in zip(parsed, problems):
        if problem is not None:
            builder.bad(xml_uri, "image", image_id, f"{problem}: {uri}")
            continue
        builder.add(file_name, uri, width, height, objects)
    categories = CategoryMap(tuple(range(1, len(names) + 1)), tuple(names))
    return builder.finish(categories, root, report_uri)
