"""RT-DETRv4 student detectors: HGNetv2 + hybrid encoder (AIFI + CCFF) + D-FINE decoder (+ DSI projector).

Sizes (``build_student(name)``), from the official configs ``configs/rtv4/rtv4_hgnetv2_*_coco.yml``
over ``configs/dfine/dfine_hgnetv2_*_coco.yml`` and ``configs/base/{dfine_hgnetv2,rtv4}.yml``:

============  ========  ======================  ==========================  ======  ===============
name          backbone  encoder hidden / FFN    CCFF expansion / depth      layers  params / GFLOPs
============  ========  ======================  ==========================  ======  ===============
rtdetrv4_s    B0        256 / 1024              0.5 / 0.34                  3       10 M / 25
rtdetrv4_m    B2        256 / 1024              1.0 / 0.67                  4       19 M / 57
rtdetrv4_l    B4        256 / 1024              1.0 / 1.0                   6       31 M / 91
rtdetrv4_x    B5        384 / 2048              1.0 / 1.0                   6       62 M / 202
============  ========  ======================  ==========================  ======  ===============

Shared: decoder hidden 256, FFN 1024, 8 heads, points per level [3, 6, 3], 300 queries,
100 denoising queries (label noise 0.5, box noise 1.0), reg_max 32, reg_scale 4 (X: 8),
SiLU in decoder and CCFF, GELU in AIFI; 640 x 640 input; DSI projector ``Linear(hidden, 768)``
(DINOv3 ViT-B/16). Params/GFLOPs are the paper's, for the inference model (no DSI projector).
``rtdetrv4_tiny`` is the same model with small numbers, for tests and CPU runs.

Images go in as float RGB in [0, 1], unnormalised, as in the reference (its data pipeline does
no mean/std normalisation); height and width must be multiples of 32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from .backbone import HGNetv2Backbone
from .decoder import DFINEDecoder
from .criterion import OFFICIAL_CRITERION_OPTIONS
from .deimv2 import DEIMv2, apply_backbone_peft
from .families import StudentFamily, family_of
from .detector import Detector, DetectorSpec, build_decoder, build_dsi, check_eval_spatial_size, spec_from_overrides
from .encoder import HybridEncoder
from .weights import load_student_weights

__all__ = ["COMPONENTS", "RTDETRv4", "STUDENT_SPECS", "StudentSpec", "build_student"]

COMPONENTS = ("backbone", "aifi", "ccff", "decoder", "dsi")


@dataclass(frozen=True)
class StudentSpec(DetectorSpec):
    """Every architectural number of an RT-DETRv4 student (all in :class:`~.detector.DetectorSpec`);
    ``build_student`` overrides any of them by name."""


STUDENT_SPECS: dict[str, StudentSpec] = {
    "rtdetrv4_s": StudentSpec(backbone="hgnetv2_b0", expansion=0.5, depth_mult=0.34, num_decoder_layers=3),
    "rtdetrv4_m": StudentSpec(backbone="hgnetv2_b2", expansion=1.0, depth_mult=0.67, num_decoder_layers=4),
    "rtdetrv4_l": StudentSpec(backbone="hgnetv2_b4", expansion=1.0, depth_mult=1.0, num_decoder_layers=6),
    "rtdetrv4_x": StudentSpec(backbone="hgnetv2_b5", encoder_hidden_dim=384, encoder_ffn_dim=2048, expansion=1.0,
                              depth_mult=1.0, num_decoder_layers=6, reg_scale=8.0),
    # Same classes, small numbers: CPU tests and smoke training. Not a paper model.
    "rtdetrv4_tiny": StudentSpec(backbone="hgnetv2_b0", encoder_hidden_dim=64, encoder_ffn_dim=128, encoder_heads=4,
                                 expansion=0.5, depth_mult=0.34, decoder_hidden_dim=64, decoder_ffn_dim=128,
                                 decoder_heads=4, num_decoder_layers=2, num_queries=30, num_denoising=20,
                                 eval_spatial_size=(256, 256)),
}


class RTDETRv4(Detector):
    """RT-DETRv4 detector: ``backbone`` -> ``encoder`` (``encoder.aifi`` + CCFF) -> ``decoder``; ``dsi`` for training.

    ``model(images)`` in **eval** mode, ``images`` (B, 3, H, W) float in [0, 1], returns::

        {"pred_logits": (B, Q, C) class logits (sigmoid scores, no background class),
         "pred_boxes":  (B, Q, 4) boxes, normalised (cx, cy, w, h)}

    ``model(images, targets)`` in **train** mode (``targets``: list of ``{"labels": (n,) long,
    "boxes": (n, 4) normalised cxcywh}``, used for the denoising queries; may be ``None``) returns
    what :class:`~distillery.students.criterion.RTDETRv4Criterion` reads::

        pred_logits, pred_boxes       final decoder layer, matching queries only (B, Q, ...)
        pred_corners                  (B, Q, 4 * (reg_max + 1)) edge-bin logits of that layer
        ref_points                    (B, Q, 4) the layer-0 box every layer refines (detached)
        aux_outputs                   list over the other decoder layers (first to second-to-last) of
                                      {pred_logits, pred_boxes, pred_corners, ref_points,
                                       teacher_corners, teacher_logits} (teacher = final layer)
        pre_outputs                   {pred_logits, pred_boxes}: layer 0's coarse box
        enc_aux_outputs               [{pred_logits, pred_boxes}]: the selected encoder proposals
        reg_scale, up                 floats, FDR constants
        dn_outputs, dn_pre_outputs,   present when denoising ran (targets given with >= 1 object):
        dn_meta                       per-layer dicts for the denoising queries and a DenoisingMeta
        f5                            (B, encoder_hidden, H/32, W/32) AIFI output, for the DSI loss

    ``dsi`` (``nn.Linear(encoder_hidden, teacher_dim)`` or ``None``) is never called by
    ``forward``: the training step computes ``dsi_loss(out["f5"], teacher_grid, model.dsi)``.
    """

    kind = "RTDETRv4"
    components = COMPONENTS
    component_prefixes = (("encoder.aifi.", "aifi"), ("backbone.", "backbone"), ("encoder.", "ccff"),
                          ("decoder.", "decoder"), ("dsi.", "dsi"))

    def __init__(self, backbone: HGNetv2Backbone, encoder: HybridEncoder, decoder: DFINEDecoder,
                 dsi: nn.Module | None = None, eval_spatial_size: tuple[int, int] = (640, 640),
                 spec: StudentSpec | None = None):
        super().__init__({"backbone": backbone, "encoder": encoder, "decoder": decoder, "dsi": dsi},
                         eval_spatial_size, spec, stride=max(backbone.strides))


def build_student(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None, *,
                  class_map: Mapping[int, int] | None = None, peft: dict[str, Any] | None = None,
                  **overrides) -> RTDETRv4 | DEIMv2:
    """A student by size name (``rtdetrv4_s|m|l|x|tiny``, ``deimv2_*``), any spec field overridable.

    ``weights``: a whole-model weights file or directory, loaded after the build by
    :func:`~.weights.load_student_weights` (official RT-DETRv4 / DEIMv2 release ``.pth``, with its
    ``ema`` weights when present; a Distillery checkpoint or export; a plain state dict;
    ``.safetensors``), strictly. When its class count differs from ``num_classes``, only the
    class-dependent tensors are re-initialised (``class_map``: ``{model class: file class}`` rows
    copied instead); ``model.weights_report`` (:class:`~.weights.WeightsReport`) says what happened.
    ``num_classes`` None: the spec's (80, COCO).

    Common overrides: ``num_classes``, ``dsi`` (False -> ``model.dsi is None``), ``teacher_dim``
    (None -> no DSI), ``num_queries``, ``num_decoder_layers``, ``eval_spatial_size`` (int or
    (H, W)), ``backbone_weights`` (a local ``.pth`` / ``.safetensors`` file in timm layout),
    ``freeze_at`` / ``freeze_stem_only`` / ``freeze_norm``. Unknown names raise ``TypeError``.

    ``deimv2_*`` names are DEIMv2 students with the same interface, built by
    :func:`~.deimv2.build_deimv2` (its :class:`~.deimv2.DEIMv2Spec` fields are the overrides).
    Each family registers its sizes and builder in :mod:`.families`.

    ``peft`` (``{"method": "adaroute" | "lora" | "none", **apply_peft options}``) freezes a DEIMv2
    ViT backbone and inserts adapters (:func:`~.deimv2.apply_backbone_peft`); the report is kept
    as ``model.peft_report``. RT-DETRv4's CNN backbone has no PEFT and raises ``ValueError``.
    """
    if num_classes is not None:
        overrides["num_classes"] = int(num_classes)
    peft = dict(peft or {})
    method = peft.pop("method", "none")
    family = family_of(name)
    if method != "none" and not family.peft:
        raise ValueError(f"build_student({name!r}, peft={method!r}): PEFT adapters need a ViT backbone "
                         f"(deimv2_s/m/l/x or deimv2_tiny); {family.name} {name} fine-tunes its backbone fully")
    model = family.build(name, **overrides)
    if weights is not None:  # before the adapters: the file holds the plain model's keys
        model.weights_report = load_student_weights(model, weights, name, class_map=class_map)
    if method != "none":
        model.peft_report = apply_backbone_peft(model, method, **peft)
    return model


def _build_rtdetrv4(name: str, **overrides) -> RTDETRv4:
    return build_from_spec(spec_from_overrides(STUDENT_SPECS, name, overrides, who="build_student"))


def build_from_spec(spec: StudentSpec) -> RTDETRv4:
    """Assemble the modules described by ``spec``."""
    check_eval_spatial_size(spec)
    backbone = HGNetv2Backbone(spec.backbone, weights=spec.backbone_weights, freeze_at=spec.freeze_at,
                               freeze_stem_only=spec.freeze_stem_only, freeze_norm=spec.freeze_norm)
    encoder = HybridEncoder(in_channels=backbone.out_channels, hidden_dim=spec.encoder_hidden_dim,
                            num_heads=spec.encoder_heads, ffn_dim=spec.encoder_ffn_dim, aifi_act=spec.aifi_act,
                            expansion=spec.expansion, depth_mult=spec.depth_mult, act=spec.ccff_act)
    decoder = build_decoder(spec, backbone.strides)
    return RTDETRv4(backbone, encoder, decoder, build_dsi(spec), spec.eval_spatial_size, spec)


FAMILY = StudentFamily("RT-DETRv4", STUDENT_SPECS, _build_rtdetrv4,
                       criterion_options={n: OFFICIAL_CRITERION_OPTIONS[n] for n in STUDENT_SPECS})
