"""Detect objects in a folder of images with a trained or official student.

    python jobs/predict.py --model runs/train/distill-... --images photos/ --out preds/ --draw
    python jobs/predict.py --model rtv4_hgnetv2_s_coco.pth --student rtdetrv4_s --images photos/ --out preds/
    python jobs/predict.py --model models:/distillery-student@champion --images s3://bucket/imgs --out preds/

Writes preds/detections.json (COCO results), preds/dataset.json and, with --draw, drawn images
and a contact sheet (distillery/platform/serving/predict.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from distillery.platform.errors import exit_on_user_error  # noqa: E402
from distillery.platform.serving.predict import main  # noqa: E402

if __name__ == "__main__":
    exit_on_user_error(main)
