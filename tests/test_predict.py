"""jobs/predict.py (distillery.platform.serving.predict): a run directory and a bare release-layout file
in, COCO detections out (checked with pycocotools' loadRes against the synthetic val set), drawn
images and a contact sheet."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from safetensors.torch import save_file

from distillery.platform.serving.predict import PredictError, load_detector, main
from distillery.platform.datasets.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_coco
from distillery.students import build_student

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
OVERRIDES = {"num_queries": 10, "num_denoising": 4}


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    uris = generate_synthetic_coco(root, train=1, val=5, size=64, seed=3)
    return root / "images" / "val", Path(uris["val"])


def _write_run_dir(root: Path) -> Path:
    """What the distillation job leaves in its run storage: the model description and checkpoints
    (the EMA state, trained with a DSI projector); checkpoint 1 has the better AP."""
    run = root / "distill-run"
    categories = {"category_ids": [c.id for c in SYNTHETIC_CATEGORIES], "names": [c.name for c in SYNTHETIC_CATEGORIES]}
    run.mkdir()
    (run / "distillery_model.json").write_text(json.dumps(
        {"student": "rtdetrv4_tiny", "input_size": SIZE, "overrides": OVERRIDES, "peft": {"method": "none"},
         "categories": categories}))
    for epoch, ap in ((1, 0.3), (2, 0.2)):
        torch.manual_seed(epoch)
        model = build_student("rtdetrv4_tiny", num_classes=6, eval_spatial_size=SIZE, teacher_dim=16, **OVERRIDES)
        ckpt = run / f"checkpoint_{epoch:06d}"
        ckpt.mkdir()
        torch.save({"ema": {"module": model.state_dict(), "updates": epoch}, "gam": None, "epoch": epoch,
                    "global_step": epoch * 10}, ckpt / "distillery_state.pt")
        (ckpt / "distillery_state.json").write_text(json.dumps({"epoch": epoch, "metrics": {"AP": ap}}))
    return run


def test_predict_from_a_run_directory_writes_coco_results_and_drawings(tmp_path, val_set):
    images, annotations = val_set
    run = _write_run_dir(tmp_path)
    out = tmp_path / "preds"
    summary = main(["--model", str(run), "--images", str(images), "--out", str(out), "--draw",
                    "--score-threshold", "0.001", "--batch-size", "2", "--device", "cpu"])
    assert summary["images"] == 5 and summary["detections"] > 0
    assert Path(summary["weights"]).name == "checkpoint_000001"  # the best val AP, not the latest

    gt = COCO(str(annotations))
    results = gt.loadRes(str(out / "detections.json"))  # pycocotools' own validation of the records
    assert set(results.getImgIds()) <= set(gt.getImgIds())
    detections = json.loads((out / "detections.json").read_text())
    names = {c.id: c.name for c in SYNTHETIC_CATEGORIES}
    assert all(d["category_name"] == names[d["category_id"]] and d["score"] >= 0.001 for d in detections)
    dataset = json.loads((out / "dataset.json").read_text())
    assert [c["name"] for c in dataset["categories"]] == list(names.values())
    assert COCO(str(out / "dataset.json")).loadRes(str(out / "detections.json")).getImgIds()

    drawn = sorted((out / "drawn").glob("*.jpg"))
    assert [p.stem for p in drawn] == sorted(p.stem for p in images.glob("*.jpg"))
    assert (out / "contact_sheet.jpg").stat().st_size > 0


def test_predict_a_bare_release_file_needs_the_architecture(tmp_path, val_set):
    images, _ = val_set
    torch.manual_seed(0)
    state = build_student("rtdetrv4_tiny", num_classes=80, dsi=False).state_dict()
    release = tmp_path / "rtv4_tiny_coco.pth"
    torch.save({"model": state, "ema": {"module": state, "updates": 1}}, release)
    job = [sys.executable, str(ROOT / "jobs" / "predict.py"), "--model", str(release), "--images", str(images),
           "--out", str(tmp_path / "out"), "--input-size", str(SIZE)]

    # The job's command line: a user error is one "error: ..." block and exit status 2.
    refused = subprocess.run(job, capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and "error: --model" in refused.stderr and "--student" in refused.stderr

    main(job[2:] + ["--student", "rtdetrv4_tiny", "--score-threshold", "0.3"])
    dataset = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert len(dataset["categories"]) == 80 and dataset["categories"][0] == {"id": 1, "name": "person"}
    assert all(d["score"] >= 0.3 for d in json.loads((tmp_path / "out" / "detections.json").read_text()))

    with pytest.raises(PredictError, match="no such directory"):
        main(["--model", str(release), "--student", "rtdetrv4_tiny", "--images", str(tmp_path / "nowhere"),
              "--out", str(tmp_path / "o2")])


# --------------------------------------------------------------------------- photos, exports, defaults

class RedSquareFinder(torch.nn.Module):
    """A detector with one query that finds the red pixels of its input (their extent, score 1):
    where predict puts its box on the original photo is then known exactly."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        r, g, b = images[:, 0], images[:, 1], images[:, 2]
        red = (r > 0.6) & (g < 0.4) & (b < 0.4)
        side = images.shape[-1]
        boxes = []
        for mask in red:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            x0, x1 = xs.min().float() / side, (xs.max().float() + 1) / side
            y0, y1 = ys.min().float() / side, (ys.max().float() + 1) / side
            boxes.append(torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]))
        return {"pred_logits": torch.full((len(images), 1, 1), 10.0), "pred_boxes": torch.stack(boxes)[:, None]}


def test_predict_on_a_rotated_phone_photo_returns_and_draws_boxes_where_it_is_displayed(tmp_path, monkeypatch):
    from test_image_files import phone_jpeg

    from distillery.platform.serving import predict

    displayed = np.full((240, 400, 3), 90, np.uint8)
    displayed[40:120, 80:200] = (220, 20, 20)  # a red card in the displayed top-left
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_2041.jpg").write_bytes(phone_jpeg(np.rot90(displayed, k=1), 6))  # stored turned, tag 6
    detector = predict.Detector(RedSquareFinder(), "red_square_finder", 128, [7], ["card"], "test", "none")
    monkeypatch.setattr(predict, "load_detector", lambda *a, **k: detector)
    main(["--model", "unused", "--images", str(photos), "--out", str(tmp_path / "out"), "--draw", "--device", "cpu"])

    (found,) = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert found["category_id"] == 7 and np.allclose(found["bbox"], [80, 40, 120, 80], atol=4), found["bbox"]
    images = json.loads((tmp_path / "out" / "dataset.json").read_text())["images"]
    assert (images[0]["width"], images[0]["height"]) == (400, 240)
    drawn = np.asarray(Image.open(tmp_path / "out" / "drawn" / "IMG_2041.jpg"))
    assert drawn.shape == (240, 400, 3)
    outline = drawn[40:120, 78:82].astype(int)  # the box's left edge, drawn over grey and red
    assert np.abs(outline - drawn[40:120, 60:62].mean(axis=(0, 1))).mean() > 20


def _export_dir(root: Path) -> Path:
    """What a distillation run logs under export/: weights.safetensors, meta.json (a YOLO dataset's
    classes: ids 0 and 1), config.yaml with the architecture overrides."""
    export = root / "export"
    export.mkdir()
    torch.manual_seed(0)
    model = build_student("rtdetrv4_tiny", num_classes=2, eval_spatial_size=SIZE, dsi=False, **OVERRIDES)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / "weights.safetensors"))
    (export / "meta.json").write_text(json.dumps({"input_size": SIZE, "category_ids": [0, 1],
                                                  "category_names": ["bolt", "nut"], "student": "rtdetrv4_tiny",
                                                  "checkpoint_epoch": 3, "metrics": {"AP": 0.2}}))
    (export / "config.yaml").write_text(yaml.safe_dump({"student": {"overrides": OVERRIDES}}))
    return export


def test_a_bare_exported_weights_file_uses_the_meta_json_beside_it(tmp_path):
    export = _export_dir(tmp_path)
    detector = load_detector(str(export / "weights.safetensors"), student="rtdetrv4_tiny")
    assert (detector.input_size, detector.category_ids, detector.category_names) == (SIZE, [0, 1], ["bolt", "nut"])
    assert load_detector(str(export)).category_ids == [0, 1]  # the directory: the same description
    (export / "meta.json").write_text(json.dumps({"input_size": SIZE}))
    with pytest.raises(ValueError, match=r"meta\.json is not a Distillery export's meta\.json: it lacks student"):
        load_detector(str(export / "weights.safetensors"), student="rtdetrv4_tiny")


def test_a_run_directory_gives_the_first_of_equal_best_aps(tmp_path):
    run = _write_run_dir(tmp_path)
    for name, ap in (("checkpoint_000001", 0.3), ("checkpoint_000002", 0.3)):
        record = json.loads((run / name / "distillery_state.json").read_text())
        (run / name / "distillery_state.json").write_text(json.dumps({**record, "metrics": {"AP": ap}}))
    assert Path(load_detector(str(run)).weights).name == "checkpoint_000001"  # as the summary and the registry
    for name in ("checkpoint_000001", "checkpoint_000002"):
        (run / name / "distillery_state.json").write_text(json.dumps({"epoch": int(name[-1]), "metrics": {}}))
    assert Path(load_detector(str(run)).weights).name == "checkpoint_000002"  # no AP anywhere: the latest


REFUSED = [  # (options a new user tries, the first line of the error)
    (["--score-threshold", "1.5"], r"--score-threshold 1\.5 is outside \[0, 1\]: detection scores are probabilities"),
    (["--score-threshold", "-0.1"], r"--score-threshold -0\.1 is outside \[0, 1\]"),
    (["--score-threshold", "nan"], r"--score-threshold nan is outside \[0, 1\]"),
    (["--batch-size", "0"], r"--batch-size 0 must be at least 1$"),
    (["--num-top", "0"], r"--num-top 0 must be at least 1$"),
    (["--input-size", "100"], r"--input-size 100 must be a positive multiple of 32"),
    (["--input-size", "0"], r"--input-size 0 must be a positive multiple of 32"),
]


@pytest.mark.parametrize("options,first_line", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_bad_options_are_refused_before_any_work(tmp_path, val_set, options, first_line):
    images, _ = val_set
    with pytest.raises(PredictError) as info:
        main(["--model", str(tmp_path / "nothing"), "--images", str(images), "--out", str(tmp_path / "out"), *options])
    assert re.match(first_line, str(info.value).splitlines()[0]), str(info.value)
    assert not (tmp_path / "out").exists()


def test_image_files_predict_cannot_read_are_named(tmp_path, caplog):
    """A folder of iPhone photos: .HEIC files beside JPEGs are left out with a warning naming them;
    one given alone is refused saying what it is; TIFF and uppercase suffixes are read."""
    from distillery.platform.serving.predict import list_images

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "IMG_0001.JPG")
    Image.new("RGB", (8, 8)).save(photos / "scan.tiff")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    (photos / "IMG_0002.HEIC").write_bytes(heic)
    with caplog.at_level("WARNING"):
        assert [Path(u).name for u in sorted(list_images(str(photos)))] == ["IMG_0001.JPG", "scan.tiff"]
    assert "1 files without an image suffix" in caplog.text and "IMG_0002.HEIC" in caplog.text
    with pytest.raises(PredictError, match=r"^image does not decode: .*IMG_0002\.HEIC: a HEIC/HEIF/AVIF photo"):
        main(["--model", str(_export_dir(tmp_path)), "--images", str(photos / "IMG_0002.HEIC"),
              "--out", str(tmp_path / "out")])


def test_the_default_score_threshold_is_stated_in_help():
    help_text = subprocess.run([sys.executable, str(ROOT / "jobs" / "predict.py"), "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    assert "default 0.3" in " ".join(help_text.split())
