"""YOLO and Pascal VOC readers: the synthetic COCO dataset written in each official layout reads
back to the same records; every bad record errors naming its file and line/field, or is skipped
and reported as the COCO reader does; the convert CLI round-trips to COCO (pycocotools loads it);
the jobs' split loading dispatches on ``data.format``."""

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import yaml

from distillery.platform.datasets.coco import AnnotationError, load_coco
from distillery.platform.config.sections import ConfigError, DataConfig, load_config
from distillery.platform.config.distill import DistillConfig
from distillery.platform.datasets.voc import load_voc
from distillery.platform.datasets.yolo import label_uri_of, load_yolo

SPLITS = ("train", "val")


def _coco(synthetic_data, split):
    return json.loads((synthetic_data / "annotations" / f"instances_{split}.json").read_text())


def write_yolo(synthetic_data, out):
    """The synthetic dataset in Ultralytics' layout: data.yaml, images/<split>, labels/<split>."""
    names = None
    for split in SPLITS:
        doc = _coco(synthetic_data, split)
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        index = {c["id"]: i for i, c in enumerate(cats)}
        names = [c["name"] for c in cats]
        lines = {img["id"]: [] for img in doc["images"]}
        for ann in doc["annotations"]:
            x, y, w, h = ann["bbox"]
            img = next(i for i in doc["images"] if i["id"] == ann["image_id"])
            W, H = img["width"], img["height"]
            lines[ann["image_id"]].append(f"{index[ann['category_id']]} {(x + w / 2) / W!r} {(y + h / 2) / H!r} "
                                          f"{w / W!r} {h / H!r}")
        for img in doc["images"]:
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(synthetic_data / "images" / split / img["file_name"], out / "images" / split)
            if lines[img["id"]]:  # no file: a background image, as Ultralytics reads it
                stem = img["file_name"].rsplit(".", 1)[0]
                (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines[img["id"]]) + "\n")
    (out / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                   "names": dict(enumerate(names))}))
    return out / "data.yaml"


def write_voc(synthetic_data, out, difficult_first=False):
    """The synthetic dataset in VOC's layout: Annotations/, JPEGImages/, ImageSets/Main/<split>.txt."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        doc = _coco(synthetic_data, split)
        names = {c["id"]: c["name"] for c in doc["categories"]}
        ids = []
        for img in doc["images"]:
            stem = img["file_name"].rsplit(".", 1)[0]
            ids.append(stem)
            shutil.copy(synthetic_data / "images" / split / img["file_name"], out / "JPEGImages")
            root = ET.Element("annotation")
            ET.SubElement(root, "filename").text = img["file_name"]
            size = ET.SubElement(root, "size")
            for tag, v in (("width", img["width"]), ("height", img["height"]), ("depth", 3)):
                ET.SubElement(size, tag).text = str(v)
            for k, ann in enumerate(a for a in doc["annotations"] if a["image_id"] == img["id"]):
                obj = ET.SubElement(root, "object")
                ET.SubElement(obj, "name").text = names[ann["category_id"]]
                ET.SubElement(obj, "truncated").text = "0"
                ET.SubElement(obj, "difficult").text = "1" if (difficult_first and k == 0) else "0"
                box = ET.SubElement(obj, "bndbox")
                x, y, w, h = ann["bbox"]
                for tag, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w + 1), ("ymax", y + h + 1)):
                    ET.SubElement(box, tag).text = repr(v)
            ET.ElementTree(root).write(out / "Annotations" / f"{stem}.xml")
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out


@pytest.fixture(scope="module")
def yolo_clean(synthetic_data, tmp_path_factory):
    return write_yolo(synthetic_data, tmp_path_factory.mktemp("yolo"))


@pytest.fixture(scope="module")
def voc_clean(synthetic_data, tmp_path_factory):
    return write_voc(synthetic_data, tmp_path_factory.mktemp("voc"))


@pytest.fixture()
def yolo(yolo_clean, tmp_path):
    """A private copy that a test may break."""
    shutil.copytree(yolo_clean.parent, tmp_path / "yolo")
    return tmp_path / "yolo" / "data.yaml"


@pytest.fixture()
def voc(voc_clean, tmp_path):
    shutil.copytree(voc_clean, tmp_path / "voc")
    return tmp_path / "voc"


def _same_records(ours, reference):
    """Same images, same objects (class names, crowd flags) and boxes to 1e-6 of the image size."""
    ref = {r.file_name.rsplit("/", 1)[-1]: r for r in reference.records}
    assert sorted(r.file_name.rsplit("/", 1)[-1] for r in ours.records) == sorted(ref)
    for r in ours.records:
        c = ref[r.file_name.rsplit("/", 1)[-1]]
        assert (r.width, r.height) == (c.width, c.height)
        assert [ours.categories.names[i] for i in r.labels] == [reference.categories.names[i] for i in c.labels]
        scale = np.array([r.width, r.height, r.width, r.height], dtype=np.float64)
        np.testing.assert_allclose(r.boxes / scale, c.boxes / scale, rtol=0, atol=1e-6)
        assert r.iscrowd.tolist() == c.iscrowd.tolist()


@pytest.mark.parametrize("split", SPLITS)
def test_yolo_reads_the_same_records_as_coco(yolo_clean, synthetic_data, split):
    coco = load_coco(str(synthetic_data / "annotations" / f"instances_{split}.json"),
                     str(synthetic_data / "images" / split))
    ds = load_yolo(str(yolo_clean), split, check_images="decode")
    _same_records(ds, coco)
    assert ds.categories.category_ids == (0, 1, 2, 3, 4, 5)  # the YOLO class index is the category id
    assert ds.categories.names == coco.categories.names
    assert ds.records[0].file_name == f"images/{split}/{ds.records[0].file_name.rsplit('/', 1)[-1]}"
    assert len(ds.annotation_sha256) == 64
    assert load_yolo(str(yolo_clean.parent), split).annotation_sha256 == ds.annotation_sha256  # dir -> data.yaml


@pytest.mark.parametrize("split", SPLITS)
def test_voc_reads_the_same_records_as_coco(voc_clean, synthetic_data, split):
    coco = load_coco(str(synthetic_data / "annotations" / f"instances_{split}.json"),
                     str(synthetic_data / "images" / split))
    ds = load_voc(str(voc_clean), split, check_images="decode")
    _same_records(ds, coco)
    # Discovered classes are sorted names, over every XML file (so train and val agree).
    assert ds.categories.names == tuple(sorted(coco.categories.names))
    assert ds.categories.category_ids == tuple(range(1, 7))
    assert ds.records[0].file_name.startswith("JPEGImages/")


def test_yolo_names_list_path_and_image_list_file(yolo):
    """names as a list; ``path`` elsewhere; a split given as a .txt list of images (./ = list's dir)."""
    root = yolo.parent
    (root / "lists").mkdir()
    files = sorted(p.name for p in (root / "images" / "val").iterdir())
    (root / "lists" / "val.txt").write_text("".join(f"images/val/{f}\n" for f in files[:3]))
    spec = yaml.safe_load(yolo.read_text())
    moved = root / "cfg" / "data.yaml"
    moved.parent.mkdir()
    moved.write_text(yaml.safe_dump({"path": "..", "train": "images/train", "val": "lists/val.txt",
                                     "names": [spec["names"][i] for i in range(6)]}))
    ds = load_yolo(str(moved), "val")
    assert [r.file_name for r in ds.records] == [f"images/val/{f}" for f in files[:3]]


YOLO_BAD = {
    # name: (label line appended to the first train image's label file, error pattern)
    "four_columns": ("0 0.5 0.5 0.2", r"annotation line 3: has 4 columns"),
    "class_out_of_range": ("6 0.5 0.5 0.1 0.1", r"annotation line 3: class index 6 is not in the dataset YAML's names"),
    "box_outside": ("0 0.95 0.5 0.2 0.2", r"annotation line 3: box cx 0.95 .* lies outside the 128x128 image"),
    "not_numbers": ("0 0.5 zero 0.1 0.1", r"annotation line 3: not all columns are numbers"),
}


def _first_label(yaml_path):
    """The first train label file with two or more objects, cut to two: bad lines land on line 3."""
    path = next(p for p in sorted((yaml_path.parent / "labels" / "train").iterdir())
                if len(p.read_text().splitlines()) >= 2)
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    return path


@pytest.mark.parametrize("case", sorted(YOLO_BAD))
def test_yolo_bad_label_lines_error_or_skip(yolo, tmp_path, case):
    line, pattern = YOLO_BAD[case]
    label = _first_label(yolo)
    clean = load_yolo(str(yolo), "train")
    with label.open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(AnnotationError, match=pattern) as exc:
        load_yolo(str(yolo), "train")
    assert str(exc.value).startswith(str(label) + ": ")
    report = tmp_path / "skipped.jsonl"
    ds = load_yolo(str(yolo), "train", bad_records="skip", report_uri=str(report))
    rows = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(r["file"], r["kind"], r["id"]) for r in rows] == [(str(label), "annotation", "line 3")]
    assert len(ds) == len(clean) and sum(len(r.labels) for r in ds.records) == sum(len(r.labels) for r in clean.records)


def test_yolo_box_tolerance_is_one_pixel_and_clipped(yolo):
    label = _first_label(yolo)
    with label.open("a") as fh:
        fh.write(f"0 0.5 0.5 {1 + 1.5 / 128!r} 0.5\n")  # 0.75 px past each side: float noise, clipped
    name = f"images/train/{label.stem}.jpg"
    rec = next(r for r in load_yolo(str(yolo), "train").records if r.file_name == name)
    np.testing.assert_allclose(rec.boxes[-1], [0, 32, 128, 64], atol=1e-4)
    with label.open("a") as fh:
        fh.write(f"0 0.5 0.5 {1 + 2.5 / 128!r} 0.5\n")  # 1.25 px past: an error
    with pytest.raises(AnnotationError, match="line 4: .*more than 1 px past the border"):
        load_yolo(str(yolo), "train")


def test_yolo_repeated_label_line_is_dropped_with_a_warning(yolo, caplog):
    label = _first_label(yolo)
    first = label.read_text().splitlines()[0]
    again = "  ".join(t + "0" if "." in t else t for t in first.split())  # line 1's numbers, written otherwise
    label.write_text(label.read_text() + again + "\n")
    name = f"images/train/{label.stem}.jpg"
    with caplog.at_level("WARNING"):
        rec = next(r for r in load_yolo(str(yolo), "train").records if r.file_name == name)
    assert len(rec.boxes) == 2
    assert f"{label}: line 3 repeats line 1 (the same class and box): dropped" in caplog.text


def test_yolo_label_without_image_and_missing_image(yolo, tmp_path):
    orphan = yolo.parent / "labels" / "train" / "ghost.txt"
    orphan.write_text("0 0.5 0.5 0.1 0.1\n")
    (yolo.parent / "labels" / "train" / "classes.txt").write_text("circle\n")  # labelling tools' file: ignored
    with pytest.raises(AnnotationError, match=r"ghost.txt: image ghost: missing image for label file"):
        load_yolo(str(yolo), "train")
    ds = load_yolo(str(yolo), "train", bad_records="skip", report_uri=str(tmp_path / "r.jsonl"))
    assert len(ds) == 24 and json.loads((tmp_path / "r.jsonl").read_text())["file"] == str(orphan)
    orphan.unlink()
    first = sorted((yolo.parent / "images" / "train").iterdir())[1]
    first.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(AnnotationError, match=rf"image images/train/{first.name}: image does not decode"):
        load_yolo(str(yolo), "train")


def test_yolo_yaml_errors_name_the_file_and_field(yolo):
    spec = yaml.safe_load(yolo.read_text())
    for doc, pattern in (({**spec, "names": None}, "'names' must be a list"),
                         ({**spec, "nc": 3}, "nc is 3 but 'names' has 6 classes"),
                         ({k: v for k, v in spec.items() if k != "val"}, r"no split 'val' \(has \['train'\]\)"),
                         ({**spec, "val": "images/nowhere"}, r"val: image directory .*images/nowhere does not exist")):
        yolo.write_text(yaml.safe_dump(doc))
        with pytest.raises(AnnotationError, match=pattern) as exc:
            load_yolo(str(yolo), "val")
        assert str(yolo) in str(exc.value)


def test_label_path_rule_is_ultralytics():
    assert label_uri_of("/d/images/train/a.b.jpg") == "/d/labels/train/a.b.txt"
    assert label_uri_of("s3://b/images/x/images/v/1.png") == "s3://b/images/x/labels/v/1.txt"


def _xml(voc, stem):
    path = voc / "Annotations" / f"{stem}.xml"
    return path, ET.parse(path)


def _first_stem(voc):
    return (voc / "ImageSets" / "Main" / "train.txt").read_text().split()[0]


def _break_voc(voc, case):
    stem = _first_stem(voc)
    path, tree = _xml(voc, stem)
    root = tree.getroot()
    if case == "no_size":
        root.remove(root.find("size"))
    elif case == "unknown_class":
        root.find("object").find("name").text = "blob"
    elif case == "box_outside":
        root.find("object").find("bndbox").find("xmax").text = "200"
    elif case == "missing_image":
        (voc / "JPEGImages" / f"{stem}.jpg").unlink()
    elif case == "malformed":
        path.write_text("<annotation><size>")
        return path, stem
    tree.write(path)
    return path, stem


VOC_BAD = {
    "no_size": ("image", r"image {stem}: XML has no <size>"),
    "unknown_class": ("annotation", r"annotation object 1 \('blob'\): unknown class name 'blob'"),
    "box_outside": ("annotation", r"annotation object 1 \('\w+'\): bndbox .*xmax 200 .* lies outside the 128x128"),
    "missing_image": ("image", r"image {stem}: image file is missing: .*JPEGImages/{stem}.jpg"),
    "malformed": ("image", r"image {stem}: malformed XML"),
}


@pytest.mark.parametrize("case", sorted(VOC_BAD))
def test_voc_bad_records_error_or_skip(voc, tmp_path, case):
    classes = sorted(["circle", "square", "triangle", "star", "ring", "cross"])
    clean = load_voc(str(voc), "train", classes=classes)
    path, stem = _break_voc(voc, case)
    kind, pattern = VOC_BAD[case]
    with pytest.raises(AnnotationError, match=pattern.format(stem=stem)) as exc:
        load_voc(str(voc), "train", classes=classes)
    assert str(exc.value).startswith(str(path) + ": ")
    report = tmp_path / "skipped.jsonl"
    ds = load_voc(str(voc), "train", classes=classes, bad_records="skip", report_uri=str(report))
    rows = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(r["file"], r["kind"]) for r in rows] == [(str(path), kind)]
    n_objects = sum(len(r.labels) for r in ds.records)
    if kind == "image":
        assert len(ds) == len(clean) - 1
    else:
        assert len(ds) == len(clean) and n_objects == sum(len(r.labels) for r in clean.records) - 1


def test_voc_difficult_is_crowd_and_entities_are_refused(synthetic_data, tmp_path):
    voc = write_voc(synthetic_data, tmp_path / "voc", difficult_first=True)
    ds = load_voc(str(voc), "train")
    assert all(r.iscrowd[0] and not r.iscrowd[1:].any() for r in ds.records if len(r.labels))
    stem = _first_stem(voc)
    bomb = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxx"><!ENTITY y "&x;&x;&x;&x;">]>'
            "<annotation><filename>&y;</filename></annotation>")
    (voc / "Annotations" / f"{stem}.xml").write_text(bomb)
    with pytest.raises(AnnotationError, match=rf"image {stem}: malformed XML: .*Entit"):
        load_voc(str(voc), "train", classes=["circle"])


def test_voc_split_file_and_duplicate_class_errors(voc):
    with pytest.raises(AnnotationError, match=r"ImageSets/Main/trainval.txt: VOC split list not found"):
        load_voc(str(voc), "trainval")
    with pytest.raises(AnnotationError, match="lists a class twice"):
        load_voc(str(voc), "train", classes=["circle", "circle"])
    with pytest.raises(AnnotationError, match=r"lists a class twice \(names are compared ignoring case"):
        load_voc(str(voc), "train", classes=["circle", "Circle "])


def test_voc_names_differing_in_case_or_spaces_are_one_class(voc, caplog):
    """A labeller typed 'Circle' once and 'circle ' once among the 'circle's: one class, named by
    the most frequent spelling, with a warning naming each spelling and a file that uses it."""
    reference = load_voc(str(voc), "train")
    files = sorted((voc / "Annotations").glob("*.xml"))
    name = max(reference.categories.names, key=lambda n: sum(p.read_text().count(f">{n}<") for p in files))
    label = reference.categories.names.index(name)
    edited = []
    for path in [p for p in files if f">{name}<" in p.read_text()][:2]:
        tree = ET.parse(path)
        obj = next(o for o in tree.getroot().iter("object") if o.findtext("name") == name)
        obj.find("name").text = f" {name}\t" if edited else name.capitalize()
        tree.write(path)
        edited.append(path)
    with caplog.at_level("WARNING"):
        ds = load_voc(str(voc), "train")
    assert ds.categories == reference.categories
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(ds.records, reference.records))
    assert f"VOC class names that differ only in case are one class, {name!r}" in caplog.text
    assert f"{name.capitalize()!r} (1 objects, first in {edited[0]})" in caplog.text
    assert label in np.concatenate([r.labels for r in ds.records])
    assert np.array_equal(load_voc(str(voc), "train", classes=reference.categories.names).records[0].labels,
                          reference.records[0].labels)


def test_convert_cli_round_trip(yolo_clean, voc_clean, synthetic_data, tmp_path):
    from pycocotools.coco import COCO

    from distillery.platform.datasets.convert import main

    out = tmp_path / "from_yolo"
    proc = subprocess.run([sys.executable, "-m", "distillery.platform.datasets.convert", "--from", "yolo", str(yolo_clean),
                           "--out", str(out), "--copy-images"], capture_output=True, text=True, check=True)
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["splits"]["train"]["records"] == 24 and summary["splits"]["val"]["skipped"] == 0
    # --copy-images lays out the COCO tree the default data paths expect.
    cfg = load_config(DataConfig, overrides=[o.removeprefix("data.") for o in summary["overrides"]])
    for split in SPLITS:
        gt = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert len(gt.getImgIds()) == len(_coco(synthetic_data, split)["images"])
        again = load_coco(*cfg.split_paths(split), check_images="decode")
        reference = load_coco(str(synthetic_data / "annotations" / f"instances_{split}.json"),
                              str(synthetic_data / "images" / split))
        _same_records(again, reference)

    out = tmp_path / "from_voc"  # referenced images, a bad record skipped and reported
    (voc_clean / "Annotations" / "ghost.xml").write_text("<annotation/>")
    (voc_clean / "ImageSets" / "Main" / "extra.txt").write_text("ghost\n" + _first_stem(voc_clean) + "\n")
    try:
        with pytest.raises(SystemExit):
            main(["--from", "voc", str(voc_clean), "--out", str(out), "--split", "extra"])
        main(["--from", "voc", str(voc_clean), "--out", str(out), "--split", "extra", "--bad-records", "skip"])
    finally:
        (voc_clean / "Annotations" / "ghost.xml").unlink()
        (voc_clean / "ImageSets" / "Main" / "extra.txt").unlink()
    report = out / "annotations" / "instances_extra.skipped.jsonl"
    assert "XML has no <size>" in json.loads(report.read_text())["reason"]
    gt = COCO(str(out / "annotations" / "instances_extra.json"))
    assert [gt.imgs[i]["file_name"] for i in gt.getImgIds()] == [f"JPEGImages/{_first_stem(voc_clean)}.jpg"]
    assert load_coco(str(out / "annotations" / "instances_extra.json"), str(voc_clean), check_images="decode")


def test_jobs_load_yolo_and_voc_through_data_format(yolo_clean, voc_clean, tmp_path):
    """The split loading the distillation and MoE jobs share, the cache job's synthetic-data step
    and the workers' COCO view of the val split, with ``data.format`` set (no Ray needed)."""
    from distillery.platform.cache.job import CacheFeaturesConfig, ensure_dataset
    from distillery.platform.engine.launch import load_train_val
    from distillery.platform.datasets.formats import coco_split_paths

    with pytest.raises(ConfigError, match=r"data.format: Input should be 'coco', 'yolo' or 'voc'"):
        load_config(DistillConfig, overrides=["data.format=csv"])
    load_config(CacheFeaturesConfig, overrides=["data.format=voc", f"data.root={voc_clean}"])
    for fmt, root in (("yolo", yolo_clean), ("voc", voc_clean)):
        cfg = load_config(DistillConfig, overrides=[f"data.format={fmt}", f"data.root={root}"])
        ensure_dataset(cfg.data)  # no synthetic COCO data generated beside the user's dataset
        assert not (root.parent / "annotations").exists() and not (root / "annotations").exists()
        train, val = load_train_val(cfg.data, str(tmp_path / fmt / "reports"))
        assert (len(train), len(val), train.categories.num_classes) == (24, 8, 6)
        ann, images = coco_split_paths(cfg.data, "val", val, str(tmp_path / fmt / "data"))
        again = load_coco(ann, images, check_images="decode")
        assert again.categories == val.categories
        _same_records(again, val)
        with pytest.raises(ValueError, match=f"data.format is '{fmt}'"):
            cfg.data.split_paths("val")
    bad = load_config(DistillConfig, overrides=["data.format=yolo", f"data.root={yolo_clean}", "data.classes=[a]"])
    with pytest.raises(AnnotationError, match="data.classes applies to VOC"):
        load_train_val(bad.data, str(tmp_path / "r"))


def test_yolo_and_voc_read_from_s3(moto_s3, yolo_clean, voc_clean):
    """Listing (recursive image search, label directories) and reads go through fsspec: the same
    records from S3 as from local disk."""
    from distillery.platform.io import storage

    base = f"s3://{moto_s3['bucket']}/formats"
    fs, _ = storage.filesystem(base)
    fs.put(str(yolo_clean.parent), f"{moto_s3['bucket']}/formats/yolo", recursive=True)
    fs.put(str(voc_clean), f"{moto_s3['bucket']}/formats/voc", recursive=True)
    for remote, local in ((load_yolo(f"{base}/yolo/data.yaml", "val"), load_yolo(str(yolo_clean), "val")),
                          (load_voc(f"{base}/voc", "val"), load_voc(str(voc_clean), "val"))):
        assert remote.records[0].uri.startswith(f"{base}/")
        assert [r.file_name for r in remote.records] == [r.file_name for r in local.records]
        assert remote.annotation_sha256 == local.annotation_sha256  # names in the dataset, not its location
        _same_records(remote, local)


def test_coco_val_with_skipped_records_is_evaluated_on_the_validated_records(synthetic_data, tmp_path):
    """``bad_records: skip`` on a COCO val split: the workers must not reload the original file
    (its bad record would fail there under the default policy); they get the validated records."""
    from distillery.platform.engine.launch import load_train_val
    from distillery.platform.datasets.formats import coco_split_paths

    root = tmp_path / "coco"
    shutil.copytree(synthetic_data, root)
    val_file = root / "annotations" / "instances_val.json"
    doc = json.loads(val_file.read_text())
    doc["annotations"][0]["category_id"] = 999  # unknown category: a bad record
    val_file.write_text(json.dumps(doc))
    cfg = load_config(DistillConfig, overrides=[f"data.root={root}", "data.bad_records=skip"])
    _, val = load_train_val(cfg.data, str(tmp_path / "reports"))
    assert len(val.skipped) == 1
    ann, images = coco_split_paths(cfg.data, "val", val, str(tmp_path / "data"))
    assert ann != str(val_file) and ann.endswith("instances_val.json")
    again = load_coco(ann, images)  # the default policy 'error': nothing bad is left
    _same_records(again, val)
    clean = load_config(DistillConfig, overrides=[f"data.root={synthetic_data}"])
    _, clean_val = load_train_val(clean.data, str(tmp_path / "clean-reports"))
    assert coco_split_paths(clean.data, "val", clean_val, str(tmp_path / "d2")) == clean.data.split_paths("val")
