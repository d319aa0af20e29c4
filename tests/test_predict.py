"""jobs/predict.py (distillery.platform.serving.predict): a run directory and a bare release-layout file
in, COCO detections out (checked with pycocotools' loadRes against the synthetic val set), drawn
images and a contact sheet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from distillery.platform.serving.predict import PredictError, main
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
