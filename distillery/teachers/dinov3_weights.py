"""Reading DINOv3 weights files into timm's DINOv3 ViTs, strictly.

:func:`load_teacher_weights` reads one file, ``torch.load(..., weights_only=True)`` or
safetensors (by the ``.safetensors`` suffix), and detects its key layout:

* **Meta's official layout** (``dinov3_vitb16_pretrain_lvd1689m-*.pth``) iff it has a
  ``storage_tokens`` key: the same marker timm's own converter keys on. Those keys are converted
  by calling timm's ``timm.models.eva.checkpoint_filter_fn`` (storage_tokens -> reg_token,
  ``ls1.gamma`` -> ``gamma_1``, ``ls2.gamma`` -> ``gamma_2``, ``qkv.bias`` -> ``q_bias``/``v_bias``
  on ``_qkvb`` models). That converter drops some keys without looking and resamples a patch
  embedding of another kernel size; nothing reaches it unchecked:

  - the patch embedding (and every key whose name is the same in both layouts) is compared with
    the model's shape *before* conversion, so a 14x14 kernel is refused, never resampled;
  - ``rope_embed.periods`` must equal the periods timm computes (up to the bf16 rounding Meta
    stored them in), and the file's values are then loaded into timm's RoPE (Meta's model runs
    with them; on a ViT-B the float32/bf16 difference alone moves the output by up to 0.3). The
    fingerprint records ``rope_periods: "checkpoint"``. Any other key with ``rope`` in its name is
    refused, naming it;
  - ``blocks.N.attn.qkv.bias_mask``: Meta's ``LinearKMaskedBias`` multiplies the qkv bias by this
    mask (its files zero the k part). We compute the same product before conversion; the q and v
    parts become timm's ``q_bias``/``v_bias`` and the k part timm's ``k_bias`` buffer. A k bias is
    *not* harmless: RoPE rotates each key after the bias is added, so the bias's contribution to
    a logit depends on the key's position and the softmax does not cancel it. On a model without
    qkv bias (the plain ``vit_*_dinov3``) every part of the masked bias must be zero (Meta's
    B/L/H distilled models have all-zero qkv biases); otherwise the ``_qkvb`` variant is named;
  - a ``qkv.bias`` (or mask) whose length is not 3x the width is a shape error, not skipped;
  - ``local_cls_norm.*`` (Meta applies it only in training, to the CLS and storage tokens of local
    crops; the teacher reads patch tokens in eval mode), ``projectors.*`` (distillation heads)
    and ``mask_token`` (pretraining) are not part of the teacher: dropped with a log line naming
    them.
* **timm layout** otherwise (a ``model.state_dict()`` saved with ``torch.save`` or safetensors):
  loaded as is.

A file that has Meta's block names (``ls1.gamma``, ``rope_embed.periods``) but no
``storage_tokens`` is refused rather than guessed at. After conversion the key set and shapes must
equal the model's exactly; otherwise :class:`TeacherWeightsError` says, on its first line, the file,
how many keys are missing, unexpected and mis-shaped, and which DINOv3 the file looks like
(``this looks like ViT-S/16 (embed dim 384, 12 blocks)``), then names the first few keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.models.eva import checkpoint_filter_fn as timm_eva_checkpoint_filter
from torch import nn

from distillery.errors import DeterministicError
from distillery.torch_files import is_safetensors_file, load_torch_file

__all__ = [
    "TeacherWeightsError",
    "check_meta_checkpoint",
    "convert_meta_state_dict",
    "detect_checkpoint_layout",
    "load_teacher_weights",
    "read_state_dict",
    "set_rope_periods",
    "sha256_file",
    "to_meta_state_dict",
]

log = logging.getLogger(__name__)

# Containers that training checkpoints wrap a state dict in; unwrapped in timm's order (EMA first).
_CONTAINER_KEYS = ("model_ema", "model", "module", "state_dict")
# Meta-layout keys that are not part of a frozen teacher (see the module docstring for why).
_NOT_TEACHER_PREFIXES = ("local_cls_norm.", "projectors.")
_DINOV3_SIZES = {384: ("ViT-S", "vit_small"), 768: ("ViT-B", "vit_base"), 1024: ("ViT-L", "vit_large"),
                 1280: ("ViT-H+", "vit_huge_plus"), 4096: ("ViT-7B", "vit_7b")}
_NAMES_SHOWN = 5


class TeacherWeightsError(ValueError, DeterministicError):
    """A teacher weights file that cannot be loaded; the first line names the file and the problem.
    Deterministic: a Ray Train retry would read the same file again."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- reading a file

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a ``.safetensors`` file or a torch file.

    torch files are read with ``weights_only=True`` (no pickled code from storage). A state dict
    wrapped in a training-checkpoint container (``model_ema``, ``model``, ``module``,
    ``state_dict``) is unwrapped. An absent file raises ``FileNotFoundError``; a directory, an
    empty file, a file of another kind or a corrupt one raise :class:`TeacherWeightsError`.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors"))[:3]
        hint = f"; weights files inside: {inside}" if inside else ""
        raise TeacherWeightsError(f"teacher weights file {path} is a directory, not a file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file not found: {path}")
    if path.suffix == ".safetensors" or is_safetensors_file(path):
        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise TeacherWeightsError(f"teacher weights file {path} is not a readable safetensors file: "
                                      f"{exc}") from exc
    else:
        obj = load_torch_file(path, "teacher weights file", TeacherWeightsError)

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


# --------------------------------------------------------------------------- Meta's layout

def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _qkvb_hint(model: nn.Module) -> str:
    name = _model_name(model)
    if timm.list_models(f"{name}_qkvb"):
        return f"use {name}_qkvb (its qkv bias variant)"
    return "use the '_qkvb' variant of this timm model"


def _masked_qkv_biases(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """``{block prefix: qkv bias * bias_mask}``: the bias Meta's ``LinearKMaskedBias`` really adds."""
    out: dict[str, torch.Tensor] = {}
    for key, bias in state_dict.items():
        if not key.endswith(".attn.qkv.bias"):
            continue
        mask = state_dict.get(key + "_mask")
        if mask is not None and mask.shape == bias.shape:  # (other lengths: a shape error, reported apart)
            if not torch.isfinite(mask).all():
                raise TeacherWeightsError(f"teacher weights file {path}: {key}_mask has non-finite values "
                                          "(Meta's placeholder before initialisation): the file is not a trained model")
            bias = bias * mask.to(bias.dtype)
        out[key.removesuffix(".qkv.bias")] = bias
    return out


def check_meta_checkpoint(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                          path: str | Path = "<state dict>") -> None:
    """Refuse what timm's converter would drop or change without looking (shapes are checked apart).

    * ``rope_embed.periods`` must agree with the periods timm computes (Meta stores them rounded
      to bf16, hence the 1% tolerance); any other key naming ``rope`` is refused.
    * ``qkv.bias * bias_mask`` on a model without qkv bias must be zero (q, k and v parts).
    """
    periods = state_dict.get("rope_embed.periods")
    rope = getattr(model, "rope", None)
    other_rope = sorted(k for k in state_dict if "rope" in k and k != "rope_embed.periods")
    if other_rope:
        raise TeacherWeightsError(f"teacher weights file {path}: RoPE keys {other_rope[:_NAMES_SHOWN]} have no "
                                  "counterpart in timm's DINOv3 and cannot be checked; refusing to drop them")
    if periods is not None:
        if rope is None or not hasattr(rope, "periods"):
            raise TeacherWeightsError(f"teacher weights file {path} has rope_embed.periods but the timm model "
                                      "has no DINOv3 RoPE")
        ours = rope.periods.detach().float().cpu()
        if periods.shape != ours.shape or not torch.allclose(periods.float(), ours, rtol=1e-2, atol=0.0):
            raise TeacherWeightsError(
                f"teacher weights file {path}: rope_embed.periods {periods.float().tolist()} differ from the "
                f"periods timm computes for this model {ours.tolist()}; the RoPE base does not match")

    for block, bias in _masked_qkv_biases(state_dict, path).items():
        has_qkv_bias = isinstance(getattr(model.get_submodule(block), "q_bias", None), torch.Tensor)
        if not has_qkv_bias and bias.abs().max() > 0:
            q, k, v = (float(part.abs().max()) for part in bias.float().chunk(3, dim=-1))
            raise TeacherWeightsError(
                f"teacher weights file {path}: {block}.qkv.bias (times its bias_mask) is non-zero (max |q| {q:.3g}, "
                f"|k| {k:.3g}, |v| {v:.3g}) but {_model_name(model)} has no qkv bias; {_qkvb_hint(model)}")


def _meta_shape_problems(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, str]:
    """Shape mismatches visible before conversion: keys named alike in both layouts, qkv biases."""
    expected = model.state_dict()
    out: dict[str, str] = {}
    for key, value in state_dict.items():
        if key in expected and value.shape != expected[key].shape:
            out[key] = f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        elif key.endswith((".attn.qkv.bias", ".attn.qkv.bias_mask")):
            weight = expected.get(key.split(".qkv.")[0] + ".qkv.weight")
            if weight is not None and value.shape != weight.shape[:1]:
                out[key] = f"{key}: file {tuple(value.shape)} vs model {tuple(weight.shape[:1])} (3 x width)"
    return out


def convert_meta_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                            path: str | Path = "<state dict>") -> dict[str, torch.Tensor]:
    """Meta's official DINOv3 keys -> timm's, by timm's own converter, resampling nothing.

    Biases are masked first (Meta's ``bias * bias_mask``). A tensor whose shape differs from the
    model's keeps the file's shape (the key check reports it) instead of being resampled.
    """
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_NOT_TEACHER_PREFIXES)}
    dropped = sorted(set(state_dict) - set(sd))
    if dropped:
        log.warning("teacher weights file %s: not part of a frozen teacher, not loaded: %s", path, dropped)
    mis_shaped = _meta_shape_problems(sd, model)
    for block, bias in _masked_qkv_biases(sd, path).items():
        if block + ".qkv.bias" not in mis_shaped and block + ".qkv.bias_mask" not in mis_shaped:
            sd[block + ".qkv.bias"] = bias
    expected = model.state_dict()
    kept_aside = {k: sd[k] for k in mis_shaped if k in expected}
    for key in kept_aside:  # timm would resample a patch embedding of another size: hand it the model's own
        sd[key] = expected[key]
    # timm's converter prints one line per block when it skips a qkv bias the model does not have;
    # check_meta_checkpoint verifies those biases are zero, so the lines are noise.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        converted = timm_eva_checkpoint_filter(sd, model)
    if printed.getvalue().strip():
        log.debug("timm checkpoint_filter_fn printed: %s", printed.getvalue().strip())
    converted.update(kept_aside)
    return converted


def _meta_k_biases(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """``{block prefix: masked k bias}`` for the blocks whose masked k bias is not all zero."""
    out = {}
    for block, bias in _masked_qkv_biases(state_dict, path).items():
        k = bias.chunk(3, dim=-1)[1]
        if k.abs().max() > 0:
            out[block] = k
    return out


def set_rope_periods(model: nn.Module, periods: torch.Tensor) -> None:
    """Make timm's DINOv3 RoPE use the given periods (Meta's file values) instead of its own."""
    rope = model.rope
    with torch.no_grad():
        rope.periods.copy_(periods.to(rope.periods.dtype))
        # Fixed-size models (dynamic_img_size=False) cache sin/cos at build time: rebuild it.
        if getattr(rope, "pos_embed_cached", None) is not None:
            rope.pos_embed_cached.copy_(rope._create_embed(rope.feat_shape, no_aug=True))


def to_meta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm DINOv3 ViT's weights in Meta's official key layout: the inverse of
    :func:`convert_meta_state_dict` (what ``torch.save`` of Meta's ``DinoVisionTransformer`` holds).

    ======================================  ============================================
    Meta                                    timm
    ======================================  ============================================
    ``storage_tokens``                      ``reg_token``
    ``blocks.N.ls1.gamma`` / ``ls2.gamma``  ``blocks.N.gamma_1`` / ``gamma_2``
    ``blocks.N.attn.qkv.bias`` (3 x width)  ``q_bias`` / ``k_bias`` / ``v_bias`` (zeros without qkv bias)
    ``blocks.N.attn.qkv.bias_mask``         ones on q and v; on k, ones only where a k bias is non-zero
    ``rope_embed.periods`` (bfloat16)       ``rope.periods`` (recomputed by timm, not in its state dict)
    ``mask_token`` (1, width), zeros        - (pretraining only)
    everything else                         the same name
    ======================================  ============================================

    Meta stores the RoPE periods in bfloat16 and its model runs with those; a file written here
    gives back exactly this model only if the model already runs with bf16-rounded periods
    (:func:`set_rope_periods` with ``rope.periods.bfloat16()``, as a trainer does before training);
    otherwise the loaded teacher differs by that rounding. Refuses a model that is not a timm
    DINOv3 ViT (no ``rope.periods``).
    """
    rope = getattr(model, "rope", None)
    if rope is None or not hasattr(rope, "periods"):
        raise TeacherWeightsError(f"{_model_name(model)} has no DINOv3 RoPE (rope.periods): not a timm DINOv3 ViT")
    dim = int(model.embed_dim)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        if key == "reg_token":
            out["storage_tokens"] = value
        elif key.endswith(".gamma_1"):
            out[key.removesuffix("gamma_1") + "ls1.gamma"] = value
        elif key.endswith(".gamma_2"):
            out[key.removesuffix("gamma_2") + "ls2.gamma"] = value
        elif key.endswith((".attn.q_bias", ".attn.v_bias")):
            continue  # packed into qkv.bias below
        else:
            out[key] = value
    for i, block in enumerate(model.blocks):
        parts = [getattr(block.attn, name, None) for name in ("q_bias", "k_bias", "v_bias")]
        q, k, v = (torch.zeros(dim) if p is None else p.detach().float().cpu().clone() for p in parts)
        k_kept = torch.ones(dim) if bool(k.abs().max() > 0) else torch.zeros(dim)
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, k, v])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), k_kept, torch.ones(dim)])
    out["rope_embed.periods"] = rope.periods.detach().cpu().to(torch.bfloat16)
    out["mask_token"] = torch.zeros(1, dim)
    return out


# --------------------------------------------------------------------------- key report

def _describe_file_model(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, int, int, int] | None:
    """(name like ``ViT-S/16``, width, patch size, blocks) of the DINOv3 the file holds, if recognisable."""
    patch = state_dict.get("patch_embed.proj.weight")
    if patch is None or patch.ndim != 4:
        return None
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    swiglu = any(".mlp.w12." in k or ".mlp.w1." in k or ".mlp.fc1_g." in k for k in state_dict)
    size = _DINOV3_SIZES.get(width, (f"ViT (width {width})", ""))[0]
    if swiglu and size == "ViT-S":
        size = "ViT-S+"
    return f"{size}/{patch_size}", width, patch_size, len(blocks)


def _listed(label: str, names: list[str]) -> str:
    more = f" ... (+{len(names) - _NAMES_SHOWN} more)" if len(names) > _NAMES_SHOWN else ""
    return f"\n  {label} {names[:_NAMES_SHOWN]}{more}"


def check_keys_and_shapes(state_dict: Mapping[str, torch.Tensor], file_state_dict: Mapping[str, torch.Tensor],
                          model: nn.Module, where: str, mis_shaped_before: Mapping[str, str]) -> None:
    """Refuse unless ``state_dict`` fits ``model`` exactly; first line: counts and what the file looks like."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = dict(mis_shaped_before)
    broken_qkv = {k.split(".qkv.")[0] for k in mis_shaped_before if ".qkv.bias" in k}
    for k, v in state_dict.items():
        derived = k.endswith((".q_bias", ".v_bias")) and k.rsplit(".", 1)[0] in broken_qkv
        if k in expected and v.shape != expected[k].shape and k not in mis_shaped and not derived:
            mis_shaped[k] = f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
    if not (missing or unexpected or mis_shaped):
        return
    looks = ""
    described = _describe_file_model(file_state_dict)
    ours = (int(model.embed_dim), int(model.patch_embed.patch_size[0]), len(model.blocks))
    if described and described[1:] != ours:
        looks = (f"; this looks like {described[0]} (embed dim {described[1]}, patch {described[2]}, "
                 f"{described[3]} blocks), "
                 f"not {_model_name(model)} (embed dim {ours[0]}, patch {ours[1]}, {ours[2]} blocks)")
    summary = (f"{where} does not fit {_model_name(model)}: {len(missing)} missing, {len(unexpected)} "
               f"unexpected, {len(mis_shaped)} mis-shaped keys{looks}")
    details = ""
    if missing:
        details += _listed("missing keys", missing)
    if unexpected:
        details += _listed("unexpected keys", unexpected)
    if mis_shaped:
        details += _listed("shape mismatch:", [mis_shaped[k] for k in sorted(mis_shaped)])
    raise TeacherWeightsError(summary + details)


def load_teacher_weights(model: nn.Module, path: str | Path) -> tuple[str, str]:
    """Load a Meta-layout or timm-layout DINOv3 checkpoint into a timm model, strictly.

    Returns ``(layout, rope_periods)``: layout ``"meta"`` or ``"timm"``; rope_periods
    ``"checkpoint"`` when the file's RoPE periods were loaded (Meta files), else ``"computed"``.
    Raises :class:`TeacherWeightsError` naming the file, then the keys, when the key sets or
    shapes differ or a Meta-layout check fails.
    """
    file_sd = read_state_dict(path)
    layout = detect_checkpoint_layout(file_sd, path)
    converted = ", key names after conversion to timm's" if layout == "meta" else ""
    where = f"teacher weights file {path} ({layout} layout{converted})"
    periods, k_biases, mis_shaped = None, {}, {}
    state_dict = file_sd
    if layout == "meta":
        periods = file_sd.get("rope_embed.periods")
        mis_shaped = _meta_shape_problems(file_sd, model)
        state_dict = convert_meta_state_dict(file_sd, model, path)
    check_keys_and_shapes(state_dict, file_sd, model, where, mis_shaped)
    if layout == "meta":
        check_meta_checkpoint(file_sd, model, path)
        k_biases = _meta_k_biases(file_sd, path)
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        for block, k_bias in k_biases.items():  # timm keeps k_bias as a non-persistent buffer
            model.get_submodule(block).k_bias.copy_(k_bias)
    if k_biases:
        log.info("teacher weights file %s: k biases kept by bias_mask loaded in %d blocks", path, len(k_biases))
    if periods is not None:  # checked against timm's by check_meta_checkpoint
        set_rope_periods(model, periods)
    return layout, ("checkpoint" if periods is not None else "computed")
