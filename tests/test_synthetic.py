"""The synthetic dataset: deterministic, valid COCO, real JPEGs, non-contiguous category ids."""

import hashlib
import json
import subprocess
import sys

from PIL import Image

from distillery.platform.datasets.coco import load_coco
from distillery.platform.datasets.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_coco


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_and_seed_sensitive(tmp_path):
    generate_synthetic_coco(tmp_path / "a", train=6, val=3, size=96, seed=5)
    generate_synthetic_coco(tmp_path / "b", train=6, val=3, size=96, seed=5)
    generate_synthetic_coco(tmp_path / "c", train=6, val=3, size=96, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_cli_layout_and_validity(tmp_path):
    out = tmp_path / "ds"
    subprocess.run([sys.executable, "-m", "distillery.platform.datasets.synthetic", "--out", str(out),
                    "--train", "8", "--val", "4", "--size", "96", "--seed", "1"], check=True)
    for split, n in (("train", 8), ("val", 4)):
        files = sorted((out / "images" / split).glob("*.jpg"))
        assert len(files) == n
        with Image.open(files[0]) as im:
            assert im.format == "JPEG" and im.size == (96, 96)
        ds = load_coco(str(out / "annotations" / f"instances_{split}.json"), str(out / "images" / split),
                       check_images="decode")
        assert len(ds) == n
        assert ds.categories.category_ids == tuple(c.id for c in SYNTHETIC_CATEGORIES)
        assert ds.categories.category_ids != tuple(range(1, len(SYNTHETIC_CATEGORIES) + 1))  # has gaps
        assert sum(len(r.labels) for r in ds.records) >= n  # at least one object per image
    doc = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len({a["category_id"] for a in doc["annotations"]}) >= 3
    assert max(sum(1 for a in doc["annotations"] if a["image_id"] == im["id"]) for im in doc["images"]) >= 2
