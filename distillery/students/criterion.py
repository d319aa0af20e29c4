"""Training loss of RT-DETRv4 students: the DEIM loss set on a D-FINE decoder.

Losses per set of predictions (weights of the official ``configs/base/rtv4.yml``):

* ``loss_mal`` (1.0): DEIM's Matchability-Aware Loss, a BCE over every (query, class) with
  soft targets: for a matched query the target of its object's class is ``IoU^gamma`` and its
  weight 1; every other entry has target 0 and weight ``p^gamma`` (focal down-weighting of easy
  negatives), ``gamma = 1.5``. Unlike VFL, low-IoU matches are not pushed to near-zero
  targets with a tiny weight, so the sparse matches of early training still teach.
* ``loss_bbox`` (5.0): L1 of normalised ``cxcywh`` boxes; ``loss_giou`` (2.0): ``1 - GIoU``.
* ``loss_fgl`` (0.15): D-FINE's Fine-Grained Localisation loss, a distribution focal loss on the
  edge-distance bins of matched queries (the true distance split between its two neighbouring
  bins), weighted by the IoU of the predicted box.
* ``loss_ddf`` (1.5): D-FINE's Decoupled Distillation Focal loss (GO-LSD): every intermediate
  layer's bin distribution is pulled (KL, temperature 5) toward the last layer's; matched
  queries weighted by IoU, the others by the last layer's max class probability, the two sets
  averaged separately and mixed with weights ``sqrt(count)``.

Which predictions: the final decoder layer (``loss_*``), each intermediate layer
(``loss_*_aux_i``), the layer-0 coarse box (``loss_*_pre``), the encoder's selected proposals
(``loss_*_enc_0``), and the denoising queries (``loss_*_dn_i``, ``loss_*_dn_pre``).

Matching (Hungarian, :mod:`.matcher`) is done per set. The classification loss uses each set's
own matching; box and localisation losses use D-FINE's *union set* ("GO indices"): the pairs
matched by any of final / intermediate / pre / encoder sets, one object per query (the pair found
most often wins), normalised by its size. Denoising queries are matched by construction.
Normalisers (number of objects, size of the union set) are averaged over ranks when
``torch.distributed`` is initialised, as in the reference.

Dense O2O (DEIM) is a data-side change (mosaic / mixup raise the number of objects per image
so that one-to-one matching yields more positives); on the loss side it needs nothing beyond
one-to-one matching and normalisation by the (larger) number of objects. The one thing that
depends on the epoch is DEIMv2's matcher change (:mod:`.matcher`): :meth:`RTDETRv4Criterion.set_epoch`
hands the epoch to the matcher, as the official criterion's ``forward(..., epoch)`` does.

Per size (:data:`OFFICIAL_CRITERION_OPTIONS`, :func:`criterion_options`): the official recipes'
settings, keyed by student name. RT-DETRv4 (``configs/base/rtv4.yml``): MAL, boxes, FGL/DDF, union
set, no matcher change. DEIMv2 (``configs/base/deimv2.yml`` and ``configs/deimv2/*.yml``): the
same losses, plus the matcher change with ``iou_order_alpha`` 4 at epoch 136 / 100 / 80 / 50 / 45
for N / S / M / L / X; Pico / Femto / Atto use MAL and boxes only (``losses: [mal, boxes]``), no
union set (``use_uni_set: False``), matcher change at epoch 450.

The DSI loss is not part of this criterion: see :func:`distillery.students.dsi.dsi_loss`, whose
weight GAM controls.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou

from .box_ops import cxcywh_to_xyxy, edge_distance_bins
from .denoising import DenoisingMeta
from .families import family_of
from .matcher import HungarianMatcher

__all__ = ["DEFAULT_LOSS_WEIGHTS", "OFFICIAL_CRITERION_OPTIONS", "RTDETRv4Criterion", "build_criterion",
           "criterion_options", "union_matching"]

DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "loss_mal": 1.0,
    "loss_bbox": 5.0,
    "loss_giou": 2.0,
    "loss_fgl": 0.15,
    "loss_ddf": 1.5,
}

# The official recipes' criterion settings per student (build_criterion options); every other
# option (loss weights, MAL gamma 1.5, matcher costs 2 / 5 / 2, focal alpha 0.25 / gamma 2) is the
# same for every size and is build_criterion's default. The tiny sizes take S's settings.
_IOU_ORDER = {"iou_order_alpha": 4.0}
_ULTRALIGHT = {"local_losses": False, "use_union_set": False, "matcher_change_epoch": 450, **_IOU_ORDER}
OFFICIAL_CRITERION_OPTIONS: dict[str, dict[str, Any]] = {
    "rtdetrv4_s": {}, "rtdetrv4_m": {}, "rtdetrv4_l": {}, "rtdetrv4_x": {}, "rtdetrv4_tiny": {},
    "deimv2_x": {"matcher_change_epoch": 45, **_IOU_ORDER},
    "deimv2_l": {"matcher_change_epoch": 50, **_IOU_ORDER},
    "deimv2_m": {"matcher_change_epoch": 80, **_IOU_ORDER},
    "deimv2_s": {"matcher_change_epoch": 100, **_IOU_ORDER},
    "deimv2_n": {"matcher_change_epoch": 136, **_IOU_ORDER},
    "deimv2_pico": dict(_ULTRALIGHT), "deimv2_femto": dict(_ULTRALIGHT), "deimv2_atto": dict(_ULTRALIGHT),
    "deimv2_tiny": {"matcher_change_epoch": 100, **_IOU_ORDER},
}

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def union_matching(indices_sets: list[Indices]) -> Indices:
    """D-FINE's union of matchings: per image, every (query, object) pair found by any set, one per query.

    A query matched to different objects by different sets keeps the object it was matched to
    most often (ties: the smaller object index). Result per image: queries ascending.
    """
    result = []
    for per_image in zip(*indices_sets):
        rows = torch.cat([r for r, _ in per_image])
        cols = torch.cat([c for _, c in per_image])
        if rows.numel() == 0:
            result.append((rows.long(), cols.long()))
            continue
        pairs, counts = torch.unique(torch.stack([rows, cols], 1), dim=0, return_counts=True)  # sorted by (row, col)
        # Stable sorts: by count descending, then by row; the first entry of each row is its winner.
        order = torch.sort(-counts, stable=True).indices
        order = order[torch.sort(pairs[order, 0], stable=True).indices]
        ranked = pairs[order]
        first = torch.ones(ranked.shape[0], dtype=torch.bool)
        first[1:] = ranked[1:, 0] != ranked[:-1, 0]
        chosen = ranked[first]
        result.append((chosen[:, 0].long(), chosen[:, 1].long()))
    return result


def _global_average_count(count: int, device: torch.device) -> float:
    """``count`` averaged over ranks (sum / world size) when distributed, at least 1."""
    value = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return max(float(value.item()), 1.0)


class RTDETRv4Criterion(nn.Module):
    """DEIM loss set for D-FINE-decoder outputs; ``criterion(outputs, targets) -> {name: weighted loss}``.

    ``outputs`` is the train-mode dict of :class:`distillery.students.rtdetrv4.RTDETRv4` (extra
    keys such as ``f5`` are ignored); ``targets`` a list, one dict per image, with ``labels``
    (LongTensor (n,)) and ``boxes`` (FloatTensor (n, 4), normalised ``cxcywh``); ``n`` may be 0.
    Every returned value is already multiplied by its weight; their sum is the detection loss.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None,
                 weight_dict: Mapping[str, float] | None = None, mal_gamma: float = 1.5,
                 mal_alpha: float | None = None, ddf_temperature: float = 5.0, use_union_set: bool = True,
                 local_losses: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for key, value in (weight_dict or {}).items():
            if key not in DEFAULT_LOSS_WEIGHTS:
                raise KeyError(f"RTDETRv4Criterion: unknown loss weight {key!r}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
            weights[key] = float(value)
        self.weight_dict = weights
        self.mal_gamma = mal_gamma
        self.mal_alpha = mal_alpha
        self.ddf_temperature = ddf_temperature
        self.use_union_set = use_union_set
        # FGL / DDF; the official DEIMv2 Pico/Femto/Atto recipes leave them out (losses: [mal, boxes]).
        self.local_losses = local_losses

    def set_epoch(self, epoch: int) -> None:
        """The training epoch the next losses belong to (DEIMv2's matcher change reads it)."""
        set_epoch = getattr(self.matcher, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    # ------------------------------------------------------------------------------------ losses
    @staticmethod
    def _batch_index(indices: Indices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src = torch.cat([src for src, _ in indices]).to(device)
        return batch, src

    @staticmethod
    def _matched_targets(targets, indices: Indices, key: str, device: torch.device) -> torch.Tensor:
        return torch.cat([t[key][j.to(t[key].device)] for t, (_, j) in zip(targets, indices)]).to(device)

    def loss_mal(self, outputs: dict, targets, indices: Indices, num_boxes: float, num_classes: int) -> torch.Tensor:
        logits = outputs["pred_logits"].float()  # losses in fp32 even when the model ran under autocast
        idx = self._batch_index(indices, logits.device)
        pred_boxes = outputs["pred_boxes"][idx].float()
        target_boxes = self._matched_targets(targets, indices, "boxes", logits.device).to(pred_boxes.dtype)
        ious = torch.diag(box_iou(cxcywh_to_xyxy(pred_boxes),
                                  cxcywh_to_xyxy(target_boxes))).detach()
        classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64, device=logits.device)
        classes[idx] = self._matched_targets(targets, indices, "labels", logits.device).long()
        onehot = F.one_hot(classes, num_classes + 1)[..., :-1].to(logits.dtype)
        score = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        score[idx] = ious.to(logits.dtype)
        target = (score.unsqueeze(-1) * onehot).pow(self.mal_gamma)
        prob = logits.sigmoid().detach()
        negative_weight = prob.pow(self.mal_gamma) * (1 - onehot)
        if self.mal_alpha is not None:
            negative_weight = self.mal_alpha * negative_weight
        weight = negative_weight + onehot
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
        return loss.sum() / num_boxes

    def loss_boxes(self, outputs: dict, targets, indices: Indices, num_boxes: float) -> dict[str, torch.Tensor]:
        boxes = outputs["pred_boxes"].float()
        idx = self._batch_index(indices, boxes.device)
        src = boxes[idx]
        tgt = self._matched_targets(targets, indices, "boxes", boxes.device).to(src.dtype)
        l1 = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": l1, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_local(self, outputs: dict, targets, indices: Indices, num_boxes: float, reg_scale: float, up: float,
                   ddf_balance: dict) -> dict[str, torch.Tensor]:
        """FGL on matched queries; DDF toward the teacher layer when the output carries one."""
        if "pred_corners" not in outputs:
            return {}
        corners = outputs["pred_corners"].float()
        bins = corners.shape[-1] // 4
        reg_max = bins - 1
        idx = self._batch_index(indices, corners.device)
        target_boxes = self._matched_targets(targets, indices, "boxes", corners.device).to(corners.dtype)
        target_xyxy = cxcywh_to_xyxy(target_boxes)
        matched_corners = corners[idx].reshape(-1, bins)
        ref = outputs["ref_points"][idx].detach().float()
        left_bin, weight_right, weight_left = edge_distance_bins(ref, target_xyxy, reg_max, reg_scale, up)
        pred_xyxy = cxcywh_to_xyxy(outputs["pred_boxes"][idx].float())
        ious = torch.diag(box_iou(pred_xyxy, target_xyxy)).detach()
        iou_per_edge = ious.repeat_interleave(4)

        left = left_bin.long()
        fgl = (F.cross_entropy(matched_corners, left, reduction="none") * weight_left
               + F.cross_entropy(matched_corners, left + 1, reduction="none") * weight_right)
        losses = {"loss_fgl": (fgl * iou_per_edge).sum() / num_boxes}

        if "teacher_corners" in outputs:
            temperature = self.ddf_temperature
            student = corners.reshape(-1, bins)
            teacher = outputs["teacher_corners"].float().reshape(-1, bins).detach()
            weight = outputs["teacher_logits"].float().sigmoid().max(-1).values.detach()  # (B, Q)
            weight[idx] = ious.to(weight.dtype)
            matched = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            matched[idx] = True
            weight = weight.repeat_interleave(4, dim=-1).reshape(-1)
            matched = matched.repeat_interleave(4, dim=-1).reshape(-1)
            kl = F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                          reduction="none").sum(-1)
            per_edge = weight * temperature ** 2 * kl
            if "num_pos" not in ddf_balance:
                # sqrt of the counts, scaled to a per-GPU batch of 8 as in the reference.
                scale = 8 / corners.shape[0]
                ddf_balance["num_pos"] = math.sqrt(float(matched.sum()) * scale)
                ddf_balance["num_neg"] = math.sqrt(float((~matched).sum()) * scale)
            pos = per_edge[matched].mean() if bool(matched.any()) else per_edge.sum() * 0.0
            neg = per_edge[~matched].mean() if bool((~matched).any()) else per_edge.sum() * 0.0
            num_pos, num_neg = ddf_balance["num_pos"], ddf_balance["num_neg"]
            losses["loss_ddf"] = (pos * num_pos + neg * num_neg) / max(num_pos + num_neg, 1e-12)
        return losses

    # ------------------------------------------------------------------------------------ driver
    def _losses_for(self, outputs: dict, targets, class_indices: Indices, box_indices: Indices,
                    num_boxes_class: float, num_boxes_box: float, reg_scale: float, up: float,
                    ddf_balance: dict, num_classes: int, with_local: bool = True) -> dict[str, torch.Tensor]:
        raw = {"loss_mal": self.loss_mal(outputs, targets, class_indices, num_boxes_class, num_classes)}
        raw.update(self.loss_boxes(outputs, targets, box_indices, num_boxes_box))
        if with_local and self.local_losses:
            raw.update(self.loss_local(outputs, targets, box_indices, num_boxes_box, reg_scale, up, ddf_balance))
        return {k: v * self.weight_dict[k] for k, v in raw.items()}

    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if "pred_logits" not in outputs or "aux_outputs" not in outputs:
            raise KeyError("RTDETRv4Criterion: outputs must be the model's train-mode dict "
                           "(pred_logits, pred_boxes, aux_outputs, ...); got keys " + str(sorted(outputs)))
        device = outputs["pred_logits"].device
        reg_scale, up = float(outputs["reg_scale"]), float(outputs["up"])
        aux = list(outputs["aux_outputs"])
        pre = outputs.get("pre_outputs")
        enc = list(outputs.get("enc_aux_outputs", []))

        # Matching of every set of matching-query predictions.
        final_idx = self.matcher(outputs, targets)
        aux_idx = [self.matcher(o, targets) for o in aux]
        pre_idx = self.matcher(pre, targets) if pre is not None else None
        enc_idx = [self.matcher(o, targets) for o in enc]
        if self.use_union_set:
            union = union_matching([final_idx, *aux_idx, *([pre_idx] if pre_idx is not None else []), *enc_idx])
            num_union = _global_average_count(sum(len(r) for r, _ in union), device)
        num_objects = _global_average_count(sum(int(t["labels"].numel()) for t in targets), device)

        def box_set(own: Indices) -> tuple[Indices, float]:
            return (union, num_union) if self.use_union_set else (own, num_objects)

        ddf_balance: dict = {}
        losses: dict[str, torch.Tensor] = {}
        common = dict(reg_scale=reg_scale, up=up, num_classes=self.num_classes)

        idx_b, n_b = box_set(final_idx)
        losses.update(self._losses_for(outputs, targets, final_idx, idx_b, num_objects, n_b,
                                       ddf_balance=ddf_balance, **common))
        for i, (o, own) in enumerate(zip(aux, aux_idx)):
            idx_b, n_b = box_set(own)
            part = self._losses_for(o, targets, own, idx_b, num_objects, n_b, ddf_balance=ddf_balance, **common)
            losses.update({f"{k}_aux_{i}": v for k, v in part.items()})
        if pre is not None:
            idx_b, n_b = box_set(pre_idx)
            part = self._losses_for(pre, targets, pre_idx, idx_b, num_objects, n_b, ddf_balance=ddf_balance,
                                    with_local=False, **common)
            losses.update({f"{k}_pre": v for k, v in part.items()})
        for i, (o, own) in enumerate(zip(enc, enc_idx)):
            idx_b, n_b = box_set(own)
            part = self._losses_for(o, targets, own, idx_b, num_objects, n_b, ddf_balance=ddf_balance,
                                    with_local=False, **common)
            losses.update({f"{k}_enc_{i}": v for k, v in part.items()})

        if "dn_outputs" in outputs:
            meta: DenoisingMeta = outputs["dn_meta"]
            dn_idx = self.denoising_indices(meta, targets)
            num_dn = num_objects * meta.num_groups
            for i, o in enumerate(outputs["dn_outputs"]):
                part = self._losses_for(o, targets, dn_idx, dn_idx, num_dn, num_dn, ddf_balance=ddf_balance, **common)
                losses.update({f"{k}_dn_{i}": v for k, v in part.items()})
            if "dn_pre_outputs" in outputs:
                part = self._losses_for(outputs["dn_pre_outputs"], targets, dn_idx, dn_idx, num_dn, num_dn,
                                        ddf_balance=ddf_balance, with_local=False, **common)
                losses.update({f"{k}_dn_pre": v for k, v in part.items()})

        return {k: torch.nan_to_num(v, nan=0.0) for k, v in losses.items()}

    @staticmethod
    def denoising_indices(meta: DenoisingMeta, targets: list[dict[str, torch.Tensor]]) -> Indices:
        """Denoising query ``g * n + j`` (positive of group g) reconstructs object ``j``."""
        indices = []
        for positive, t in zip(meta.positive_indices, targets):
            n = int(t["labels"].numel())
            objects = torch.arange(n, dtype=torch.int64).repeat(meta.num_groups)
            if positive.numel() != objects.numel():
                raise ValueError(f"denoising meta has {positive.numel()} positive queries for {n} objects x "
                                 f"{meta.num_groups} groups")
            indices.append((positive.cpu().long(), objects))
        return indices


def criterion_options(student_name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`build_criterion` options of ``student_name``'s official recipe (its family's
    ``criterion_options``: :mod:`.families`; none listed, the defaults), ``overrides`` (a recipe's)
    on top. Unknown students raise ``KeyError`` naming the known ones."""
    official = family_of(student_name).criterion_options.get(student_name, {})
    return {**copy.deepcopy(dict(official)), **dict(overrides or {})}


def build_criterion(num_classes: int = 80, **overrides) -> RTDETRv4Criterion:
    """The RT-DETRv4 criterion with the official weights; keyword overrides, unknown ones refused.

    Overrides: ``weight_dict`` (partial, merged into :data:`DEFAULT_LOSS_WEIGHTS`), ``mal_gamma``
    (1.5), ``mal_alpha`` (None), ``ddf_temperature`` (5), ``use_union_set`` (True), ``local_losses``
    (True; False drops FGL/DDF as the official DEIMv2 ultra-light recipes do), and the
    matcher's ``cost_class`` (2), ``cost_bbox`` (5), ``cost_giou`` (2), ``matcher_alpha`` (0.25),
    ``matcher_gamma`` (2), ``matcher_change_epoch`` (None: never) and ``iou_order_alpha`` (4).
    A job's criterion is ``build_criterion(num_classes, **criterion_options(student_name))``.
    """
    matcher_keys = {"cost_class": "cost_class", "cost_bbox": "cost_bbox", "cost_giou": "cost_giou",
                    "matcher_alpha": "alpha", "matcher_gamma": "gamma", "matcher_change_epoch": "change_epoch",
                    "iou_order_alpha": "iou_order_alpha"}
    criterion_keys = {"weight_dict", "mal_gamma", "mal_alpha", "ddf_temperature", "use_union_set", "local_losses"}
    unknown = sorted(set(overrides) - set(matcher_keys) - criterion_keys)
    if unknown:
        raise TypeError(f"build_criterion: unknown option(s) {unknown}; known: "
                        f"{sorted(set(matcher_keys) | criterion_keys)}")
    matcher = HungarianMatcher(**{matcher_keys[k]: v for k, v in overrides.items() if k in matcher_keys})
    return RTDETRv4Criterion(num_classes, matcher=matcher,
                             **{k: copy.deepcopy(v) for k, v in overrides.items() if k in criterion_keys})
