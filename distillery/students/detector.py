"""What the RT-DETRv4 and DEIMv2 students share, written once: the spec fields of the hybrid encoder,
D-FINE decoder and task (:class:`DetectorSpec`), the reading of ``build_*`` overrides, the decoder
and DSI projector built from a spec, and the detector module (:class:`Detector`): input checks,
``backbone -> encoder -> decoder``, the ``f5`` training output and the component table.

:mod:`.rtdetrv4` and :mod:`.deimv2` add their backbones and their own spec fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeVar

import torch
from torch import nn

from distillery.torch_files import strip_wrapper_prefix

from .decoder import DFINEDecoder

__all__ = ["Detector", "DetectorSpec", "build_decoder", "build_dsi", "check_eval_spatial_size",
           "normalise_overrides", "spec_from_overrides"]


@dataclass(frozen=True)
class DetectorSpec:
    """The architectural numbers every student has (RT-DETRv4's defaults); ``build_*`` overrides any by name."""

    backbone: str
    encoder_hidden_dim: int = 256
    encoder_ffn_dim: int = 1024
    encoder_heads: int = 8
    expansion: float = 1.0
    depth_mult: float = 1.0
    decoder_hidden_dim: int = 256
    decoder_ffn_dim: int = 1024
    decoder_heads: int = 8
    num_decoder_layers: int = 6
    num_queries: int = 300
    num_points: tuple[int, ...] = (3, 6, 3)
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    reg_max: int = 32
    reg_scale: float = 4.0
    eval_idx: int = -1
    num_classes: int = 80
    eval_spatial_size: tuple[int, int] = (640, 640)
    dsi: bool = True
    teacher_dim: int | None = 768
    backbone_weights: str | None = None
    freeze_at: int = -1  # HGNetv2 backbones
    freeze_stem_only: bool = True
    freeze_norm: bool = False
    # Activations: the DEIM / RT-DETRv4 / DEIMv2 recipes use SiLU in the decoder and its MLPs.
    aifi_act: str = "gelu"
    ccff_act: str = "silu"
    decoder_act: str = "silu"
    mlp_act: str = "silu"


Spec = TypeVar("Spec", bound=DetectorSpec)


def normalise_overrides(overrides: dict[str, Any], tuple_fields: Sequence[str] = ("num_points",)) -> dict[str, Any]:
    """Override values in the spec's types (in place, returned): an int or pair ``eval_spatial_size``
    becomes ``(H, W)``, lists in ``tuple_fields`` become int tuples, a path ``backbone_weights`` a str."""
    if "eval_spatial_size" in overrides:
        size = overrides["eval_spatial_size"]
        overrides["eval_spatial_size"] = ((int(size), int(size)) if isinstance(size, int)
                                          else tuple(int(s) for s in size))
    for key in tuple_fields:
        if key in overrides:
            overrides[key] = tuple(int(p) for p in overrides[key])
    if isinstance(overrides.get("backbone_weights"), os.PathLike):
        overrides["backbone_weights"] = os.fspath(overrides["backbone_weights"])
    return overrides


def spec_from_overrides(specs: Mapping[str, Spec], name: str, overrides: dict[str, Any], *, who: str,
                        family: str = "student", tuple_fields: Sequence[str] = ("num_points",)) -> Spec:
    """``specs[name]`` with ``overrides``; an unknown name raises KeyError, an unknown field TypeError."""
    if name not in specs:
        raise KeyError(f"unknown {family} {name!r}; expected one of {sorted(specs)}")
    fields = {f.name for f in dataclasses.fields(specs[name])}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{who}({name!r}): unknown option(s) {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(specs[name], **normalise_overrides(overrides, tuple_fields))


def check_eval_spatial_size(spec: DetectorSpec) -> None:
    if len(spec.eval_spatial_size) != 2 or any(s <= 0 or s % 32 for s in spec.eval_spatial_size):
        raise ValueError(f"eval_spatial_size must be (H, W) multiples of 32, got {spec.eval_spatial_size}")


def build_decoder(spec: DetectorSpec, feat_strides: Sequence[int], **options: Any) -> DFINEDecoder:
    """The D-FINE decoder of ``spec`` over encoder levels at ``feat_strides``; ``options``: DEIMv2's extras."""
    return DFINEDecoder(num_classes=spec.num_classes, hidden_dim=spec.decoder_hidden_dim,
                        num_queries=spec.num_queries, feat_channels=[spec.encoder_hidden_dim] * len(feat_strides),
                        feat_strides=list(feat_strides), num_layers=spec.num_decoder_layers,
                        num_heads=spec.decoder_heads, ffn_dim=spec.decoder_ffn_dim, num_points=spec.num_points,
                        act=spec.decoder_act, mlp_act=spec.mlp_act, num_denoising=spec.num_denoising,
                        label_noise_ratio=spec.label_noise_ratio, box_noise_scale=spec.box_noise_scale,
                        reg_max=spec.reg_max, reg_scale=spec.reg_scale, eval_idx=spec.eval_idx, **options)


def build_dsi(spec: DetectorSpec) -> nn.Linear | None:
    """The training-only DSI projector ``Linear(encoder_hidden, teacher_dim)``, or None when off."""
    if spec.dsi and spec.teacher_dim:
        return nn.Linear(spec.encoder_hidden_dim, int(spec.teacher_dim))
    return None


class Detector(nn.Module):
    """``backbone`` -> ``encoder`` -> ``decoder`` (+ ``dsi``, training-only); subclasses name their
    parts (``modules``, registered in that order), ``kind`` (for messages), ``components`` and
    ``component_prefixes`` (name prefix -> component, first match wins), and may override
    :meth:`features` (what the encoder reads).
    """

    kind = "Detector"
    components: tuple[str, ...] = ()
    component_prefixes: tuple[tuple[str, str], ...] = ()

    def __init__(self, modules: Mapping[str, nn.Module | None], eval_spatial_size: tuple[int, int],
                 spec: DetectorSpec | None, stride: int):
        super().__init__()
        for part, module in modules.items():  # registration order = parameter order (optimizer state)
            setattr(self, part, module)
        self.eval_spatial_size = tuple(eval_spatial_size)
        self.spec = spec
        self.stride = stride

    @property
    def num_classes(self) -> int:
        return self.decoder.num_classes

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(images)

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> dict:
        if not torch.jit.is_tracing():  # shape checks; a trace would only record them as constants
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"{self.kind}: images must be (B, 3, H, W), got shape {tuple(images.shape)}")
            if images.shape[2] % self.stride or images.shape[3] % self.stride:
                raise ValueError(f"{self.kind}: image size {images.shape[2]}x{images.shape[3]} must be a multiple "
                                 f"of {self.stride}")
        fused, f5 = self.encoder(self.features(images))
        out = self.decoder(fused, targets)
        if self.training:
            out["f5"] = f5
        return out

    def component_of(self, param_name: str) -> str:
        """The component (first of ``component_prefixes`` that matches) of a parameter or buffer name."""
        name = strip_wrapper_prefix(param_name)
        for prefix, component in self.component_prefixes:
            if name.startswith(prefix):
                return component
        raise KeyError(f"{self.kind}.component_of: {param_name!r} belongs to no component {self.components}")

    def num_inference_parameters(self) -> int:
        """Parameters of the deployed detector (everything but the training-only DSI projector)."""
        return sum(p.numel() for n, p in self.named_parameters() if self.component_of(n) != "dsi")
