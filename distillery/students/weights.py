"""Whole-student weights: official release checkpoints, Distillery checkpoints, plain state dicts.

:func:`load_student_weights` reads one file (or a Distillery checkpoint / export directory) into a
built student, strictly: every parameter and buffer of the model must come from the file with its
shape, and nothing may be left over, except for two deliberate cases, both reported in the
returned :class:`WeightsReport`:

* **class-dependent tensors** (the class heads of every decoder layer, which include the
  pre-head of layer 0, the encoder score head, the denoising label embedding): when the file was
  trained on another class count they are re-initialised as a fresh model initialises them, or,
  for the classes a ``class_map`` names, their rows are copied from the file;
* **the DSI projector** (``dsi.*``), a training-only module: a file without one (official
  releases, exported detectors) leaves the model's fresh projector in place; a file with one
  loads into a model that has none by dropping it.

Accepted layouts: an official RT-DETRv4 / DEIMv2 release ``.pth`` (``{"model": state_dict}``
and/or ``{"ema": {"module": state_dict, ...}}``; the EMA weights win when both are present), a
Distillery checkpoint directory (``distillery_state.pt``: its EMA module) or export directory
(``weights.safetensors``), any ``torch.save``d state dict (optionally under ``state_dict`` /
``model`` / ``module``), and ``.safetensors``. Torch files are always read with
``weights_only=True``. Official key names are translated by :mod:`.official`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from distillery.torch_files import load_torch_file, strip_wrapper_prefixes

from . import official
from .errors import WeightsError
from .identify import mismatch_phrase

__all__ = ["COCO_CLASS_NAMES", "WeightsError", "WeightsReport", "class_map_from_names", "is_class_dependent",
           "load_student_weights", "read_student_checkpoint"]

_CLASS_KEY = re.compile(r"^decoder\.(enc_score_head\.(weight|bias)|dec_score_head\.\d+\.(weight|bias)"
                        r"|denoising_class_embed\.weight)$")
_NAMES_SHOWN = 5

# The 80 COCO detection classes in the contiguous order the official releases predict them
# (category ids 1..90 with gaps, remapped to 0..79 by the official data pipeline).
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


@dataclass
class WeightsReport:
    """What :func:`load_student_weights` did; kept on the model as ``model.weights_report``."""

    path: str
    layout: str  # "official-ema", "official-model", "distillery-checkpoint", "state-dict", "safetensors", ...
    loaded: int = 0  # tensors copied from the file
    checkpoint_num_classes: int | None = None
    model_num_classes: int | None = None
    reinitialised: list[str] = field(default_factory=list)  # class-dependent tensors re-initialised
    class_rows_copied: dict[int, int] = field(default_factory=dict)  # model class -> checkpoint class
    kept_init: list[str] = field(default_factory=list)  # training-only tensors absent from the file
    dropped: list[str] = field(default_factory=list)  # training-only tensors the model has no place for

    def summary(self) -> str:
        line = (f"loaded {self.loaded} tensors from {self.path} ({self.layout})")
        if self.reinitialised:
            line += (f"; classes {self.checkpoint_num_classes} -> {self.model_num_classes}: "
                     f"{len(self.reinitialised)} class-dependent tensors re-initialised")
            if self.class_rows_copied:
                line += f" ({len(self.class_rows_copied)} class rows kept through class_map)"
        if self.kept_init:
            line += f"; {len(self.kept_init)} training-only tensors keep their init"
        if self.dropped:
            line += f"; {len(self.dropped)} training-only tensors dropped"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "layout": self.layout, "loaded": self.loaded,
                "checkpoint_num_classes": self.checkpoint_num_classes, "model_num_classes": self.model_num_classes,
                "reinitialised": list(self.reinitialised), "num_reinitialised": len(self.reinitialised),
                "class_rows_copied": {str(k): v for k, v in self.class_rows_copied.items()},
                "kept_init": list(self.kept_init), "dropped": list(self.dropped)}


def is_class_dependent(key: str) -> bool:
    """Whether a (stripped, Distillery-layout) key's leading dimension runs over the classes."""
    return _CLASS_KEY.match(key) is not None


def _torch_load(path: Path) -> Any:
    # (an empty or non-torch file is named as such; never PyTorch's weights_only=False advice)
    return load_torch_file(path, "weights file", WeightsError)


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a loaded torch object, and which layout held it."""
    layout = "state-dict"
    if isinstance(obj, Mapping):
        ema = obj.get("ema")
        if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping):
            obj, layout = ema["module"], "ema"
        elif isinstance(obj.get("model"), Mapping):
            obj, layout = obj["model"], "model"
        else:
            for wrapper in ("state_dict", "module"):
                if isinstance(obj.get(wrapper), Mapping):
                    obj, layout = obj[wrapper], wrapper
                    break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights file {path} holds no state dict (a {type(obj).__name__}; expected a "
                           "mapping of names to tensors, or one under 'ema' -> 'module' / 'model' / 'state_dict')")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"weights file {path}: {len(not_tensors)} entries are not tensors, e.g. "
                           f"{not_tensors[:_NAMES_SHOWN]}")
    return dict(obj), layout


def read_student_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with wrapper prefixes stripped, layout name) of a weights file or directory."""
    path = Path(path)
    if path.is_dir():
        for candidate, layout in (("distillery_state.pt", "distillery-checkpoint"),
                                  ("weights.safetensors", "distillery-export"),
                                  ("export/weights.safetensors", "distillery-export")):
            if (path / candidate).is_file():
                state, _ = read_student_checkpoint(path / candidate)
                return state, layout
        raise FileNotFoundError(f"weights directory {path} holds neither a Distillery checkpoint "
                                "(distillery_state.pt) nor an exported model (weights.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state, layout = load_file(str(path), device="cpu"), "safetensors"
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"could not read safetensors file {path}: {type(exc).__name__}: {exc}") from None
    else:
        state, layout = _unwrap(_torch_load(path), path)
    return strip_wrapper_prefixes(state), layout


def to_model_layout(student_name: str, state: dict[str, torch.Tensor], layout: str, *, vit: nn.Module | None = None,
                    source: str = "official state dict") -> tuple[dict[str, torch.Tensor], str]:
    """Official key names translated (when the file has them) by the parity helper's converter;
    ``vit``: the ViT of the model they go into (see :func:`.official.convert_official_state_dict`)."""
    if official.looks_official(state):
        return official.convert_official_state_dict(student_name, state, vit=vit, source=source), f"official-{layout}"
    return state, layout


def _named_error(error: WeightsError, path: Path, student_name: str, file_state: Mapping[str, torch.Tensor]
                 ) -> WeightsError:
    """``error`` with a first line that names the file and, when it can be told, what the file is
    ("this is a DEIMv2-S checkpoint (...); rtdetrv4_s expects an HGNetv2-B0 one")."""
    phrase = mismatch_phrase(file_state, student_name)
    if phrase is None:
        return error
    return WeightsError(f"weights file {path} does not fit {student_name}: {phrase}\n{error}")


def _checkpoint_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    head = state.get("decoder.enc_score_head.weight")
    if head is None:
        head = state.get("decoder.dec_score_head.0.weight")
    return int(head.shape[0]) if head is not None else None


def _mismatch_error(path: Path, student_name: str, missing: list[str], unexpected: list[str],
                    misshaped: list[str]) -> WeightsError:
    lines = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys in {path} "
             f"for {student_name}"]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            more = f" (+{len(names) - _NAMES_SHOWN} more)" if len(names) > _NAMES_SHOWN else ""
            lines.append(f"  {label}: {', '.join(names[:_NAMES_SHOWN])}{more}")
    return WeightsError("\n".join(lines))


def _class_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Class-dependent modules by state-dict prefix (``decoder.enc_score_head`` ...)."""
    return {name: module for name, module in model.named_modules() if is_class_dependent(f"{name}.weight")}


@torch.no_grad()
def _reinitialise(module: nn.Module) -> None:
    """A class-dependent module as a freshly built decoder initialises it (see DFINEDecoder)."""
    module.reset_parameters()
    if isinstance(module, nn.Linear):  # score heads start at the focal-loss prior of 0.01
        nn.init.constant_(module.bias, -math.log((1 - 0.01) / 0.01))
    elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
        module.weight[module.padding_idx].zero_()


def load_student_weights(model: nn.Module, path: str | os.PathLike, student_name: str,
                         class_map: Mapping[int, int] | None = None) -> WeightsReport:
    """Load ``path`` into ``model`` strictly (see the module docstring); returns the report.

    ``class_map`` maps a model class index to a checkpoint class index: those rows of the
    class-dependent tensors are copied from the file when the class counts differ.
    """
    file_state, layout = read_student_checkpoint(path)
    vit = getattr(getattr(model, "backbone", None), "vit", None)
    try:
        state, layout = to_model_layout(student_name, file_state, layout, vit=vit, source=f"weights file {path}")
    except WeightsError as exc:
        raise _named_error(exc, Path(path), student_name, file_state) from None
    own = model.state_dict()
    report = WeightsReport(path=str(path), layout=layout, checkpoint_num_classes=_checkpoint_num_classes(state),
                           model_num_classes=getattr(model, "num_classes", None))
    has_dsi = any(k.startswith("dsi.") for k in own)
    for key in sorted(k for k in state if k.startswith("dsi.")):
        if not has_dsi:
            report.dropped.append(key)
            del state[key]
    report.kept_init = sorted(k for k in own if k.startswith("dsi.") and k not in state)
    for key in [k for k in state if k.endswith(".num_batches_tracked") and k not in own]:
        del state[key]  # a BatchNorm step counter; frozen norms (freeze_norm) have none

    classes_differ = any(is_class_dependent(k) and k in state and state[k].shape != own[k].shape for k in own)
    missing = sorted(k for k in own if k not in state and k not in report.kept_init)
    unexpected = sorted(k for k in state if k not in own)
    misshaped = sorted(f"{k} (file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
                       for k in own if k in state and state[k].shape != own[k].shape
                       and not (classes_differ and is_class_dependent(k)))
    if missing or unexpected or misshaped:
        raise _named_error(_mismatch_error(Path(path), student_name, missing, unexpected, misshaped), Path(path),
                           student_name, file_state)

    to_load = {k: v for k, v in state.items() if not (classes_differ and is_class_dependent(k))}
    model.load_state_dict({**own, **to_load}, strict=True)
    report.loaded = len(to_load)
    if classes_differ:
        _reinitialise_class_tensors(model, state, class_map or {}, report)
    return report


@torch.no_grad()
def _reinitialise_class_tensors(model: nn.Module, state: Mapping[str, torch.Tensor], class_map: Mapping[int, int],
                                report: WeightsReport) -> None:
    num_file = report.checkpoint_num_classes or 0
    num_model = report.model_num_classes or 0
    bad = {m: c for m, c in class_map.items() if not (0 <= int(m) < num_model and 0 <= int(c) < num_file)}
    if bad:
        raise WeightsError(f"class_map entries out of range (model has {num_model} classes, {report.path} has "
                           f"{num_file}): {dict(list(bad.items())[:_NAMES_SHOWN])}")
    for prefix, module in _class_modules(model).items():
        _reinitialise(module)
        for name, tensor in module.named_parameters(recurse=False):
            key = f"{prefix}.{name}"
            report.reinitialised.append(key)
            source = state[key]
            for model_class, file_class in class_map.items():
                tensor[int(model_class)] = source[int(file_class)].to(tensor.dtype)
    report.class_rows_copied = {int(m): int(c) for m, c in class_map.items()}


def _normalise_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def class_map_from_names(model_names: list[str] | tuple[str, ...],
                         checkpoint_names: list[str] | tuple[str, ...] = COCO_CLASS_NAMES) -> dict[int, int]:
    """``{model class index: checkpoint class index}`` for every model class whose name (case, spaces,
    ``_`` and ``-`` ignored) is one of the checkpoint's; the others get no entry (re-initialised)."""
    index = {_normalise_name(n): i for i, n in enumerate(checkpoint_names)}
    return {i: index[_normalise_name(n)] for i, n in enumerate(model_names) if _normalise_name(n) in index}
