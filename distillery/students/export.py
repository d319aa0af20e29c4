"""ONNX export of the inference detector (no DSI projector), with optional top-k post-processing.

The exported graph takes ``images`` (B, 3, S, S) float RGB in [0, 1] (dynamic batch) and returns
``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4 normalised cxcywh) and, with
``with_postprocess``, ``scores`` (B, K), ``labels`` (B, K) contiguous labels and ``boxes``
(B, K, 4) xyxy in the *input's* pixels (S x S); a caller that resized an image to S scales the
boxes back by (w / S, h / S). The DSI projector is training-only: it is removed before export, so
the ONNX file holds exactly the inference parameters.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .postprocess import postprocess_batched

__all__ = ["InferenceDetector", "export_onnx", "onnx_parity"]


class InferenceDetector(nn.Module):
    """A detector in eval mode without DSI, returning a tuple (export-friendly)."""

    def __init__(self, model: nn.Module, size: int, num_top: int = 300, with_postprocess: bool = True):
        super().__init__()
        model = copy.deepcopy(model).eval()
        if getattr(model, "dsi", None) is not None:
            model.dsi = None
        self.model = model
        self.size = int(size)
        self.num_top = int(num_top)
        self.with_postprocess = with_postprocess

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        if not self.with_postprocess:
            return logits, boxes
        # (B, 2) of (w, h) = the input size, built from the (dynamic) batch dimension.
        sizes = torch.ones_like(images[:, 0, 0, :2]) * float(self.size)
        scores, labels, xyxy = postprocess_batched(logits, boxes, sizes, self.num_top)
        return logits, boxes, scores, labels, xyxy


def export_onnx(model: nn.Module, path: str | Path, size: int, *, num_top: int = 300, opset: int = 17,
                with_postprocess: bool = True) -> dict[str, Any]:
    """Export ``model`` (an RT-DETRv4-style detector) to ONNX at ``size`` x ``size``; return metadata."""
    if size % 32:
        raise ValueError(f"export size must be a multiple of 32 (the detector's stride), got {size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = InferenceDetector(model, size, num_top, with_postprocess)
    outputs = ["pred_logits", "pred_boxes"] + (["scores", "labels", "boxes"] if with_postprocess else [])
    example = torch.rand(2, 3, size, size)
    with torch.no_grad():
        queries, classes = wrapper.model(example)["pred_logits"].shape[1:]
        wrapper.num_top = num_top = min(num_top, queries * classes)  # K is a constant of the graph
        torch.onnx.export(wrapper, (example,), str(path), input_names=["images"], output_names=outputs,
                          dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                          opset_version=opset, dynamo=False)
    params = sum(p.numel() for p in wrapper.parameters())
    return {"path": str(path), "opset": opset, "size": size, "inputs": ["images"], "outputs": outputs,
            "num_top": num_top, "parameters": params}


def onnx_parity(model: nn.Module, path: str | Path, images: torch.Tensor, size: int, num_top: int = 300
                ) -> dict[str, float]:
    """Max abs differences between onnxruntime and PyTorch on ``images``."""
    import onnxruntime as ort  # only this check needs it, and importing it takes about 0.5 s

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"images": images.numpy()})))
    wrapper = InferenceDetector(model, size, num_top, with_postprocess="scores" in got)
    if "scores" in got:
        wrapper.num_top = got["scores"].shape[1]
    with torch.no_grad():
        ref = dict(zip(names, (t.numpy() for t in wrapper(images))))
    return {f"max_abs_{k}": float(np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64)).max())
            for k in names if k != "labels"}
