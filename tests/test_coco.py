"""COCO reader: each kind of bad record gives a clear error naming the file and the record;
the skip policy drops it, logs a count and writes every skipped record to a report."""

import json
import shutil

import numpy as np
import pytest

from distillery.platform.datasets.coco import (AnnotationError, CategoryMap, CorruptImageError, decode_image,
                                      load_coco, load_image_resized)


@pytest.fixture()
def dataset(tmp_path, synthetic_data):
    """A private copy of the synthetic train split that a test may break."""
    root = tmp_path / "ds"
    shutil.copytree(synthetic_data / "images" / "train", root / "images")
    ann = root / "ann.json"
    shutil.copy(synthetic_data / "annotations" / "instances_train.json", ann)
    return ann, root / "images"


def _edit(ann, fn):
    doc = json.loads(ann.read_text())
    fn(doc)
    ann.write_text(json.dumps(doc))
    return doc


def test_loads_clean_dataset(dataset):
    ann, images = dataset
    ds = load_coco(str(ann), str(images), check_images="decode")
    assert len(ds) == 24
    assert all(r.boxes.shape == (len(r.labels), 4) for r in ds.records)
    assert all(r.labels.max(initial=0) < ds.categories.num_classes for r in ds.records)
    assert len(ds.annotation_sha256) == 64


def test_category_mapping_is_explicit_and_invertible():
    cm = CategoryMap.from_categories([{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                                      {"id": 44, "name": "bottle"}])
    assert cm.category_ids == (1, 44, 90) and cm.names == ("person", "bottle", "toothbrush")
    assert [cm.to_label(i) for i in (1, 44, 90)] == [0, 1, 2]
    assert [cm.to_category_id(i) for i in (0, 1, 2)] == [1, 44, 90]
    assert CategoryMap.from_dict(cm.to_dict()) == cm


BAD_CASES = {
    "malformed_json": (lambda ann: ann.write_text("{not json"), "malformed JSON"),
    "duplicate_image": (lambda ann: _edit(ann, lambda d: d["images"].append(dict(d["images"][0]))),
                        r"image 1: duplicate image id"),
    "unknown_category": (lambda ann: _edit(ann, lambda d: d["annotations"][0].update(category_id=999)),
                         r"annotation 1: unknown category id 999"),
    "zero_size_bbox": (lambda ann: _edit(ann, lambda d: d["annotations"][0].update(bbox=[5, 5, 0, 10])),
                       r"annotation 1: bbox \[5, 5, 0, 10\] has non-positive size"),
    "bbox_outside": (lambda ann: _edit(ann, lambda d: d["annotations"][0].update(bbox=[100, 100, 60, 10])),
                     r"annotation 1: bbox .* lies outside image"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_annotation_records_error_naming_file_and_record(dataset, case):
    ann, images = dataset
    breaker, pattern = BAD_CASES[case]
    breaker(ann)
    with pytest.raises(AnnotationError, match=pattern) as exc:
        load_coco(str(ann), str(images))
    assert str(ann) in str(exc.value)


def test_missing_and_corrupt_images(dataset):
    ann, images = dataset
    (images / "00000002.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"image 2: image file is missing: .*00000002.jpg"):
        load_coco(str(ann), str(images))
    shutil.copy(images / "00000001.jpg", images / "00000002.jpg")
    (images / "00000003.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(AnnotationError, match=r"image 3: image does not decode.*00000003.jpg"):
        load_coco(str(ann), str(images))
    # A truncated JPEG has a valid header: only a full decode finds it.
    data = (images / "00000004.jpg").read_bytes()
    shutil.copy(images / "00000001.jpg", images / "00000003.jpg")
    (images / "00000004.jpg").write_bytes(data[: len(data) // 3])
    load_coco(str(ann), str(images), check_images="header")
    with pytest.raises(AnnotationError, match=r"image 4: image does not decode"):
        load_coco(str(ann), str(images), check_images="decode")
    with pytest.raises(CorruptImageError, match="00000004.jpg"):
        load_image_resized(str(images / "00000004.jpg"), 64)


def test_skip_policy_reports_every_record(dataset, tmp_path, caplog):
    ann, images = dataset

    def breaks(d):
        d["annotations"][0]["category_id"] = 999
        d["annotations"][1]["bbox"] = [1, 1, -3, 4]
        d["images"].append(dict(d["images"][0]))
    _edit(ann, breaks)
    (images / "00000005.jpg").unlink()
    report = tmp_path / "bad.jsonl"
    with pytest.raises(AnnotationError, match="no report path"):
        load_coco(str(ann), str(images), bad_records="skip")
    ds = load_coco(str(ann), str(images), bad_records="skip", report_uri=str(report))
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == len(ds.skipped) == 4
    assert {(r["kind"], r["id"]) for r in rows} == {("annotation", 1), ("annotation", 2), ("image", 1), ("image", 5)}
    assert all(r["reason"] and r["file"] == str(ann) for r in rows)
    assert 5 not in ds.image_ids and len(ds) == 23
    assert "skipped 4 bad records" in caplog.text


def test_decode_and_resize(synthetic_data):
    img = load_image_resized(str(synthetic_data / "images" / "val" / "00100001.jpg"), 64)
    assert img.shape == (3, 64, 64) and img.dtype == np.uint8
    with pytest.raises(CorruptImageError, match="x.jpg"):
        decode_image(b"nope", "x.jpg")


def test_reads_from_s3(moto_s3, synthetic_data):
    from distillery.platform.io import storage

    base = f"s3://{moto_s3['bucket']}/coco"
    for p in (synthetic_data / "images" / "val").glob("*.jpg"):
        storage.write_bytes(storage.join(base, "images", p.name), p.read_bytes())
    storage.write_bytes(storage.join(base, "val.json"),
                        (synthetic_data / "annotations" / "instances_val.json").read_bytes())
    ds = load_coco(storage.join(base, "val.json"), storage.join(base, "images"), check_images="decode")
    assert len(ds) == 8 and ds.records[0].uri.startswith("s3://")
    assert load_image_resized(ds.records[0].uri, 32).shape == (3, 32, 32)
