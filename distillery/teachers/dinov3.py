"""The frozen DINOv3 teacher: a timm ViT that maps a student-sized image to a grid of patch features.

What the teacher returns (RT-DETRv4's recipe)
---------------------------------------------
RT-DETRv4 distils DINOv3 ViT-B/16 into the student's AIFI output F5. Its teacher takes the
student's own 640x640 input in [0, 1], normalises it with the ImageNet mean/std, *then*
average-pools it by 2 (320x320), and keeps the final-norm patch tokens of the ViT (DINOv3's
``x_norm_patchtokens``): CLS and the 4 register ("storage") tokens are dropped, and the
(B, 400, 768) tokens are laid out as a (B, 768, 20, 20) grid, the same 20x20 as F5 (stride 32).
:class:`DinoV3Teacher` does exactly that with timm's port of the architecture
(``vit_base_patch16_dinov3``); the input size and the pool factor are configurable.

Frozen means: every parameter has ``requires_grad=False``, the module stays in eval mode even when
a parent calls ``.train()``, and the forward runs under ``torch.no_grad()``. (Not
``inference_mode``: an inference tensor cannot be saved for backward, and an online teacher's
output is an operand of the student's cosine loss.)

Weights
-------
:func:`~distillery.teachers.dinov3_weights.load_teacher_weights` reads Meta's official ``.pth``
(converted with timm's checkpoint filter after checking everything it would drop or resample) or a
timm state dict / safetensors file, strictly: see :mod:`distillery.teachers.dinov3_weights`.

Random initialisation is only for tests and plumbing: it must be asked for
(``allow_random_init=True``), warns loudly, and the fingerprint says ``random-init:seed=<seed>``
where a real teacher has the weights file's sha256.

Fingerprint
-----------
``teacher.fingerprint`` is a plain JSON dict that identifies the features: model name, timm
overrides (``model_kwargs``), weights sha256 (or the random-init marker), input size, pool,
mean, std, layer, where the RoPE periods came from, compute dtype, number of prefix tokens, patch
size and width. The feature cache
stores it; :func:`fingerprint_digest` and :func:`fingerprint_diff` let a reader refuse a cache made
by another teacher and say which fields differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from distillery.teachers.dinov3_weights import load_teacher_weights, sha256_file

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LAYER_NAME", "DinoV3Teacher", "build_dinov3_vit", "fingerprint_diff",
           "fingerprint_digest", "normalise_and_pool", "patch_grid"]

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LAYER_NAME = "final_norm_patch_tokens"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- hashing / fingerprint

def fingerprint_digest(fp: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON form (sorted keys, no spaces) of a teacher fingerprint."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint_diff(a: Mapping[str, Any], b: Mapping[str, Any], _prefix: str = "") -> list[str]:
    """Sorted names of the fields whose values differ between two fingerprints.

    A field present in only one of them counts as differing; nested dicts (``model_kwargs``) are
    compared field by field and reported with dotted names (``model_kwargs.depth``).
    """
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        name = f"{_prefix}{key}"
        if key not in a or key not in b:
            out.append(name)
        elif isinstance(a[key], Mapping) and isinstance(b[key], Mapping):
            out.extend(fingerprint_diff(a[key], b[key], _prefix=name + "."))
        elif a[key] != b[key]:
            out.append(name)
    return out


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"teacher dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return name


# --------------------------------------------------------------------------- the teacher's parts
# Shared by the frozen teacher and by the code that trains one (distillery.teachers.dense_pretrain):
# a trained model must see exactly what the frozen teacher will feed it.

def build_dinov3_vit(model_name: str, model_kwargs: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """The timm DINOv3 ViT a teacher wraps (no head), drawn from its own seeded RNG stream (the
    caller's global RNG is left untouched); refuses a timm model that is not a DINOv3-style ViT."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # num_classes=0: we only read forward_features; Meta's checkpoints have no head.
        model = timm.create_model(model_name, pretrained=False, **{"num_classes": 0, **dict(model_kwargs or {})})
    if not (hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
            and getattr(model, "rope", None) is not None):
        raise ValueError(f"timm model {model_name!r} is not a DINOv3-style ViT (patch embedding, prefix tokens, "
                         "RoPE); use one of timm's '*_dinov3*' models")
    return model


def normalise_and_pool(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, pool: int) -> torch.Tensor:
    """RT-DETRv4's teacher input: (B, 3, S, S) in [0, 1], normalised at full resolution, then
    average-pooled by ``pool``; ``mean``/``std`` are (1, 3, 1, 1)."""
    x = (images.float() - mean) / std
    if pool > 1:
        x = F.avg_pool2d(x, kernel_size=pool, stride=pool)
    return x


def patch_grid(model: nn.Module, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """The final-norm patch tokens of a timm DINOv3 ViT as a (B, C, h, w) grid (CLS and the
    register tokens dropped; row-major patches)."""
    tokens = model.forward_features(x)  # (B, prefix + h*w, C), after the final norm
    h, w = grid_size
    n_prefix = int(model.num_prefix_tokens)
    if tokens.shape[1] != n_prefix + h * w:
        raise RuntimeError(f"{_arch_name(model)} returned {tokens.shape[1]} tokens, expected "
                           f"{n_prefix} prefix + {h}x{w} patches")
    patches = tokens[:, n_prefix:]
    return patches.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], h, w)


def _arch_name(model: nn.Module) -> str:
    return str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__)


# --------------------------------------------------------------------------- the teacher

class DinoV3Teacher(nn.Module):
    """Frozen DINOv3 ViT: (B, 3, S, S) images in [0, 1] -> (B, C, S/(16*pool), S/(16*pool)) float32.

    Args:
        model_name: timm model name (a DINOv3 ViT: ``vit_base_patch16_dinov3`` for RT-DETRv4).
        weights: a Meta-layout or timm-layout checkpoint (``.pth``/``.pt``/``.safetensors``).
        allow_random_init: with ``weights=None``, build a randomly initialised teacher (tests only).
        seed: the seed of that random initialisation (the global RNG is left untouched).
        input_size: side of the square input images (the student's input size).
        pool: average-pooling factor applied after normalisation (2 in RT-DETRv4: 640 -> 320).
        mean, std: per-channel normalisation.
        dtype: compute dtype: float32, or bfloat16/float16 through autocast (weights stay float32);
            the output is float32 either way.
        model_kwargs: timm constructor overrides (tiny test teachers); part of the fingerprint.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_dinov3",
        weights: str | Path | None = None,
        allow_random_init: bool = False,
        seed: int = 0,
        input_size: int = 640,
        pool: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        dtype: torch.dtype | str = torch.float32,
        model_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        model_kwargs = dict(model_kwargs or {})
        try:
            json.dumps(model_kwargs)
        except TypeError as exc:
            raise ValueError("model_kwargs must be JSON-serialisable (they are part of the fingerprint): "
                             f"{exc}") from exc
        if weights is None and not allow_random_init:
            raise ValueError(
                f"DinoV3Teacher({model_name!r}): no weights given. Pass weights=<Meta .pth or timm "
                "state dict/safetensors>, or allow_random_init=True for a random teacher (tests only)")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values, got mean={list(mean)} std={list(std)}")
        if int(pool) < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")

        self.model_name = model_name
        self.model_kwargs = model_kwargs
        self.input_size = int(input_size)
        self.pool = int(pool)
        self.dtype_name = _dtype_name(dtype)
        self.compute_dtype = _DTYPES[self.dtype_name]

        self.model = build_dinov3_vit(model_name, model_kwargs, seed)
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.embed_dim = int(self.model.embed_dim)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)

        pooled = self.input_size // self.pool
        if self.input_size % self.pool or pooled % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} / pool {self.pool} must be an integer multiple of the patch size "
                f"{self.patch_size} (got {self.input_size / self.pool})")
        self.grid_size: tuple[int, int] = (pooled // self.patch_size, pooled // self.patch_size)

        if weights is None:
            weights_id = f"random-init:seed={int(seed)}"
            rope_periods = "computed"
            msg = (f"DinoV3Teacher({model_name!r}) is RANDOMLY INITIALISED (seed={seed}): its features are "
                   "meaningless for distillation; use this only for tests and plumbing")
            warnings.warn(msg, UserWarning, stacklevel=2)
            log.warning(msg)
        else:
            layout, rope_periods = load_teacher_weights(self.model, weights)
            weights_id = sha256_file(weights)
            log.info("teacher %s: loaded %s-layout weights %s (sha256 %s)", model_name, layout, weights, weights_id)

        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

        for p in self.model.parameters():
            p.requires_grad_(False)
        self.train(False)

        self.fingerprint: dict[str, Any] = {
            "model_name": model_name,
            "model_kwargs": dict(sorted(model_kwargs.items())),
            "weights_sha256": weights_id,
            "input_size": self.input_size,
            "pool": self.pool,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "layer": LAYER_NAME,
            "rope_periods": rope_periods,
            "dtype": self.dtype_name,
            "num_prefix_tokens": self.num_prefix_tokens,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
        }

    def train(self, mode: bool = True) -> "DinoV3Teacher":
        """Always eval: the teacher is frozen, whatever mode its parent is put in."""
        return super().train(False)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"teacher input must be a (B, 3, H, W) tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        b, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"teacher input must have 3 channels, got {c} (shape {tuple(images.shape)})")
        if (h, w) != (self.input_size, self.input_size):
            raise ValueError(f"teacher input must be {self.input_size}x{self.input_size} (input_size), "
                             f"got {h}x{w}")
        if not images.is_floating_point():
            raise ValueError(f"teacher input must be float in [0, 1], got dtype {images.dtype}")
        # One reduction per batch (cheap next to a ViT) to catch 0-255 or already-normalised
        # images, which would otherwise give plausible-looking but wrong features (and a bad cache).
        lo, hi = float(images.amin()), float(images.amax())
        if lo < -0.1 or hi > 1.1:
            raise ValueError(f"teacher input must be in [0, 1] (unnormalised), got values in [{lo:.3g}, {hi:.3g}]")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, embed_dim, *grid_size) float32 final-norm patch tokens."""
        self._check_images(images)
        with torch.no_grad():
            x = normalise_and_pool(images, self.mean, self.std, self.pool)
            use_autocast = self.compute_dtype != torch.float32
            with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype, enabled=use_autocast):
                grid = patch_grid(self.model, x, self.grid_size)
            return grid.float().contiguous()
