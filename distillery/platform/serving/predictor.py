"""MLflow pyfunc predictor for an exported detector ("model from code": no pickled objects).

Logged with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"onnx": ..., "meta": ...})``.
MLflow stores this source file instead of pickling a Python object, and the weights travel as
the ONNX file, so loading a registered model never unpickles anything from storage.

Input: one RGB image as an (H, W, 3) array of 0-255 pixel values (uint8; integers 0-255 from
JSON are accepted), or a batch (B, H, W, 3) of equal-sized images. Floating-point pixels are
refused, not guessed at: an image in [0, 1] cast to uint8 would be black. The model's signature
declares no input schema on purpose: MLflow would cast a JSON request to the schema's dtype
(floats to uint8) before this code could see them, and report a wrong shape after a dump of the
whole array.
Output: ``{"boxes": (B, K, 4) float32 xyxy in the input image's pixels, "scores": (B, K),
"labels": (B, K) original category ids, "names": (B, K) category names}``, sorted by score
(K = the export's top-k).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

try:  # mlflow is only needed when this file is loaded as a pyfunc model
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    mlflow = None
    MlflowException = Exception
    PythonModel = object


class ImageInputError(MlflowException, ValueError):
    """A request the detector cannot take (shape, dtype, range); HTTP 400 under ``mlflow models
    serve``, with this message as the response's message. (MLflow's scoring server rewrites the
    message of any other MlflowException raised in ``predict`` to start with a dump of the whole
    request, and replaces a plain exception's message by a generic one: the reason would come
    last, after hundreds of characters of pixels.)"""

    def __init__(self, reason: str):
        self._reason = reason
        if mlflow is not None:
            super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)
        else:  # pragma: no cover
            ValueError.__init__(self, reason)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        pass  # the scoring server's "Failed to predict data '<the whole array>'" prefix is dropped

    def __str__(self) -> str:
        return self._reason


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """The same resize as training/evaluation (torchvision bilinear, antialiased)."""
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    t = TF.resize(t, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return t.float().div_(255.0).numpy()


def as_uint8_images(model_input: Any) -> np.ndarray:
    """The request as a (B, H, W, 3) uint8 batch, or a ValueError whose first line says what is
    wrong (shape, dtype, range) without echoing the pixels."""
    images = np.asarray(model_input)
    shape = tuple(images.shape)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ImageInputError(f"image input has shape {shape}: expected one (H, W, 3) RGB image "
                              "or a (B, H, W, 3) batch")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        raise ImageInputError(f"image input has floating-point pixels (dtype {images.dtype}, values in "
                              f"[{low:.3g}, {high:.3g}]): send uint8 RGB values 0-255, e.g. "
                              "(image * 255).round().astype('uint8') for an image in [0, 1]")
    if not np.issubdtype(images.dtype, np.integer):
        raise ImageInputError(f"image input has dtype {images.dtype}: send uint8 RGB values 0-255")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ImageInputError(f"image input has pixel values in [{images.min()}, {images.max()}]: "
                              "expected RGB values 0-255")
    return images.astype(np.uint8)


class DetectorPredictor(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime as ort  # here: an optional dependency, needed only to serve the model

        with open(context.artifacts["meta"]) as fh:
            self.meta: dict[str, Any] = json.load(fh)
        self.size = int(self.meta["input_size"])
        self.category_ids = np.asarray(self.meta["category_ids"], dtype=np.int64)
        self.category_names = np.asarray(self.meta["category_names"], dtype=str)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(context.artifacts["onnx"], providers=providers)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        images = as_uint8_images(model_input)
        b, h, w, _ = images.shape
        outputs = self.session.run(["scores", "labels", "boxes"], {"images": _resize_batch(images, self.size)})
        scores, labels, boxes = (np.asarray(o) for o in outputs)
        # Exported boxes are in the model input's pixels (size x size): back to the image's.
        boxes = boxes.astype(np.float32) * np.asarray([w / self.size, h / self.size] * 2, dtype=np.float32)
        labels = labels.astype(np.int64)
        return {"boxes": boxes, "scores": scores.astype(np.float32), "labels": self.category_ids[labels],
                "names": self.category_names[labels]}


if mlflow is not None:
    mlflow.models.set_model(DetectorPredictor())
