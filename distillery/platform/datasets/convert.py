"""Convert a YOLO or Pascal VOC dataset to COCO instances files, validated on the way.

    python -m distillery.platform.datasets.convert --from yolo|voc SRC --out DIR [--split NAME ...]
        [--classes a,b,c] [--bad-records error|skip] [--check-images MODE] [--copy-images]

``SRC`` is what ``data.root`` would be for that format (the YOLO dataset YAML or its directory;
the VOC root). Each split is read by the same reader the jobs use (every check, the same
``error|skip`` policy) and written atomically as ``DIR/annotations/instances_<split>.json``;
skipped records go to ``DIR/annotations/instances_<split>.skipped.jsonl``. Images are referenced
where they are (``file_name`` relative to ``SRC``'s dataset root, which is then the image root),
or copied to ``DIR/images/<split>/`` with ``--copy-images``, the COCO layout the jobs' default
``data`` paths expect. The last line printed is a JSON summary with the ``data.*`` overrides that
train on the result.

Converting is optional: the jobs read YOLO and VOC directly with ``data.format``. It is for
inspecting a dataset with COCO tools, or freezing one validated snapshot of it.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from distillery.platform.io import storage
from distillery.platform.datasets.coco import AnnotationError, CocoDataset
from distillery.platform.datasets.voc import load_voc
from distillery.platform.datasets.yolo import load_yolo

__all__ = ["convert_dataset", "main"]


def _load(fmt: str, src: str, split: str, *, classes: list[str] | None, bad_records: str, check_images: str,
          report_uri: str) -> CocoDataset:
    if fmt == "yolo":
        return load_yolo(src, split, bad_records=bad_records, check_images=check_images, report_uri=report_uri)
    return load_voc(src, split, classes=classes, bad_records=bad_records, check_images=check_images,
                    report_uri=report_uri)


def _copy_images(dataset: CocoDataset, dest_root: str, io_threads: int = 16) -> dict[int, str]:
    """Copy every record's image under ``dest_root`` (atomic writes); return the new file names."""
    relative = [r.file_name for r in dataset.records if not storage.is_absolute(r.file_name)]
    # The split's own directory (images/train/, JPEGImages/) is dropped: OUT/images/<split>/ replaces it.
    common = posixpath.commonpath([posixpath.dirname(f) for f in relative]) if relative else ""

    def target(file_name: str) -> str:
        if storage.is_absolute(file_name):
            return posixpath.basename(file_name)  # a YOLO list file may name any path: keep the name
        return posixpath.relpath(file_name, common) if common else file_name

    names = {r.image_id: target(r.file_name) for r in dataset.records}
    if len(set(names.values())) != len(names):
        raise AnnotationError(f"{dataset.annotation_uri}: two images would be copied to the same name under "
                              f"{dest_root}; convert without --copy-images")

    def copy(record) -> None:
        storage.write_bytes(storage.join(dest_root, names[record.image_id]), storage.read_bytes(record.uri))

    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        list(pool.map(copy, dataset.records))
    return names


def convert_dataset(fmt: str, src: str, out: str, splits: list[str], *, classes: list[str] | None = None,
                    bad_records: str = "error", check_images: str = "header",
                    copy_images: bool = False) -> dict[str, Any]:
    """Convert ``splits`` of the ``fmt`` dataset at ``src`` into COCO files under ``out``; return a
    summary: per split its files and counts, and the ``data.*`` overrides that load the result."""
    if fmt not in ("yolo", "voc"):
        raise ValueError(f"--from must be yolo or voc, got {fmt!r}")
    if fmt == "yolo" and classes:
        raise AnnotationError(f"--classes applies to VOC; a YOLO dataset's classes are its YAML's names ({src})")
    summary: dict[str, Any] = {"from": fmt, "source": src, "splits": {}}
    overrides = ["data.format=coco", f"data.root={out}", "data.synthetic=null"]
    for split in splits:
        report = storage.join(out, "annotations", f"instances_{split}.skipped.jsonl")
        dataset = _load(fmt, src, split, classes=classes, bad_records=bad_records, check_images=check_images,
                        report_uri=report)
        doc = dataset.coco_gt_dict()
        image_root = dataset.image_root
        if copy_images:
            image_root = storage.join(out, "images", split)
            names = _copy_images(dataset, image_root)
            for image in doc["images"]:
                image["file_name"] = names[image["id"]]
        doc["info"] = {"description": f"converted from {fmt} {src} (split {split}) by distillery.platform.datasets.convert",
                       "source_sha256": dataset.annotation_sha256}
        ann_uri = storage.join(out, "annotations", f"instances_{split}.json")
        storage.write_text(ann_uri, json.dumps(doc))
        summary["splits"][split] = {"annotations": ann_uri, "images": image_root, "records": len(dataset),
                                    "objects": len(doc["annotations"]), "skipped": len(dataset.skipped),
                                    "report": report if dataset.skipped else None}
        if split in ("train", "val"):
            overrides += [f"data.{split}_annotations={ann_uri}", f"data.{split}_images={image_root}"]
    summary["overrides"] = overrides
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="fmt", required=True, choices=("yolo", "voc"), help="source format")
    parser.add_argument("src", help="YOLO dataset YAML (or its directory) / VOC root; local path or URI")
    parser.add_argument("--out", required=True, help="output directory (local path or URI)")
    parser.add_argument("--split", action="append", dest="splits",
                        help="split to convert (YOLO: a YAML key; VOC: ImageSets/Main/<NAME>.txt); repeatable; "
                             "default: train and val")
    parser.add_argument("--classes", default=None, help="VOC: comma-separated class list (default: discovered)")
    parser.add_argument("--bad-records", choices=("error", "skip"), default="error")
    parser.add_argument("--check-images", choices=("none", "exists", "header", "decode"), default="header")
    parser.add_argument("--copy-images", action="store_true", help="copy images to OUT/images/<split>/")
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        summary = convert_dataset(args.fmt, args.src, args.out, args.splits or ["train", "val"], classes=classes,
                                  bad_records=args.bad_records, check_images=args.check_images,
                                  copy_images=args.copy_images)
    except AnnotationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
