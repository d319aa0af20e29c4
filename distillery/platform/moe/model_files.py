"""The MoE-tuning job's model file: plain-PyTorch weights, the vocabulary's phrase embeddings and
the build metadata in one safetensors file (``model.safetensors``); what the registry serves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MODEL_FORMAT = "distillery.open_vocab/v1"
TEXT_KEY = "vocabulary.text_embeddings"  # phrase embeddings stored beside the weights



def build_detector(name: str, phrases: list[str], text: torch.Tensor, input_size: int,
                   overrides: dict[str, Any], moe: dict[str, Any] | None = None):
    """The open-vocabulary detector (dense, or with plain MoE decoder FFNs when ``moe`` is given)."""
    from distillery.students.open_vocab import build_open_vocab, moe_tune_decoder

    options = {**overrides, "eval_spatial_size": input_size}
    model = build_open_vocab(name, phrases, phrase_embeddings=text, **options)
    if moe:
        moe_tune_decoder(model, int(moe["copies"]), int(moe["granularity"]),
                         capacity_factor=moe.get("capacity_factor"),
                         aux_loss_weight=float(moe.get("aux_loss_weight", 0.01)),
                         record_routing=bool(moe.get("record_routing", False)))
    return model


def save_tuned_model(model, path: str | Path, meta: dict[str, Any]) -> None:
    """Weights (plain modules), the vocabulary's embeddings and ``meta`` in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors[TEXT_KEY] = model.text_embeddings.detach().to("cpu", torch.float32).contiguous()
    meta = {"format": MODEL_FORMAT, "phrases": list(model.phrases), **meta}
    save_file(tensors, str(path), metadata={"distillery": json.dumps(meta, default=str)})


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("distillery")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, (json.loads(raw) if raw else None)


def load_tuned_model(path: str | Path):
    """A plain PyTorch detector (dense or MoE, eval mode) from a ``model.safetensors`` of this job."""
    tensors, meta = read_model_file(path)
    if not meta or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a {MODEL_FORMAT} model file (no Distillery metadata)")
    text = tensors.pop(TEXT_KEY)
    model = build_detector(meta["name"], meta["phrases"], text, int(meta["input_size"]), meta["build_options"],
                           meta.get("moe"))
    model.load_state_dict(tensors, strict=True)
    return model.eval()



def weights_from_bytes(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """The weights of a model file read from storage (its vocabulary embeddings dropped)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{uri} is not a readable safetensors file: {exc}") from None
    tensors.pop(TEXT_KEY, None)
    return tensors


