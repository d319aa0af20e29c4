"""D-FINE decoder (as trained by DEIM and RT-DETRv4): query selection, FDR, GO-LSD outputs, LQE.

Pipeline, for encoder maps P3..P5 (``hidden`` channels each after the optional input projection):

1. **Query selection.** Every memory token gets an anchor box (its cell centre, size
   ``0.05 * 2^level``; tokens too close to the border are invalid and zeroed), a class score
   (``enc_score_head``) and a box (``enc_bbox_head`` + anchor, in logit space). The ``num_queries``
   tokens with the best max-class score become the initial queries: content = their (detached)
   memory, reference = their (detached) box. In training, denoising queries are prepended.
2. **Decoder layers.** Self-attention (masked for denoising), deformable cross-attention
   (:mod:`.deformable`) around the reference box, a learned gate mixing the two, FFN.
3. **Fine-grained Distribution Refinement (FDR).** Layer 0 predicts a classic box
   (``pre_bbox_head``) that becomes the fixed reference of all later layers. Every layer then
   predicts, per edge, logits over ``reg_max + 1`` bins, *added* to the previous layer's
   (residual refinement of a distribution); the edge distance is ``sum_n softmax(logits)_n W(n)``
   (:func:`.box_ops.weighting_function`) and :func:`.box_ops.edge_distances_to_box` turns the
   four distances into a box.
4. **LQE** (localisation quality estimation): the class logits get a bias computed from the
   top-4 probabilities (and their mean) of each edge's distribution: a sharp distribution
   means a well-localised box.
5. **GO-LSD outputs.** In training every layer's logits, boxes, bin logits and the reference are
   returned; intermediate layers carry the last layer's bin logits and class logits as the
   "teacher" of the Decoupled Distillation Focal loss.

In eval only the ``eval_idx`` layer's head runs (the last by default) and later layers are skipped.

DEIMv2 options (arXiv 2509.20787; all off by default, so the default decoder is D-FINE's):

* ``ffn="swiglu"``: the FFN of every layer becomes a SwiGLU FFN, ``W3 (SiLU(x W1) * x W2)``, of
  hidden width ``ffn_dim // 2``, as DEIMv2 sizes it (3/4 of the weights of a plain FFN of width
  ``ffn_dim``).
* ``norm="rmsnorm"``: every normalisation of the decoder layers (and of the gate) is an
  :class:`RMSNorm` (no mean subtraction, no bias) instead of a LayerNorm.
* ``share_query_pos=True``: the query position embedding is computed once, from the initial
  reference boxes, and shared by all layers (DEIMv2 observed that the references barely move).
* ``query_pos_layers`` / ``query_pos_hidden``: DEIMv2's position head is a 3-layer MLP of width
  ``hidden`` (D-FINE: 2 layers of width ``2 * hidden``).
* ``enc_output=False``: query selection scores the memory directly (DEIMv2 drops D-FINE's
  ``Linear + LayerNorm`` in front of the encoder heads).
* ``use_gateway=False``: cross-attention output is added residually and normalised (the
  ultra-light DEIMv2 sizes) instead of the learned gate.
* ``share_bbox_head=True``: one box (bin-logit) head for all layers (the ultra-light sizes).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import edge_distances_to_box, inverse_sigmoid, weighting_function
from .deformable import MSDeformableAttention
from .denoising import build_denoising_queries
from .encoder import ConvNormAct, make_activation

__all__ = ["DFINEDecoder", "DecoderLayer", "Gate", "LQE", "MLP", "RMSNorm", "SwiGLUFFN", "distribution_to_distances",
           "make_norm"]

FFN_TYPES = ("mlp", "swiglu")
NORM_TYPES = ("layernorm", "rmsnorm")


def prior_logit(prob: float) -> float:
    """Bias giving a sigmoid output of ``prob`` (focal-loss style initialisation)."""
    return -math.log((1.0 - prob) / prob)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation: ``x / sqrt(mean(x^2) + eps) * weight``, computed in float32.

    Written out (rather than ``nn.RMSNorm``) because the TorchScript ONNX exporter has no
    ``aten::rms_norm`` at opset 17; these are the same few ops it would decompose into.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def make_norm(kind: str, dim: int) -> nn.Module:
    """``layernorm`` -> ``nn.LayerNorm(dim)``; ``rmsnorm`` -> :class:`RMSNorm` (eps 1e-6, as DEIMv2)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"unknown decoder norm {kind!r}; expected one of {NORM_TYPES}")


class SwiGLUFFN(nn.Module):
    """``w3(SiLU(a) * b)`` with ``(a, b) = w12(x).chunk(2)``; Xavier weights, zero biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"SwiGLUFFN: hidden_dim must be >= 1, got {hidden_dim}")
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)
        for layer in (self.w12, self.w3):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class MLP(nn.Module):
    """``num_layers`` linear layers with the activation between them (not after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, act: str = "relu"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class Gate(nn.Module):
    """``norm(g1 * x + g2 * y)`` with sigmoid gates from ``[x, y]``; starts as ``norm(0.5 x + 0.5 y)``."""

    def __init__(self, dim: int, norm: str = "layernorm"):
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, prior_logit(0.5))
        self.norm = make_norm(norm, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x, y], dim=-1))).chunk(2, dim=-1)
        return self.norm(g1 * x + g2 * y)


class LQE(nn.Module):
    """Localisation quality bias from the sharpness of the edge distributions (D-FINE)."""

    def __init__(self, top_k: int = 4, hidden_dim: int = 64, num_layers: int = 2, reg_max: int = 32,
                 act: str = "relu"):
        super().__init__()
        self.top_k = top_k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (top_k + 1), hidden_dim, 1, num_layers, act=act)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores: torch.Tensor, corner_logits: torch.Tensor) -> torch.Tensor:
        batch, queries, _ = corner_logits.shape
        prob = corner_logits.reshape(batch, queries, 4, self.reg_max + 1).softmax(-1)
        top = prob.topk(self.top_k, dim=-1).values
        stats = torch.cat([top, top.mean(-1, keepdim=True)], dim=-1).reshape(batch, queries, -1)
        return scores + self.reg_conf(stats)


def distribution_to_distances(corner_logits: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """(..., 4 * (reg_max + 1)) bin logits -> (..., 4) expected edge distances ``sum_n p_n W(n)``."""
    bins = project.shape[0]
    prob = corner_logits.reshape(*corner_logits.shape[:-1], 4, bins).softmax(-1)
    return (prob * project.to(prob.dtype)).sum(-1)


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention (gated, or residual + norm) -> FFN, post-norm.

    ``ffn``: ``mlp`` (``linear1 -> act -> linear2``) or ``swiglu`` (:class:`SwiGLUFFN` of width
    ``ffn_dim // 2``, attribute ``swiglu``); ``norm``: ``layernorm`` or ``rmsnorm``;
    ``use_gateway=False`` replaces the gate by ``norm2(target + cross)``.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.0,
                 act: str = "relu", num_points: Sequence[int] = (3, 6, 3), *, ffn: str = "mlp",
                 norm: str = "layernorm", use_gateway: bool = True):
        super().__init__()
        if ffn not in FFN_TYPES:
            raise ValueError(f"DecoderLayer: unknown ffn {ffn!r}; expected one of {FFN_TYPES}")
        self.ffn_type = ffn
        self.use_gateway = use_gateway
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = make_norm(norm, dim)
        self.cross_attn = MSDeformableAttention(dim, num_heads, num_points)
        self.dropout2 = nn.Dropout(dropout)
        if use_gateway:
            self.gateway = Gate(dim, norm)
        else:
            self.norm2 = make_norm(norm, dim)
        if ffn == "mlp":
            self.linear1 = nn.Linear(dim, ffn_dim)
            self.activation = make_activation(act)
            self.dropout3 = nn.Dropout(dropout)
            self.linear2 = nn.Linear(ffn_dim, dim)
        else:
            self.swiglu = SwiGLUFFN(dim, ffn_dim // 2)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = make_norm(norm, dim)
        if ffn == "mlp":
            nn.init.xavier_uniform_(self.linear1.weight)
            nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, target: torch.Tensor, reference_boxes: torch.Tensor, values: list[torch.Tensor],
                spatial_shapes: list[tuple[int, int]], attn_mask: torch.Tensor | None,
                query_pos: torch.Tensor) -> torch.Tensor:
        q = k = target + query_pos
        attended, _ = self.self_attn(q, k, value=target, attn_mask=attn_mask, need_weights=False)
        target = self.norm1(target + self.dropout1(attended))
        cross = self.cross_attn(target + query_pos, reference_boxes, values, spatial_shapes)
        if self.use_gateway:
            target = self.gateway(target, self.dropout2(cross))
        else:
            target = self.norm2(target + self.dropout2(cross))
        if self.ffn_type == "mlp":
            ffn = self.linear2(self.dropout3(self.activation(self.linear1(target))))
        else:
            ffn = self.swiglu(target)
        # The clamp keeps fp16 activations finite (the reference does the same).
        return self.norm3((target + self.dropout4(ffn)).clamp(min=-65504, max=65504))


class DFINEDecoder(nn.Module):
    """The D-FINE transformer decoder with its heads; see the module docstring."""

    def __init__(self, num_classes: int = 80, hidden_dim: int = 256, num_queries: int = 300,
                 feat_channels: Sequence[int] = (256, 256, 256), feat_strides: Sequence[int] = (8, 16, 32),
                 num_layers: int = 6, num_heads: int = 8, ffn_dim: int = 1024, dropout: float = 0.0,
                 num_points: Sequence[int] = (3, 6, 3), act: str = "silu", mlp_act: str = "silu",
                 num_denoising: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
                 reg_max: int = 32, reg_scale: float = 4.0, up: float = 0.5, eval_idx: int = -1,
                 anchor_eps: float = 1e-2, *, ffn: str = "mlp", norm: str = "layernorm",
                 share_query_pos: bool = False, query_pos_layers: int = 2, query_pos_hidden: int | None = None,
                 enc_output: bool = True, use_gateway: bool = True, share_bbox_head: bool = False):
        super().__init__()
        if len(num_points) != len(feat_channels) or len(feat_strides) != len(feat_channels):
            raise ValueError(f"DFINEDecoder: feat_channels {list(feat_channels)}, feat_strides {list(feat_strides)} "
                             f"and num_points {list(num_points)} must have one entry per level")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.feat_strides = list(feat_strides)
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.reg_max = reg_max
        self.reg_scale = float(reg_scale)
        self.up = float(up)
        self.anchor_eps = anchor_eps
        self.share_query_pos = bool(share_query_pos)
        if query_pos_layers < 2:
            raise ValueError(f"DFINEDecoder: query_pos_layers must be >= 2, got {query_pos_layers}")
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx
        if not 0 <= self.eval_idx < num_layers:
            raise ValueError(f"DFINEDecoder: eval_idx {eval_idx} out of range for {num_layers} layers")
        # W(n), fixed; recomputed on load rather than stored.
        self.register_buffer("project", weighting_function(reg_max, self.up, self.reg_scale), persistent=False)

        self.input_proj = nn.ModuleList([
            nn.Identity() if c == hidden_dim else ConvNormAct(c, hidden_dim, 1) for c in feat_channels])
        for proj in self.input_proj:
            if isinstance(proj, ConvNormAct):
                nn.init.xavier_uniform_(proj.conv.weight)

        self.layers = nn.ModuleList([DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout, act, num_points, ffn=ffn,
                                                  norm=norm, use_gateway=use_gateway)
                                     for _ in range(num_layers)])
        self.lqe_layers = nn.ModuleList([LQE(4, 64, 2, reg_max, act=act) for _ in range(num_layers)])

        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)
            nn.init.normal_(self.denoising_class_embed.weight[:-1])
        else:
            self.denoising_class_embed = None

        pos_hidden = 2 * hidden_dim if query_pos_hidden is None else int(query_pos_hidden)
        self.query_pos_head = MLP(4, pos_hidden, hidden_dim, query_pos_layers, act=mlp_act)
        if enc_output:
            self.enc_output = nn.Sequential()
            self.enc_output.add_module("proj", nn.Linear(hidden_dim, hidden_dim))
            self.enc_output.add_module("norm", nn.LayerNorm(hidden_dim))
        else:  # DEIMv2: the encoder heads read the memory as it is
            self.enc_output = None
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)

        self.dec_score_head = nn.ModuleList([nn.Linear(hidden_dim, num_classes) for _ in range(num_layers)])
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=mlp_act)
        if share_bbox_head:  # one module listed num_layers times: parameters() counts it once
            shared = MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, act=mlp_act)
            self.dec_bbox_head = nn.ModuleList([shared] * num_layers)
        else:
            self.dec_bbox_head = nn.ModuleList([MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, act=mlp_act)
                                                for _ in range(num_layers)])
        self._reset_head_parameters()

    def _reset_head_parameters(self) -> None:
        bias = prior_logit(0.01)
        nn.init.constant_(self.enc_score_head.bias, bias)
        for head in [self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, bias)
        if self.enc_output is not None:
            nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    # ----------------------------------------------------------------------------------------------
    def _flatten_memory(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        projected = [proj(f) for proj, f in zip(self.input_proj, features)]
        shapes = [(int(f.shape[2]), int(f.shape[3])) for f in projected]
        memory = torch.cat([f.flatten(2).permute(0, 2, 1) for f in projected], dim=1)
        return memory, shapes

    def _anchors(self, shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype,
                 grid_size: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit-space anchor boxes (1, N, 4) for every memory token and their validity mask (1, N, 1)."""
        anchors = []
        for level, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                    torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
            centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], dim=-1).reshape(-1, 2)
            sizes = torch.full_like(centres, grid_size * (2.0 ** level))
            anchors.append(torch.cat([centres, sizes], dim=-1))
        boxes = torch.cat(anchors, dim=0)[None]
        valid = ((boxes > self.anchor_eps) & (boxes < 1 - self.anchor_eps)).all(-1, keepdim=True)
        logits = torch.log(boxes / (1 - boxes))
        logits = torch.where(valid, logits, torch.full_like(logits, float("inf")))
        return logits.to(dtype), valid

    def _select_queries(self, memory: torch.Tensor, shapes: list[tuple[int, int]]):
        """Top-``num_queries`` encoder tokens by best class score.

        Returns the detached memory of those tokens (query content), their box logits
        (``enc_bbox_head`` + anchor; not detached, the encoder loss trains the head through them)
        and, in training, their class logits.
        """
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"DFINEDecoder: {memory.shape[1]} memory tokens (input too small) for "
                             f"{self.num_queries} queries; use a larger input or fewer num_queries")
        anchors, valid = self._anchors(shapes, memory.device, memory.dtype)
        memory = valid.to(memory.dtype) * memory
        enc_memory = self.enc_output(memory) if self.enc_output is not None else memory
        enc_logits = self.enc_score_head(enc_memory)
        topk = enc_logits.max(-1).values.topk(self.num_queries, dim=1).indices  # (B, Q)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, topk.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        top_memory = gather(enc_memory)
        top_anchors = gather(anchors.expand(memory.shape[0], -1, -1))
        top_boxes_logit = self.enc_bbox_head(top_memory) + top_anchors
        top_logits = gather(enc_logits) if self.training else None
        return top_memory.detach(), top_boxes_logit, top_logits

    # ----------------------------------------------------------------------------------------------
    def forward(self, features: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> dict:
        memory, shapes = self._flatten_memory(features)

        denoising = None
        if self.training and targets is not None and self.denoising_class_embed is not None:
            denoising = build_denoising_queries(targets, self.num_classes, self.num_queries,
                                                self.denoising_class_embed, self.num_denoising,
                                                self.label_noise_ratio, self.box_noise_scale)

        content, enc_boxes_logit, enc_logits = self._select_queries(memory, shapes)
        ref_logit = enc_boxes_logit.detach()
        attn_mask = None
        if denoising is not None:
            content = torch.cat([denoising.content, content], dim=1)
            ref_logit = torch.cat([denoising.boxes_logit.to(ref_logit.dtype), ref_logit], dim=1)
            attn_mask = denoising.attn_mask

        values = self.layers[0].cross_attn.split_values(memory, shapes)
        project = self.project

        output = content
        output_detached = None  # from layer 1 on, the bbox head also sees the previous layer's output, detached
        prev_corners = None
        ref_boxes = torch.sigmoid(ref_logit)  # detached reference of the current layer
        logits_per_layer, boxes_per_layer, corners_per_layer = [], [], []
        # DEIMv2: one position embedding, from the initial references, for every layer.
        shared_pos = self.query_pos_head(ref_boxes).clamp(min=-10, max=10) if self.share_query_pos else None
        for i, layer in enumerate(self.layers):
            if shared_pos is not None:
                query_pos = shared_pos
            else:
                query_pos = self.query_pos_head(ref_boxes).clamp(min=-10, max=10)
            output = layer(output, ref_boxes, values, shapes, attn_mask, query_pos)
            if i == 0:
                # The coarse box of layer 0 is the fixed reference of the distribution refinement.
                pre_boxes = torch.sigmoid(self.pre_bbox_head(output) + inverse_sigmoid(ref_boxes))
                pre_logits = self.dec_score_head[0](output) if self.training else None
                initial_ref = pre_boxes.detach()
            if output_detached is None:
                corners = self.dec_bbox_head[i](output)
            else:
                # Residual refinement: this layer's bin logits are added to the previous layer's.
                corners = self.dec_bbox_head[i](output + output_detached) + prev_corners
            boxes = edge_distances_to_box(initial_ref, distribution_to_distances(corners, project), self.reg_scale)
            if self.training or i == self.eval_idx:
                logits = self.lqe_layers[i](self.dec_score_head[i](output), corners)
                logits_per_layer.append(logits)
                boxes_per_layer.append(boxes)
                corners_per_layer.append(corners)
                if not self.training:
                    break
            prev_corners = corners
            ref_boxes = boxes.detach()
            output_detached = output.detach()

        if not self.training:
            return {"pred_logits": logits_per_layer[-1], "pred_boxes": boxes_per_layer[-1]}
        return self._training_outputs(logits_per_layer, boxes_per_layer, corners_per_layer, initial_ref,
                                      pre_logits, pre_boxes, enc_logits, torch.sigmoid(enc_boxes_logit), denoising)

    def _training_outputs(self, logits, boxes, corners, ref, pre_logits, pre_boxes, enc_logits, enc_boxes,
                          denoising) -> dict:
        """Split denoising from matching queries and assemble the dict the criterion reads."""
        dn = None
        if denoising is not None:
            n = denoising.meta.num_denoising

            def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return t[:, :n], t[:, n:]

            dn_logits, logits = zip(*[split(t) for t in logits])
            dn_boxes, boxes = zip(*[split(t) for t in boxes])
            dn_corners, corners = zip(*[split(t) for t in corners])
            dn_ref, ref = split(ref)
            dn_pre_logits, pre_logits = split(pre_logits)
            dn_pre_boxes, pre_boxes = split(pre_boxes)
            dn = (dn_logits, dn_boxes, dn_corners, dn_ref, dn_pre_logits, dn_pre_boxes)

        def layer_outputs(lg, bx, cr, rf) -> list[dict]:
            # Every layer but the last learns from the last one (GO-LSD): it carries the teacher.
            outs = []
            for i in range(len(lg)):
                d = {"pred_logits": lg[i], "pred_boxes": bx[i], "pred_corners": cr[i], "ref_points": rf}
                if i < len(lg) - 1:
                    d["teacher_corners"] = cr[-1]
                    d["teacher_logits"] = lg[-1]
                outs.append(d)
            return outs

        main = layer_outputs(logits, boxes, corners, ref)
        out = {
            **main[-1],
            "aux_outputs": main[:-1],
            "pre_outputs": {"pred_logits": pre_logits, "pred_boxes": pre_boxes},
            "enc_aux_outputs": [{"pred_logits": enc_logits, "pred_boxes": enc_boxes}],
            "reg_scale": self.reg_scale,
            "up": self.up,
        }
        if dn is not None:
            dn_logits, dn_boxes, dn_corners, dn_ref, dn_pre_logits, dn_pre_boxes = dn
            out["dn_outputs"] = layer_outputs(dn_logits, dn_boxes, dn_corners, dn_ref)
            out["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
            out["dn_meta"] = denoising.meta
        return out
