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
:func:`load_teacher_weights` reads one file, ``torch.load(..., weights_only=True)`` or
safetensors (by the ``.safetensors`` suffix), and detects its key layout:

* **Meta's official layout** (``dinov3_vitb16_pretrain_lvd1689m-*.pth``) iff it has a
  ``storage_tokens`` key: the same marker timm's own converter keys on. Those keys are converted
  by calling timm's ``timm.models.eva.checkpoint_filter_fn`` (storage_tokens -> reg_token,
  ``ls1.gamma`` -> ``gamma_1``, ``ls2.gamma`` -> ``gamma_2``, ``qkv.bias`` -> ``q_bias``/``v_bias``
  on ``_qkvb`` models; ``rope_embed.periods``, ``qkv.bias_mask`` and ``mask_token`` dropped).
  Before calling it, :func:`check_meta_checkpoint` verifies what the converter drops silently:
  the RoPE periods must equal the ones timm computes (up to the bf16 rounding Meta stored them
  in), the k-bias mask must keep q and v, and on a model without qkv bias (the plain
  ``vit_base_patch16_dinov3``) the q and v biases must be zero (Meta's B/L/H distilled models
  have all-zero qkv biases; a non-zero one needs the ``_qkvb`` variant).
  One thing we do *not* drop: Meta's model, loaded from its own file, runs with the file's
  bf16-rounded ``rope_embed.periods`` (a persistent buffer there), while timm recomputes them in
  float32. On a ViT-B with random weights that difference alone moves the output grid by up to
  0.3 (cosine 0.9985), so :func:`load_teacher_weights` copies the file's periods into timm's RoPE;
  the teacher then matches Meta's code (and RT-DETRv4's teacher) exactly. The fingerprint records
  it as ``rope_periods: "checkpoint"`` (``"computed"`` for files without periods).
* **timm layout** otherwise (a ``model.state_dict()`` saved with ``torch.save`` or safetensors):
  loaded as is.

A file that has Meta's block names (``ls1.gamma``, ``rope_embed.periods``) but no
``storage_tokens`` is refused rather than guessed at. After conversion the key set must equal the
model's exactly: missing or unexpected keys (and shape mismatches) raise
:class:`TeacherWeightsError` naming the keys, the layout and the file.

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

import contextlib
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.eva import checkpoint_filter_fn as timm_eva_checkpoint_filter
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYER_NAME",
    "DinoV3Teacher",
    "TeacherWeightsError",
    "check_meta_checkpoint",
    "convert_meta_state_dict",
    "detect_checkpoint_layout",
    "fingerprint_diff",
    "fingerprint_digest",
    "load_teacher_weights",
    "read_state_dict",
    "set_rope_periods",
    "sha256_file",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
LAYER_NAME = "final_norm_patch_tokens"

# Containers that training checkpoints wrap a state dict in; unwrapped in timm's order (EMA first).
_CONTAINER_KEYS = ("model_ema", "model", "module", "state_dict")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherWeightsError(ValueError):
    """A teacher weights file that cannot be loaded; the message names the file and the keys."""


# --------------------------------------------------------------------------- hashing / fingerprint

def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- reading checkpoints

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a ``.safetensors`` file or a torch file.

    torch files are read with ``weights_only=True`` (no pickled code from storage). A state dict
    wrapped in a training-checkpoint container (``model_ema``, ``model``, ``module``,
    ``state_dict``) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise TeacherWeightsError(f"could not read teacher weights file {path}: {exc}") from exc

    for key in _CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise TeacherWeightsError(f"teacher weights file {path} holds a {type(obj).__name__}, not a state dict")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise TeacherWeightsError(f"teacher weights file {path}: entries that are not tensors: {not_tensors[:10]}")
    return dict(obj)


def detect_checkpoint_layout(state_dict: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> str:
    """``"meta"`` (Meta's official DINOv3 key names) or ``"timm"``.

    Rule: Meta's layout iff ``storage_tokens`` is a key (the marker timm's converter uses, so the
    two agree). A file with other Meta-only names (``*.ls1.gamma``, ``rope_embed.periods``) but no
    ``storage_tokens`` is refused: timm's converter would leave it half-converted.
    """
    if "storage_tokens" in state_dict:
        return "meta"
    meta_only = sorted(k for k in state_dict if k.endswith((".ls1.gamma", ".ls2.gamma")) or k == "rope_embed.periods")
    if meta_only:
        raise TeacherWeightsError(
            f"teacher weights file {path} has Meta's DINOv3 key names ({meta_only[:3]}...) but no "
            "'storage_tokens' key, so its layout cannot be converted to timm's with confidence")
    return "timm"


def check_meta_checkpoint(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                          path: str | Path = "<state dict>") -> None:
    """Check what timm's converter drops without looking, so that dropping it loses nothing.

    * ``rope_embed.periods``: timm recomputes the RoPE periods instead of loading them; they must
      agree with the checkpoint's (Meta stores them rounded to bf16, hence the 1% tolerance).
    * ``blocks.N.attn.qkv.bias_mask``: Meta multiplies the qkv bias by this mask (it zeroes the k
      part). The converter drops it and keeps the raw q and v biases, right only if the mask is 1
      on q and v. (The k bias adds, per query, the same constant to every key's logit, which the
      softmax cancels: dropping it is exact.)
    * ``blocks.N.attn.qkv.bias`` on a model without qkv bias: the converter skips it, right only if
      its q and v parts are zero.
    """
    periods = state_dict.get("rope_embed.periods")
    rope = getattr(model, "rope", None)
    if periods is not None:
        if rope is None or not hasattr(rope, "periods"):
            raise TeacherWeightsError(f"teacher weights file {path} has rope_embed.periods but the timm model "
                                      "has no DINOv3 RoPE")
        ours = rope.periods.detach().float().cpu()
        if periods.shape != ours.shape or not torch.allclose(periods.float(), ours, rtol=1e-2, atol=0.0):
            raise TeacherWeightsError(
                f"teacher weights file {path}: rope_embed.periods {periods.float().tolist()} differ from the "
                f"periods timm computes for this model {ours.tolist()}; the RoPE base does not match")

    for key, bias in state_dict.items():
        if not key.endswith(".attn.qkv.bias"):
            continue
        q, _, v = bias.float().chunk(3, dim=-1)
        mask = state_dict.get(key + "_mask")
        if mask is not None:
            mq, _, mv = mask.float().chunk(3, dim=-1)
            if not (torch.all(mq == 1) and torch.all(mv == 1)):
                raise TeacherWeightsError(f"teacher weights file {path}: {key}_mask does not keep the q and v "
                                          "biases (expected ones there); timm's converter cannot express it")
        block = key[: -len(".attn.qkv.bias")]
        has_qv_bias = isinstance(getattr(model.get_submodule(block + ".attn"), "q_bias", None), torch.Tensor)
        if not has_qv_bias and (q.abs().max() > 0 or v.abs().max() > 0):
            raise TeacherWeightsError(
                f"teacher weights file {path}: {key} has non-zero q/v biases but the model has no qkv bias; "
                "use the '_qkvb' variant of the timm model (e.g. vit_base_patch16_dinov3_qkvb)")


def convert_meta_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                            path: str | Path = "<state dict>") -> dict[str, torch.Tensor]:
    """Meta's official DINOv3 keys -> timm's, by timm's own converter (after :func:`check_meta_checkpoint`)."""
    check_meta_checkpoint(state_dict, model, path)
    # timm's converter prints one line per block when it skips a qkv bias the model does not have;
    # we have just checked those biases are zero, so the lines are noise.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        converted = timm_eva_checkpoint_filter(dict(state_dict), model)
    if printed.getvalue().strip():
        log.debug("timm checkpoint_filter_fn printed: %s", printed.getvalue().strip())
    return converted


def set_rope_periods(model: nn.Module, periods: torch.Tensor) -> None:
    """Make timm's DINOv3 RoPE use the given periods (Meta's file values) instead of its own."""
    rope = model.rope
    with torch.no_grad():
        rope.periods.copy_(periods.to(rope.periods.dtype))
        # Fixed-size models (dynamic_img_size=False) cache sin/cos at build time: rebuild it.
        if getattr(rope, "pos_embed_cached", None) is not None:
            rope.pos_embed_cached.copy_(rope._create_embed(rope.feat_shape, no_aug=True))


def load_teacher_weights(model: nn.Module, path: str | Path) -> tuple[str, str]:
    """Load a Meta-layout or timm-layout DINOv3 checkpoint into a timm model, strictly.

    Returns ``(layout, rope_periods)``: layout ``"meta"`` or ``"timm"``; rope_periods
    ``"checkpoint"`` when the file's RoPE periods were loaded (Meta files), else ``"computed"``.
    Raises :class:`TeacherWeightsError` naming the file and the keys when the key sets or shapes
    differ.
    """
    state_dict = read_state_dict(path)
    layout = detect_checkpoint_layout(state_dict, path)
    periods = state_dict.get("rope_embed.periods") if layout == "meta" else None
    if layout == "meta":
        state_dict = convert_meta_state_dict(state_dict, model, path)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    converted = ", key names after conversion to timm's" if layout == "meta" else ""
    where = f"teacher weights file {path} ({layout} layout{converted})"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise TeacherWeightsError(f"{where}: " + "; ".join(parts))
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state_dict.items() if v.shape != expected[k].shape]
    if bad_shapes:
        raise TeacherWeightsError(f"{where}: shape mismatch: {bad_shapes}")
    model.load_state_dict(state_dict, strict=True)
    if periods is not None:  # checked against timm's by check_meta_checkpoint
        set_rope_periods(model, periods)
    return layout, ("checkpoint" if periods is not None else "computed")


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

        # Build; the random draw comes from its own seeded RNG stream, not the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # num_classes=0: we only read forward_features; Meta's checkpoints have no head.
            self.model = timm.create_model(model_name, pretrained=False, **{"num_classes": 0, **model_kwargs})
        if not (hasattr(self.model, "patch_embed") and hasattr(self.model, "num_prefix_tokens")
                and getattr(self.model, "rope", None) is not None):
            raise ValueError(f"timm model {model_name!r} is not a DINOv3-style ViT (patch embedding, prefix tokens, "
                             "RoPE); use one of timm's '*_dinov3*' models")
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
            # RT-DETRv4's order: normalise at full resolution, then average-pool.
            x = (images.float() - self.mean) / self.std
            if self.pool > 1:
                x = F.avg_pool2d(x, kernel_size=self.pool, stride=self.pool)
            use_autocast = self.compute_dtype != torch.float32
            with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype, enabled=use_autocast):
                tokens = self.model.forward_features(x)  # (B, prefix + h*w, C), after the final norm
            h, w = self.grid_size
            n_expected = self.num_prefix_tokens + h * w
            if tokens.shape[1] != n_expected:
                raise RuntimeError(f"{self.model_name} returned {tokens.shape[1]} tokens, expected "
                                   f"{self.num_prefix_tokens} prefix + {h}x{w} patches")
            patches = tokens[:, self.num_prefix_tokens:]  # drop CLS + registers
            grid = patches.transpose(1, 2).reshape(images.shape[0], self.embed_dim, h, w)
            return grid.float().contiguous()
