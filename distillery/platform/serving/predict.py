"""Batch prediction with a trained or released student: ``python jobs/predict.py``.

``--model`` is one of:

* a distillation run directory (the Ray Train run storage: ``distillery_model.json`` and
  ``checkpoint_*/``; the checkpoint with the best val AP is used) or one checkpoint directory;
* a directory holding an exported model (``weights.safetensors`` + ``meta.json``, as logged under
  a run's ``export/``), or ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` (the
  registered run's export, downloaded through MLflow);
* a bare weights file (official RT-DETRv4 / DEIMv2 release ``.pth``, a state dict,
  ``.safetensors``): ``--student`` names the architecture; 80 classes are COCO's. An exported
  ``weights.safetensors`` with the export's ``meta.json`` beside it is read as that export.

Images are decoded as photos (``datasets/image_files.py``: EXIF orientation applied, so boxes
are in the displayed image's pixels; 16-bit scaled; CMYK, palette and alpha to RGB). Detections
below ``--score-threshold`` (default :data:`DEFAULT_SCORE_THRESHOLD`) are dropped.

Writes into ``--out``: ``detections.json``, a COCO result list (``image_id``, ``category_id``,
``bbox`` [x, y, w, h] in pixels, ``score``, plus ``category_name`` and ``file_name``) that
``COCO.loadRes`` accepts; ``dataset.json``, the COCO ``images`` and ``categories`` lists those
ids refer to; with ``--draw``, ``drawn/<image>.jpg`` with boxes, labels and scores and
``contact_sheet.jpg``. Image ids are the file names' numbers when every stem is a distinct
integer (COCO and the synthetic set name files that way), else 1..N in sorted order.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

from distillery.platform.datasets.image_files import IMAGE_SUFFIXES, decode_image
from distillery.platform.engine.checkpoints import ENGINE_STATE, best_run_checkpoint
from distillery.platform.errors import DeterministicError
from distillery.platform.io import storage
from distillery.platform.io.weights_source import fetch_registry_export, registry_tracking_uri
from distillery.students import build_student
from distillery.students.postprocess import postprocess
from distillery.students.rtdetrv4 import STUDENT_SPECS
from distillery.students.weights import COCO_CLASS_NAMES, read_student_checkpoint, to_model_layout

__all__ = ["MODEL_JSON", "Detector", "list_images", "load_detector", "main", "predict_images", "run_predict"]

log = logging.getLogger(__name__)
# A distillation run's description of its student (name, input size, classes, overrides), beside its
# checkpoint_* directories: what predict --model <run dir> rebuilds the student from.
MODEL_JSON = "distillery_model.json"
# Detections scoring lower are dropped by default: the untuned 0.0 drew 60-90 boxes on every image.
# Ultralytics keeps conf >= 0.25 and RF-DETR >= 0.5 by default; 0.3 lies between.
DEFAULT_SCORE_THRESHOLD = 0.3
# The official releases predict COCO's 80 classes in this order; these are their category ids.
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                     85, 86, 87, 88, 89, 90)


class PredictError(ValueError, DeterministicError):
    """A model or image input that cannot be used; the message names it."""


@dataclass
class Detector:
    model: torch.nn.Module
    student: str
    input_size: int
    category_ids: list[int]
    category_names: list[str]
    source: str
    weights: str  # the file or checkpoint directory the weights came from


# --------------------------------------------------------------------------- loading the model

def _export_description(export: Path) -> dict[str, Any]:
    """The student description of an export directory (``meta.json`` beside the weights, and the
    run's ``config.yaml`` for architecture overrides when there is one)."""
    meta_path = export / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from None
    missing = [k for k in ("student", "input_size", "category_ids", "category_names")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path} is not a Distillery export's meta.json: it lacks {', '.join(missing)}")
    desc = {"student": meta["student"], "input_size": meta["input_size"],
            "categories": {"category_ids": meta["category_ids"], "names": meta["category_names"]},
            "overrides": {}, "peft": {"method": "none"}}
    config = next((p for p in (export / "config.yaml", export.parent / "config.yaml") if p.is_file()), None)
    if config is not None:  # the run's config: architecture overrides (num_queries ...)
        student = (yaml.safe_load(config.read_text()) or {}).get("student", {})
        desc["overrides"] = student.get("overrides") or {}
        desc["peft"] = student.get("peft") or {"method": "none"}
    return desc


def _description(model_dir: Path) -> tuple[dict[str, Any], Path]:
    """(student description, weights path) of a run / checkpoint / export directory."""
    for run_dir in (model_dir, model_dir.parent):
        if (run_dir / MODEL_JSON).is_file():
            desc = json.loads((run_dir / MODEL_JSON).read_text())
            weights = model_dir if (model_dir / ENGINE_STATE).is_file() else best_run_checkpoint(run_dir)
            return desc, weights
    for export in (model_dir, model_dir / "export"):
        if (export / "meta.json").is_file() and (export / "weights.safetensors").is_file():
            return _export_description(export), export / "weights.safetensors"
    raise FileNotFoundError(f"{model_dir} is neither a distillation run directory ({MODEL_JSON} + checkpoint_*), "
                            "a checkpoint directory nor an export directory (meta.json + weights.safetensors)")


def _file_description(path: Path, student: str | None, input_size: int | None) -> dict[str, Any]:
    """A bare weights file: an exported ``.safetensors`` with the export's ``meta.json`` beside it
    is that export (trained input size, class names and category ids); otherwise the architecture
    comes from ``--student`` and the classes from the file."""
    if path.suffix == ".safetensors" and (path.parent / "meta.json").is_file():
        log.info("%s: using %s beside it (input size, classes)", path, path.parent / "meta.json")
        return _export_description(path.parent)
    if not student:
        raise ValueError(f"--model {path} is a bare weights file: pass --student NAME (e.g. rtdetrv4_s) to say "
                         "which architecture it is")
    state, layout = to_model_layout(student, *read_student_checkpoint(path))
    head = state.get("decoder.enc_score_head.weight")
    if head is None:
        raise ValueError(f"{path} ({layout}) has no decoder.enc_score_head.weight: not a whole {student} model")
    num_classes = int(head.shape[0])
    if num_classes == len(COCO_CLASS_NAMES):
        categories = {"category_ids": list(COCO_CATEGORY_IDS), "names": list(COCO_CLASS_NAMES)}
    else:
        categories = {"category_ids": list(range(1, num_classes + 1)),
                      "names": [f"class_{i}" for i in range(num_classes)]}
    default_size = STUDENT_SPECS[student].eval_spatial_size[0] if student in STUDENT_SPECS else 640
    return {"student": student, "input_size": int(input_size or default_size), "categories": categories,
            "overrides": {}, "peft": {"method": "none"}}


def load_detector(model: str, *, student: str | None = None, input_size: int | None = None,
                  device: str | torch.device = "cpu", tracking_uri: str | None = None) -> Detector:
    """The inference student (eval mode, no DSI projector) behind ``model`` (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="distillery-predict-") as tmp:
        if model.startswith("models:/"):  # the jobs' store (runs/mlflow.db here by default), never created
            path = fetch_registry_export(model, tmp, registry_tracking_uri(tracking_uri, "runs"))
        else:
            path = Path(model)
            if not path.exists():
                raise FileNotFoundError(f"--model {model}: no such file or directory")
        if path.is_dir():
            desc, weights = _description(path)
        else:
            desc, weights = _file_description(path, student, input_size), path
        if student and student != desc["student"]:
            raise ValueError(f"--student {student} but {model} holds a {desc['student']}")
        size = int(input_size or desc["input_size"])
        categories = desc["categories"]
        net = build_student(desc["student"], weights=weights, num_classes=len(categories["category_ids"]),
                            eval_spatial_size=size, dsi=False, teacher_dim=None, peft=desc.get("peft"),
                            **desc.get("overrides", {}))
    log.info("model: %s", net.weights_report.summary())
    return Detector(net.eval().to(device), desc["student"], size, [int(i) for i in categories["category_ids"]],
                    [str(n) for n in categories["names"]], model, str(weights))


# --------------------------------------------------------------------------- images in, detections out

def list_images(images: str) -> list[str]:
    """Image files (by suffix) in a directory or URI, sorted; a single image file is a list of one."""
    if Path(images).is_file() or (storage.is_remote(images) and images.lower().endswith(IMAGE_SUFFIXES)):
        return [images]
    if not storage.exists(images):
        raise FileNotFoundError(f"--images {images}: no such directory")
    names = storage.listdir(images)
    found = [storage.join(images, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    others = [n for n in names if not n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    if not found:
        raise FileNotFoundError(f"--images {images}: no {'/'.join(IMAGE_SUFFIXES)} files there"
                                + (f" ({len(others)} other files, e.g. {others[0]})" if others else ""))
    if others:  # a folder of iPhone .HEIC photos beside JPEGs must not shrink without a word
        log.warning("--images %s: %d files without an image suffix (%s) are left out: %s%s", images, len(others),
                    "/".join(IMAGE_SUFFIXES), ", ".join(others[:5]), ", ..." if len(others) > 5 else "")
    return found


def image_ids(uris: list[str]) -> list[int]:
    stems = [Path(u.rsplit("/", 1)[-1]).stem for u in uris]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(uris) + 1))


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm  # here: optional; without it, one status line

        return tqdm(total=total, unit="img", desc="predict", file=sys.stderr)
    except ImportError:
        class Line:  # one status line, rewritten in place
            done = 0

            def update(self, n: int) -> None:
                self.done += n
                print(f"\rpredict: {self.done}/{total} images", end="", file=sys.stderr, flush=True)

            def close(self) -> None:
                print(file=sys.stderr)

        return Line()


def _load_batch(uris: list[str], size: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """(B, 3, size, size) float in [0, 1] and the original RGB arrays."""
    originals = [decode_image(storage.read_bytes(u), u) for u in uris]
    # The same resize as evaluation (distillery.platform.datasets.coco.load_image_resized), on decoded arrays.
    batch = [TF.resize(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1), [size, size],
                       interpolation=TF.InterpolationMode.BILINEAR, antialias=True) for a in originals]
    return torch.stack(batch).float().div_(255.0), originals


def predict_images(detector: Detector, uris: list[str], *, batch_size: int = 8,
                   score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                   num_top: int = 100, device: str | torch.device = "cpu"
                   ) -> Iterator[tuple[str, int, np.ndarray, list[dict[str, Any]]]]:
    """Per image: (uri, image id, RGB array, its COCO result records above ``score_threshold``)."""
    ids = image_ids(uris)
    progress = _progress(len(uris))
    try:
        for start in range(0, len(uris), batch_size):
            chunk = uris[start:start + batch_size]
            images, originals = _load_batch(chunk, detector.input_size)
            sizes = torch.tensor([[a.shape[1], a.shape[0]] for a in originals], dtype=torch.float32, device=device)
            with torch.inference_mode():
                out = detector.model(images.to(device))
            results = postprocess(out["pred_logits"].float(), out["pred_boxes"].float(), sizes, num_top=num_top)
            for uri, image_id, array, res in zip(chunk, ids[start:], originals, results):
                records = []
                for score, label, box in zip(res["scores"].tolist(), res["labels"].tolist(), res["boxes"].tolist()):
                    if score < score_threshold:
                        continue
                    x0, y0, x1, y1 = box
                    records.append({"image_id": image_id, "category_id": detector.category_ids[label],
                                    "category_name": detector.category_names[label],
                                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                    "score": round(float(score), 5), "file_name": uri.rsplit("/", 1)[-1]})
                yield uri, image_id, array, records
            progress.update(len(chunk))
    finally:
        progress.close()


# --------------------------------------------------------------------------- drawing

def _colour(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label * 7919 + 17)
    return tuple(int(c) for c in rng.integers(64, 256, size=3))


def draw_detections(array: np.ndarray, records: list[dict[str, Any]], category_ids: list[int]):
    """The image (PIL) with each record's box, category name and score drawn on it."""
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 200))
    for r in records:
        x, y, w, h = r["bbox"]
        colour = _colour(category_ids.index(r["category_id"]))
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        text = f"{r['category_name']} {r['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), text)
        draw.rectangle([left, top - (bottom - top) - 2, right + 2, top], fill=colour)
        draw.text((x + 1, y - (bottom - top) - 2), text, fill=(0, 0, 0))
    return image


def contact_sheet(paths: list[Path], out: Path, thumb: int = 256, columns: int = 6, limit: int = 48) -> None:
    """A grid of the first ``limit`` drawn images (thumbnails, file name under each)."""
    paths = paths[:limit]
    rows = max(1, math.ceil(len(paths) / columns))
    sheet = Image.new("RGB", (min(columns, len(paths)) * thumb, rows * (thumb + 14)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img.thumbnail((thumb, thumb))
            x, y = (i % columns) * thumb, (i // columns) * (thumb + 14)
            sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        draw.text((x + 2, y + thumb), path.name[:40], fill=(230, 230, 230))
    _save_image(sheet, out)


def _save_image(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="JPEG", quality=90)
    tmp.replace(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


# --------------------------------------------------------------------------- the job

def run_predict(model: str, images: str, out: str | Path, *, student: str | None = None, draw: bool = False,
                score_threshold: float = DEFAULT_SCORE_THRESHOLD, batch_size: int = 8, device: str = "cpu",
                input_size: int | None = None, num_top: int = 100, tracking_uri: str | None = None) -> dict[str, Any]:
    """Predict every image; write the outputs (module docstring); return a summary."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    if not 0.0 <= score_threshold <= 1.0:  # (NaN fails too) scores are probabilities
        raise ValueError(f"--score-threshold {score_threshold} is outside [0, 1]: detection scores are "
                         f"probabilities (default {DEFAULT_SCORE_THRESHOLD})")
    for flag, value in (("--batch-size", batch_size), ("--num-top", num_top)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if input_size is not None and (input_size < 32 or input_size % 32):
        raise ValueError(f"--input-size {input_size} must be a positive multiple of 32 (the students' stride)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file, not a directory: name a directory "
                              "(detections.json, dataset.json and drawn/ are written into it)")
    out.mkdir(parents=True, exist_ok=True)
    uris = list_images(images)
    detector = load_detector(model, student=student, input_size=input_size, device=device, tracking_uri=tracking_uri)
    drawn_dir = out / "drawn"
    if draw:
        drawn_dir.mkdir(exist_ok=True)
    detections, coco_images, drawn = [], [], []
    for uri, image_id, array, records in predict_images(detector, uris, batch_size=batch_size,
                                                        score_threshold=score_threshold, num_top=num_top,
                                                        device=device):
        name = uri.rsplit("/", 1)[-1]
        coco_images.append({"id": image_id, "file_name": name, "width": int(array.shape[1]),
                            "height": int(array.shape[0])})
        detections += records
        if draw:
            path = drawn_dir / f"{Path(name).stem}.jpg"
            _save_image(draw_detections(array, records, detector.category_ids), path)
            drawn.append(path)
    categories = [{"id": i, "name": n} for i, n in zip(detector.category_ids, detector.category_names)]
    _write_json(out / "dataset.json", {"images": coco_images, "annotations": [], "categories": categories})
    _write_json(out / "detections.json", detections)
    summary = {"model": model, "weights": detector.weights, "student": detector.student, "images": len(coco_images),
               "detections": len(detections), "detections_json": str(out / "detections.json"),
               "dataset_json": str(out / "dataset.json")}
    if draw:
        contact_sheet(drawn, out / "contact_sheet.jpg")
        summary.update(drawn_dir=str(drawn_dir), contact_sheet=str(out / "contact_sheet.jpg"))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Detect objects in images with a Distillery or official student.")
    parser.add_argument("--model", required=True,
                        help="run directory, checkpoint or export directory, models:/name@alias, or a weights file")
    parser.add_argument("--images", required=True, help="image directory (local or s3://) or one image")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--student", help="architecture of a bare weights file, e.g. rtdetrv4_s")
    parser.add_argument("--draw", action="store_true", help="also write images with boxes and a contact sheet")
    parser.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                        help=f"drop detections scoring lower, in [0, 1] (default {DEFAULT_SCORE_THRESHOLD}; "
                             "0 keeps all --num-top, e.g. for COCO AP)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--input-size", type=int, help="model input side (default: the model's)")
    parser.add_argument("--num-top", type=int, default=100, help="detections kept per image before the threshold")
    parser.add_argument("--tracking-uri", help="MLflow store for models:/ (default: MLFLOW_TRACKING_URI, else runs/mlflow.db here, "
                             "the jobs' default; never created)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = run_predict(args.model, args.images, args.out, student=args.student, draw=args.draw,
                              score_threshold=args.score_threshold, batch_size=args.batch_size, device=args.device,
                              input_size=args.input_size, num_top=args.num_top, tracking_uri=args.tracking_uri)
    except (OSError, ValueError, RuntimeError) as exc:  # bad paths, files that do not fit: no traceback
        raise PredictError(str(exc)) from exc
    print(json.dumps(summary))
    return summary
