"""Reading a ``torch.save`` file from disk, safely, with errors a user can act on; state-dict key names
without the wrappers that DDP / DeepSpeed (``module.``) and ``torch.compile`` (``_orig_mod.``) add.

Shared by the teacher and student weights loaders (``distillery.teachers``, ``distillery.students``)
and the platform's model-file readers: plain torch, no platform code. ``torch.load(..., weights_only=True)`` always; before it, the file
is checked to be a torch file at all, so that an empty file, an HTML error page saved as ``.pth``
or a safetensors file under another name are named as such, instead of getting PyTorch's
unpickling message, whose advice (re-run with ``weights_only=False``) would execute the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch

__all__ = ["WRAPPER_PREFIXES", "is_safetensors_file", "load_torch_file", "strip_wrapper_prefix",
           "strip_wrapper_prefixes"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_Value = TypeVar("_Value")


def strip_wrapper_prefix(name: str) -> str:
    """``name`` without any leading ``module.`` / ``_orig_mod.``, in any order and number
    (``_orig_mod.module.decoder.x`` -> ``decoder.x``)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def strip_wrapper_prefixes(state: Mapping[str, _Value]) -> dict[str, _Value]:
    """The same mapping with every key through :func:`strip_wrapper_prefix`."""
    return {strip_wrapper_prefix(key): value for key, value in state.items()}


def _head(path: Path) -> tuple[bytes, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        return f.read(16), size


def is_safetensors_file(path: Path) -> bool:
    """Whether the bytes are safetensors': an 8-byte little-endian header length, then JSON."""
    head, size = _head(path)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    return head[8:9] == b"{" and 0 < header_len < size


def load_torch_file(path: Path, what: str, error: type[Exception]) -> Any:
    """``torch.load(path, weights_only=True)``; any problem raises ``error`` whose first line names
    ``what`` (e.g. "teacher weights file"), the path and the problem."""
    head, size = _head(path)
    if size == 0:
        raise error(f"{what} {path} is empty (0 bytes): not a PyTorch checkpoint or safetensors file "
                    "(an interrupted download or copy?)")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch's zip format / a legacy pickle
        raise error(f"{what} {path} is not a PyTorch checkpoint or safetensors file "
                    f"({size} bytes starting {head[:12]!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        text = str(exc)
        refused = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        if refused:  # not PyTorch's "re-run with weights_only=False": that would run the file's code
            raise error(f"{what} {path} holds Python objects that are not tensors, refused by "
                        f"weights_only=True: {refused.group(1).strip()}") from None
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        first = first.split(". ")[0]  # (PyTorch's reader appends paragraphs of advice)
        raise error(f"could not read {what} {path} (truncated or corrupt?): {first}") from None
