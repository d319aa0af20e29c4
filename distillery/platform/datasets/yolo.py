"""YOLO detection datasets (the Ultralytics layout) read into the COCO reader's record types.

Layout::

    data.yaml                     path: .   train: images/train   val: images/val
                                  names: [cat, dog]   (or {0: cat, 1: dog})
    images/train/0001.jpg
    labels/train/0001.txt         one object per line: class cx cy w h (normalised to [0, 1])

As in Ultralytics: a split entry is a directory (searched recursively for images), a list of
them, or a ``.txt`` file listing image paths; an image's label file is its path with the last
``/images/`` replaced by ``/labels/`` and the extension by ``.txt``; an image without a label
file (or with an empty one) is a background image; a line with more than five columns is a
polygon (segmentation label) and its box is the polygon's extent; a line repeating an earlier
line of its file (the same numbers) is dropped with a warning naming the file and both lines.
Boxes are normalised to the image as displayed (EXIF orientation applied, as Ultralytics sizes
JPEGs). Where Ultralytics is silent we
are not: a label file without an image is a bad record, not an ignored file (``classes.txt``,
written by labelling tools beside the labels, is not a label file).

Relative paths in the YAML (``path``, split entries) are resolved against the YAML's own
directory (Ultralytics resolves a relative ``path`` against its settings' datasets directory,
which a cluster job cannot see); lines of a ``.txt`` list starting with ``./`` are relative to
the list file, other relative lines to the dataset root.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import yaml

from distillery.platform.io import storage
from distillery.platform.datasets.coco import AnnotationError, BadRecordPolicy, CategoryMap, CocoDataset, ImageCheck
from distillery.platform.datasets.image_files import IMAGE_SUFFIXES
from distillery.platform.datasets.split_builder import SplitBuilder, box_in_image, probe_image

__all__ = ["IMAGE_SUFFIXES", "YoloSpec", "label_uri_of", "load_yolo", "read_yolo_yaml"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class YoloSpec:
    """A parsed dataset YAML: where it is, the dataset root, class names by index, split entries."""

    yaml_uri: str
    yaml_bytes: bytes
    root: str
    names: dict[int, str]
    splits: dict[str, str | list[str]]

    @property
    def categories(self) -> CategoryMap:
        ids = sorted(self.names)
        return CategoryMap(tuple(ids), tuple(self.names[i] for i in ids))


def _normalise(uri: str) -> str:
    if storage.has_protocol(uri):
        proto, rest = uri.split("://", 1)
        return f"{proto}://{posixpath.normpath(rest)}"
    return os.path.normpath(uri)


def _resolve(base: str, rel: str) -> str:
    return _normalise(rel if storage.is_absolute(rel) else storage.join(base, rel))


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def find_yaml(root: str) -> str:
    """``root`` when it names a YAML file, else the dataset YAML in directory ``root``
    (``data.yaml``, or the only ``*.yaml`` / ``*.yml`` there)."""
    if root.endswith((".yaml", ".yml")):
        return root
    found = [n for n in storage.listdir(root) if n.endswith((".yaml", ".yml"))]
    if "data.yaml" in found:
        return storage.join(root, "data.yaml")
    if len(found) == 1:
        return storage.join(root, found[0])
    raise AnnotationError(f"{root}: data.root of a YOLO dataset must be its dataset YAML or a directory with "
                          f"data.yaml (or exactly one *.yaml); found {found or 'none'}")


def _parse_names(yaml_uri: str, doc: dict) -> dict[int, str]:
    names = doc.get("names")
    if isinstance(names, list):
        table = dict(enumerate(names))
    elif isinstance(names, dict):
        table = {}
        for key, value in names.items():
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            if not isinstance(key, int) or isinstance(key, bool) or key < 0:
                raise AnnotationError(f"{yaml_uri}: names: class index {key!r} is not a non-negative integer")
            table[key] = value
    else:
        raise AnnotationError(f"{yaml_uri}: 'names' must be a list of class names or a mapping index -> name")
    if not table:
        raise AnnotationError(f"{yaml_uri}: 'names' is empty")
    for key, value in table.items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value) == "":
            raise AnnotationError(f"{yaml_uri}: names[{key}] must be a class name, got {value!r}")
    nc = doc.get("nc")
    if nc is not None and nc != len(table):
        raise AnnotationError(f"{yaml_uri}: nc is {nc} but 'names' has {len(table)} classes")
    return {k: str(v) for k, v in table.items()}


def read_yolo_yaml(root: str) -> YoloSpec:
    """Parse the dataset YAML at (or in) ``root``; errors name the file and the field."""
    yaml_uri = find_yaml(root)
    try:
        raw = storage.read_bytes(yaml_uri)
    except FileNotFoundError:
        raise AnnotationError(f"YOLO dataset YAML not found: {yaml_uri}") from None
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise AnnotationError(f"{yaml_uri}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise AnnotationError(f"{yaml_uri}: top level must be a mapping with path, train, val and names")
    path = doc.get("path")
    if path is not None and not isinstance(path, str):
        raise AnnotationError(f"{yaml_uri}: 'path' must be a string, got {path!r}")
    dataset_root = _resolve(_parent(yaml_uri), path) if path else _parent(yaml_uri)
    splits = {k: v for k, v in doc.items() if isinstance(v, (str, list)) and k not in ("path", "names", "download")}
    return YoloSpec(yaml_uri, raw, dataset_root, _parse_names(yaml_uri, doc), splits)


def label_uri_of(image_uri: str) -> str:
    """Ultralytics' rule: the last ``/images/`` becomes ``/labels/``, the extension ``.txt``."""
    head, sep, tail = image_uri.rpartition("/images/")
    swapped = f"{head}/labels/{tail}" if sep else image_uri
    return swapped.rsplit(".", 1)[0] + ".txt"


def _find_files(dir_uri: str) -> list[str]:
    """Every file under ``dir_uri`` (recursive), as URIs of the same kind."""
    fs, path = storage.filesystem(dir_uri)
    proto = dir_uri.split("://", 1)[0] + "://" if storage.has_protocol(dir_uri) else ""
    return sorted(proto + p for p in fs.find(path))


def _split_images(spec: YoloSpec, split: str) -> tuple[list[str], list[str]]:
    """(image URIs, image directories) of a split entry."""
    if split not in spec.splits:
        raise AnnotationError(f"{spec.yaml_uri}: no split '{split}' (has {sorted(spec.splits) or 'none'}); "
                              f"set data.train_split / data.val_split to one of these keys")
    entry = spec.splits[split]
    images, dirs = [], []
    for i, item in enumerate(entry if isinstance(entry, list) else [entry]):
        where = f"{split}[{i}]" if isinstance(entry, list) else split
        if not isinstance(item, str):
            raise AnnotationError(f"{spec.yaml_uri}: {where} must be a path, got {item!r}")
        uri = _resolve(spec.root, item)
        if item.endswith(".txt"):
            try:
                lines = storage.read_text(uri).splitlines()
            except FileNotFoundError:
                raise AnnotationError(f"{spec.yaml_uri}: {where}: image list {uri} does not exist") from None
            for line in (x.strip() for x in lines):
                if line:
                    base = _parent(uri) if line.startswith("./") else spec.root
                    images.append(_resolve(base, line[2:] if line.startswith("./") else line))
            continue
        if not storage.exists(uri):
            raise AnnotationError(f"{spec.yaml_uri}: {where}: image directory {uri} does not exist")
        dirs.append(uri)
        images += [f for f in _find_files(uri) if f.lower().endswith(IMAGE_SUFFIXES)]
    return images, dirs


def _parse_line(tokens: list[str], names: dict[int, str], width: int, height: int
                ) -> tuple[list[float] | None, int, str | None]:
    """(xywh pixel box, class index, None) or (None, -1, reason) for one label line."""
    n = len(tokens)
    if n != 5 and (n < 7 or n % 2 == 0):
        return None, -1, (f"has {n} columns; a YOLO detection line is 'class cx cy w h' (5 columns) "
                          "or a polygon 'class x1 y1 x2 y2 x3 y3 ...'")
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return None, -1, f"not all columns are numbers: {' '.join(tokens)!r}"
    if not (math.isfinite(values[0]) and values[0] == int(values[0])):
        return None, -1, f"class index {tokens[0]!r} is not an integer"
    cls = int(values[0])
    if cls not in names:
        return None, -1, f"class index {cls} is not in the dataset YAML's names (0..{max(names)})"
    if n == 5:
        cx, cy, w, h = values[1:]
        x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
        what = f"box cx {cx:g} cy {cy:g} w {w:g} h {h:g}"
    else:
        xs, ys = values[1::2], values[2::2]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        what = f"polygon extent x {x0:g}..{x1:g} y {y0:g}..{y1:g}"
    box, reason = box_in_image(x0 * width, y0 * height, x1 * width, y1 * height, width, height)
    if reason is not None:
        return None, -1, f"{what} (normalised): {reason}"
    return box, cls, None


def _read_label(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        return None


def load_yolo(root: str, split: str, *, bad_records: BadRecordPolicy = "error",
              check_images: ImageCheck = "header", report_uri: str | None = None,
              io_threads: int = 16) -> CocoDataset:
    """Load and validate split ``split`` (a key of the dataset YAML) of the YOLO dataset whose
    YAML is ``root`` (or lies in directory ``root``).

    Image ids are 1..N in sorted path order; ``file_name`` is the image path relative to the
    dataset root. Every image's header is read whatever ``check_images`` says (``decode`` also
    decodes it): normalised boxes need the image size."""
    spec = read_yolo_yaml(root)
    builder = SplitBuilder(spec.yaml_uri, bad_records)
    builder.hash_file(posixpath.basename(spec.yaml_uri), spec.yaml_bytes)
    images, dirs = _split_images(spec, split)
    unique: list[str] = []
    seen: set[str] = set()
    for uri in images:
        if uri in seen:
            builder.bad(spec.yaml_uri, "image", uri, f"image listed twice in split '{split}'")
            continue
        seen.add(uri)
        unique.append(uri)
    unique.sort()
    _check_orphan_labels(builder, dirs, {label_uri_of(u) for u in unique})

    def read(uri: str):
        return probe_image(uri, check_images), _read_label(label_uri_of(uri))

    with ThreadPoolExecutor(max_workers=max(1, io_threads)) as pool:
        loaded = list(pool.map(read, unique))
    prefix = spec.root.rstrip("/") + "/"
    for uri, ((size, problem), label) in zip(unique, loaded):
        file_name = uri[len(prefix):] if uri.startswith(prefix) else uri
        if problem is not None:
            builder.bad(spec.yaml_uri, "image", file_name, f"{problem}: {uri}")
            continue
        objects = _read_objects(builder, label_uri_of(uri), label, prefix, spec.names, size.width, size.height)
        if objects is None:
            continue
        builder.add(file_name, uri, size.width, size.height, objects)
    return builder.finish(spec.categories, spec.root, report_uri)


def _read_objects(builder: SplitBuilder, label_uri: str, label: bytes | None, root_prefix: str,
                  names: dict[int, str], width: int, height: int) -> list[tuple[list[float], int, bool]] | None:
    """The objects of one label file (none: a background image); None if the file is unusable."""
    if label is None:
        return []
    # Hashed under its name in the dataset, so that a moved dataset keeps its digest.
    builder.hash_file(label_uri[len(root_prefix):] if label_uri.startswith(root_prefix) else label_uri, label)
    try:
        text = label.decode("utf-8")
    except UnicodeDecodeError as exc:
        builder.bad(label_uri, "image", posixpath.basename(label_uri), f"label file is not UTF-8 text: {exc}")
        return None
    objects = []
    first_line: dict[tuple[float, ...], int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        box, cls, reason = _parse_line(tokens, names, width, height)
        if reason is not None:
            builder.bad(label_uri, "annotation", f"line {line_no}", reason)
            continue
        values = tuple(float(t) for t in tokens)
        if values in first_line:  # one object labelled twice: Ultralytics drops the repeat and warns too
            log.warning("%s: line %d repeats line %d (the same class and box): dropped", label_uri, line_no,
                        first_line[values])
            continue
        first_line[values] = line_no
        objects.append((box, cls, False))
    return objects


def _check_orphan_labels(builder: SplitBuilder, image_dirs: list[str], expected: set[str]) -> None:
    """A label file under a split's label directory whose image is missing is a bad record."""
    for image_dir in image_dirs:
        label_dir = label_uri_of(image_dir.rstrip("/") + "/x.jpg").rsplit("/", 1)[0]
        if label_dir == image_dir.rstrip("/") or not storage.exists(label_dir):
            continue
        for uri in _find_files(label_dir):
            if not uri.endswith(".txt") or uri in expected or uri == storage.join(label_dir, "classes.txt"):
                continue
            stem = uri[len(label_dir) + 1:].rsplit(".", 1)[0]
            builder.bad(uri, "image", stem, f"missing image for label file: no {stem}.* image under {image_dir}")
