"""MLflow pyfunc predictor for an exported detector ("model from code": no pickled objects).

Logged with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"onnx": ..., "meta": ...})``.
MLflow stores this source file instead of pickling a Python object, and the weights travel as
the ONNX file, so loading a registered model never unpickles anything from storage.

Input: one RGB image as an (H, W, 3) uint8 array, or a batch (B, H, W, 3) of equal-sized images.
Output: ``{"boxes": (B, K, 4) float32 xyxy in the input image's pixels, "scores": (B, K),
"labels": (B, K) original category ids}``, sorted by score (K = the export's top-k).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

try:  # mlflow is only needed when this file is loaded as a pyfunc model
    import mlflow
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    mlflow = None
    PythonModel = object


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """The same resize as training/evaluation (torchvision bilinear, antialiased)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    t = TF.resize(t, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return t.float().div_(255.0).numpy()


class DetectorPredictor(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime as ort

        with open(context.artifacts["meta"]) as fh:
            self.meta: dict[str, Any] = json.load(fh)
        self.size = int(self.meta["input_size"])
        self.category_ids = np.asarray(self.meta["category_ids"], dtype=np.int64)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(context.artifacts["onnx"], providers=providers)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) image or a (B, H, W, 3) batch, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB pixels, got dtype {images.dtype}")
        b, h, w, _ = images.shape
        outputs = self.session.run(["scores", "labels", "boxes"], {"images": _resize_batch(images, self.size)})
        scores, labels, boxes = (np.asarray(o) for o in outputs)
        # Exported boxes are in the model input's pixels (size x size): back to the image's.
        boxes = boxes.astype(np.float32) * np.asarray([w / self.size, h / self.size] * 2, dtype=np.float32)
        return {"boxes": boxes, "scores": scores.astype(np.float32),
                "labels": self.category_ids[labels.astype(np.int64)]}


if mlflow is not None:
    mlflow.models.set_model(DetectorPredictor())
