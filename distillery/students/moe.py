"""Dynamic-DINO mixture-of-experts tuning: split a dense FFN into fine-grained experts.

Dynamic-DINO (arXiv 2507.17436) turns the decoder FFNs of a trained dense detector into
mixture-of-experts layers without losing what the dense model already knows:

* **Granularity decomposition.** A dense FFN ``Linear(d, h) -> act -> Linear(h, d)`` is copied
  ``N`` times (``copies``) and every copy is cut ``k`` ways (``granularity``) along its hidden
  dimension. Piece ``j`` of a copy keeps rows ``j*h/k:(j+1)*h/k`` of ``W1``/``b1``, the same
  columns of ``W2`` and ``b2 / k``. Because the activation acts element-wise on the hidden units,
  the ``k`` pieces of one copy add up exactly to the dense FFN. That gives ``E = k * N`` experts of
  hidden size ``h / k``; expert ``e = c * k + j`` is piece ``j`` of copy ``c``.
* **Top-k routing with k = granularity.** Each token runs ``k`` experts: as much compute as the
  dense FFN, from a ``N``-times larger pool of parameters.
* **Router initialisation.** The router's rows are replicated across the ``k`` pieces of a copy
  (distinct random rows for distinct copies). The ``k`` pieces of one copy then have equal logits,
  so top-k picks all ``k`` pieces of the best copy and, with the gate normalisation below, step 0
  reproduces the dense FFN exactly.

Gate normalisation (``route_top_k``)
------------------------------------
``p = softmax(logits)`` over all ``E`` experts gives the probabilities for the load-balancing loss;
the top-k is taken on the logits (the same order as ``p``, without ties made by rounding in exp).
The ``k`` selected experts are combined with ``w_i = k * softmax(selected logits)_i``, which equals
``k * p_i / sum(p_selected)``. At step 0 the selected pieces have equal logits, so each
``w_i = k * (1 / k) = 1`` and the output is ``sum_j piece_j(x) = FFN(x)``. Plain renormalisation
(weights summing to 1, as DeepSpeed's top-k gate and Mixtral do) would give ``FFN(x) / k``; the raw
softmax ``p_i`` (Switch top-1) would scale the output by the probability mass of the chosen copy,
which depends on every other copy's logit. The factor ``k`` is a constant, so the router still
learns: ``d w_i / d l_m = k * s_i * (delta_im - s_m)`` is non-zero (``s`` = softmax over the
selected logits), i.e. at step 0 the gradient pushes each piece's logit by how much its output
differs from the mean of the chosen pieces, and the pieces of a copy drift apart.
The computation uses ``exp(l - max)`` so that exactly tied logits give weights of exactly 1.0.

Tie handling
------------
Top-k uses a *stable* descending sort of the logits: equal logits are ordered by expert index.
Expert ids are laid out copy-major (``c * k + j``), so when whole copies tie (e.g. a token of zeros
gives all-zero logits) the lowest copy wins with all of its pieces, never a mix of pieces from
different copies (which would double one slice of the hidden layer and drop another). Exact ties
within a copy need bitwise-equal logits. A ``Linear`` whose rows are equal does *not* guarantee
that: BLAS kernels accumulate different output columns differently (measured on CPU: up to 3e-6
apart for a single token). The router is therefore parameterised as a shared per-copy row plus a
per-expert residual initialised to zero (``TopKRouter``): ``logits = (x @ U^T) repeated k times +
x @ V^T``. At step 0 ``V = 0`` adds exact zeros, so the pieces of a copy tie bit for bit; the
function class is the same as ``Linear(d, E, bias=False)`` (effective weight ``U (x) 1_k + V``,
available as ``TopKRouter.weight``). Training differs from a plain ``Linear`` only in that ``U``
receives the sum of its ``k`` rows' gradients, a mild pull for the pieces of a copy to move together.

Capacity
--------
``capacity_factor=None`` (default) drops nothing. Otherwise each expert takes at most
``C = ceil(capacity_factor * T * k / E)`` routes per forward; routes are admitted by priority
(every token's first choice before any second choice, then token order), the rest are dropped:
their combine weight becomes 0 (the other pieces keep their weights, no renormalisation).

Compute and export
------------------
Experts live in batched tensors ``w1 (E, h/k, d)``, ``b1 (E, h/k)``, ``w2 (E, d, h/k)``,
``b2 (E, d)``. The forward loops over the constant ``E`` experts: gathers the tokens routed to
expert ``e`` (``nonzero``), runs the small FFN on them and ``index_add``s the weighted result. The
work is the dense FFN's FLOPs (each token visits ``k`` experts of width ``h/k``); there is no Python
branch on data (an expert with no tokens simply processes an empty batch), so the module traces and
exports (tested with ``torch.onnx.export(..., dynamo=False)`` and onnxruntime, dynamic token count;
the dynamo exporter needs ``onnxscript``, which is not installed). While exporting, the top-k is
``torch.topk``, exported as ONNX ``TopK``, whose spec breaks ties by the lower index like the
stable sort (the TorchScript exporter cannot export a stable sort).

This module is plain PyTorch. ``distillery.platform.moe.expert_parallel`` maps it onto DeepSpeed's MoE
layer for expert parallelism.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_AUX_LOSS_WEIGHT",
    "FFNParts",
    "ExpertFFN",
    "MoEFFN",
    "Routing",
    "TopKRouter",
    "coactivation_matrix",
    "collect_aux_loss",
    "collect_routing_traces",
    "expert_load",
    "ffn_parts",
    "moe_parameter_counts",
    "replace_decoder_ffns",
    "route_top_k",
    "split_ffn_into_experts",
    "stable_partners",
    "summarise_layers",
]

#: Load-balancing loss weight used by Dynamic-DINO (and MoE-LLaVA before it).
DEFAULT_AUX_LOSS_WEIGHT = 0.01


# --------------------------------------------------------------------------- FFN protocol
@dataclass(frozen=True)
class FFNParts:
    """The pieces of a dense FFN ``linear2(dropout(activation(linear1(x))))``."""

    linear1: nn.Linear
    activation: Callable[[torch.Tensor], torch.Tensor]
    dropout: float
    linear2: nn.Linear


def _is_dropout(m: object) -> bool:
    return isinstance(m, (nn.Dropout, nn.Dropout1d, nn.AlphaDropout))


def ffn_parts(ffn: nn.Module) -> FFNParts:
    """Find ``Linear(d, h)``, activation, optional dropout, ``Linear(h, d)`` in ``ffn``.

    Two ways to describe an FFN are understood:

    1. **Named attributes** (the ``nn.TransformerDecoderLayer`` / D-FINE naming): ``linear1`` and
       ``linear2`` (``nn.Linear``), ``activation`` (a module or a function such as ``F.relu``) and
       optionally ``dropout`` (``nn.Dropout``). The module's forward must compute
       ``linear2(dropout(activation(linear1(x))))``.
    2. **Children in order** (``nn.Sequential`` or any module registering only its FFN parts):
       exactly two ``nn.Linear`` children, exactly one activation module between them, optionally
       dropouts / ``nn.Identity`` between them, and nothing else.

    Raises ``ValueError`` describing what was found otherwise.
    """
    name = type(ffn).__name__
    linear1 = getattr(ffn, "linear1", None)
    linear2 = getattr(ffn, "linear2", None)
    if isinstance(linear1, nn.Linear) and isinstance(linear2, nn.Linear):
        activation = getattr(ffn, "activation", None)
        if activation is None or not callable(activation):
            raise ValueError(f"FFN {name} has linear1/linear2 but no callable 'activation' attribute")
        dropout = getattr(ffn, "dropout", None)
        if dropout is not None and not _is_dropout(dropout):
            raise ValueError(f"FFN {name}.dropout must be an nn.Dropout, got {type(dropout).__name__}")
        parts = FFNParts(linear1, activation, float(dropout.p) if dropout is not None else 0.0, linear2)
    else:
        children = list(ffn.named_children())
        kinds = [type(m).__name__ for _, m in children]
        linear_at = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)]
        if len(linear_at) != 2 or linear_at[0] != 0 or linear_at[1] != len(children) - 1:
            raise ValueError(
                f"FFN {name}: expected children Linear, activation, [Dropout], Linear (or attributes "
                f"linear1/activation/[dropout]/linear2); found children {kinds}")
        middle = [m for _, m in children[1:-1] if not isinstance(m, nn.Identity)]
        activations = [m for m in middle if not _is_dropout(m)]
        dropouts = [m for m in middle if _is_dropout(m)]
        if len(activations) != 1:
            raise ValueError(f"FFN {name}: expected exactly one activation between the two Linear layers, "
                             f"found {[type(m).__name__ for m in activations]} in children {kinds}")
        keep = 1.0
        for d in dropouts:  # several dropouts in a row drop like one with the combined keep rate
            keep *= 1.0 - float(d.p)
        parts = FFNParts(children[0][1], activations[0], 1.0 - keep, children[-1][1])
    d, h = parts.linear1.in_features, parts.linear1.out_features
    if parts.linear2.in_features != h or parts.linear2.out_features != d:
        raise ValueError(f"FFN {name}: linear1 is {d}->{h} but linear2 is "
                         f"{parts.linear2.in_features}->{parts.linear2.out_features}; expected {h}->{d}")
    return parts


class ExpertFFN(nn.Module):
    """One expert as a standalone FFN (follows the ``ffn_parts`` attribute protocol)."""

    def __init__(self, d_model: int, hidden: int, activation: Callable | None = None, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, hidden)
        self.activation = activation if activation is not None else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


# --------------------------------------------------------------------------- routing
class TopKRouter(nn.Module):
    """Bias-free linear router ``d -> E = copies * k`` with a copy-shared component.

    ``logits = repeat_k(x @ copy_weight^T) + x @ piece_weight^T``. ``piece_weight`` starts at zero
    so the ``k`` pieces of a copy have bitwise-equal logits at step 0 (see the module docstring).
    """

    def __init__(self, d_model: int, copies: int, granularity: int, *, device=None, dtype=None):
        super().__init__()
        self.copies, self.granularity = copies, granularity
        self.copy_weight = nn.Parameter(torch.empty(copies, d_model, device=device, dtype=dtype))
        self.piece_weight = nn.Parameter(torch.zeros(copies * granularity, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, one distinct random row per copy.
        nn.init.kaiming_uniform_(self.copy_weight, a=math.sqrt(5))
        nn.init.zeros_(self.piece_weight)

    @property
    def weight(self) -> torch.Tensor:
        """The effective ``(E, d)`` weight of the equivalent ``Linear(d, E, bias=False)``."""
        return self.copy_weight.repeat_interleave(self.granularity, dim=0) + self.piece_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = F.linear(x, self.copy_weight).repeat_interleave(self.granularity, dim=-1)
        return shared + F.linear(x, self.piece_weight)


@dataclass
class Routing:
    """Routing decisions for ``T`` tokens (rows) and their ``k`` routes (columns)."""

    expert_index: torch.Tensor   # (T, k) long: selected experts, best first (before capacity)
    combine_weight: torch.Tensor  # (T, k) float32: k * softmax over selected logits, 0 where dropped
    kept: torch.Tensor            # (T, k) bool: False where the capacity limit dropped the route
    location: torch.Tensor        # (T, k) long: slot of the route in its expert's buffer
    probs: torch.Tensor           # (T, E) float32: softmax over all experts
    balance_loss: torch.Tensor    # scalar: E * sum_e f_e * P_e (unweighted)
    capacity: int | None          # per-expert capacity, None when nothing is dropped


def route_top_k(logits: torch.Tensor, k: int, capacity_factor: float | None = None) -> Routing:
    """Top-k gate over ``logits (T, E)`` with the step-0-exact normalisation (module docstring).

    * selection: stable descending sort of the logits (ties go to the lower expert id);
    * combine weights: ``k * softmax(selected logits)``;
    * load-balancing loss (Switch/GShard): ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the
      ``T * k`` routes that chose ``e`` (before capacity) and ``P_e`` the mean router probability;
      it is 1 for perfectly uniform routing;
    * capacity: see the module docstring.
    """
    if logits.dim() != 2:
        raise ValueError(f"route_top_k: logits must be (tokens, experts), got shape {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"route_top_k: k={k} must be between 1 and the number of experts {num_experts}")
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    if torch.onnx.is_in_onnx_export():
        # ONNX TopK breaks ties by the lower index (operator spec), like the stable sort below;
        # the TorchScript ONNX exporter cannot export a stable sort.
        expert_index = torch.topk(logits, k, dim=-1).indices
    else:
        expert_index = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]

    selected = logits.gather(1, expert_index)
    unnormalised = torch.exp(selected - selected.max(dim=-1, keepdim=True).values)
    combine_weight = (k * unnormalised) / unnormalised.sum(dim=-1, keepdim=True)

    # One-hot of every route in priority order: all first choices, then all second choices, ...
    one_hot = F.one_hot(expert_index.t().reshape(-1), num_experts)            # (k*T, E)
    routes_per_expert = one_hot.sum(dim=0)
    location = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=-1)          # (k*T,)
    location = location.reshape(k, num_tokens).t()

    fraction = routes_per_expert.float() / max(num_tokens * k, 1)
    balance_loss = num_experts * torch.sum(fraction * probs.mean(dim=0))

    if capacity_factor is None:
        capacity = None
        kept = torch.ones_like(expert_index, dtype=torch.bool)
    else:
        if capacity_factor <= 0:
            raise ValueError(f"route_top_k: capacity_factor must be positive or None, got {capacity_factor}")
        capacity = max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))
        kept = location < capacity
        combine_weight = combine_weight * kept
    return Routing(expert_index, combine_weight, kept, location, probs, balance_loss, capacity)


# --------------------------------------------------------------------------- the MoE layer
class MoEFFN(nn.Module):
    """Fine-grained mixture-of-experts FFN: ``(..., d) -> (..., d)``.

    After each forward: ``self.aux_loss`` (``aux_loss_weight * load_balancing_loss``, add it to the
    training loss) and ``self.load_balancing_loss`` (unweighted). With ``record_routing=True`` the
    selected expert ids of every token are appended to a trace; read it with ``pop_routing_trace``.
    """

    def __init__(self, d_model: int, expert_hidden: int, copies: int, granularity: int,
                 activation: Callable | None = None, dropout: float = 0.0, *,
                 capacity_factor: float | None = None, aux_loss_weight: float = DEFAULT_AUX_LOSS_WEIGHT,
                 record_routing: bool = False, device=None, dtype=None):
        super().__init__()
        _check_positive(copies=copies, granularity=granularity, d_model=d_model, expert_hidden=expert_hidden)
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"MoEFFN: capacity_factor must be positive or None, got {capacity_factor}")
        self.d_model, self.expert_hidden = d_model, expert_hidden
        self.copies, self.granularity = copies, granularity
        self.num_experts = copies * granularity
        self.top_k = granularity
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.record_routing = record_routing
        self.router = TopKRouter(d_model, copies, granularity, device=device, dtype=dtype)
        self.activation = activation if activation is not None else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        E, he, d = self.num_experts, expert_hidden, d_model
        kw = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(torch.empty(E, he, d, **kw))
        self.b1 = nn.Parameter(torch.empty(E, he, **kw))
        self.w2 = nn.Parameter(torch.empty(E, d, he, **kw))
        self.b2 = nn.Parameter(torch.empty(E, d, **kw))
        self._reset_experts()
        self.aux_loss: torch.Tensor | None = None
        self.load_balancing_loss: torch.Tensor | None = None
        self._trace: list[torch.Tensor] = []

    def _reset_experts(self) -> None:
        # Same distribution as nn.Linear's default init, expert by expert.
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, expert_hidden={self.expert_hidden}, copies={self.copies}, "
                f"granularity={self.granularity}, experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, aux_loss_weight={self.aux_loss_weight}")

    # ---- bookkeeping
    def expert_parameter_count(self) -> int:
        """Parameters of one expert (``W1``, ``b1``, ``W2``, ``b2`` slices)."""
        return self.w1[0].numel() + self.b1[0].numel() + self.w2[0].numel() + self.b2[0].numel()

    def expert_ffn(self, expert: int) -> ExpertFFN:
        """A standalone copy of expert ``expert`` (weights copied, not shared; same train/eval mode)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"MoEFFN.expert_ffn: expert {expert} out of range [0, {self.num_experts})")
        act = copy.deepcopy(self.activation) if isinstance(self.activation, nn.Module) else self.activation
        out = ExpertFFN(self.d_model, self.expert_hidden, act, self.dropout.p).to(self.w1.device, self.w1.dtype)
        with torch.no_grad():
            out.linear1.weight.copy_(self.w1[expert])
            out.linear1.bias.copy_(self.b1[expert])
            out.linear2.weight.copy_(self.w2[expert])
            out.linear2.bias.copy_(self.b2[expert])
        return out.train(self.training)

    def pop_routing_trace(self) -> torch.Tensor:
        """The recorded ``(tokens, k)`` expert ids since the last call (CPU, long); clears it."""
        trace = torch.cat(self._trace) if self._trace else torch.empty(0, self.top_k, dtype=torch.long)
        self._trace = []
        return trace

    # ---- compute
    def route(self, tokens: torch.Tensor) -> Routing:
        """Routing for ``tokens (T, d)``."""
        return route_top_k(self.router(tokens), self.top_k, self.capacity_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoEFFN: input's last dimension is {x.shape[-1]}, expected d_model={self.d_model}")
        tokens = x.reshape(-1, self.d_model)
        routing = self.route(tokens)
        self.load_balancing_loss = routing.balance_loss
        self.aux_loss = self.aux_loss_weight * routing.balance_loss
        if self.record_routing:
            self._trace.append(routing.expert_index.detach().to("cpu", torch.long))

        # Dropped routes get expert id -1, which matches no expert below.
        dispatch = torch.where(routing.kept, routing.expert_index, torch.full_like(routing.expert_index, -1))
        weight = routing.combine_weight.to(tokens.dtype)
        out = torch.zeros_like(tokens)
        for e in range(self.num_experts):  # constant trip count: no branch on data
            token, slot = torch.nonzero(dispatch == e, as_tuple=True)
            hidden = self.dropout(self.activation(F.linear(tokens.index_select(0, token), self.w1[e], self.b1[e])))
            y = F.linear(hidden, self.w2[e], self.b2[e])
            # .to(out.dtype): under autocast the expert runs in bf16/fp16 while ``out`` follows x.
            out = out.index_add(0, token, (y * weight[token, slot].unsqueeze(-1)).to(out.dtype))
        return out.reshape(x.shape)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- building from a dense FFN
def split_ffn_into_experts(ffn: nn.Module, copies: int, granularity: int, *,
                           capacity_factor: float | None = None,
                           aux_loss_weight: float = DEFAULT_AUX_LOSS_WEIGHT,
                           record_routing: bool = False) -> nn.Module:
    """Dynamic-DINO's decomposition of a dense FFN into ``copies * granularity`` experts.

    Returns an ``MoEFFN`` (in ``ffn``'s train/eval mode) whose output equals ``ffn``'s (eval mode)
    before any training.
    ``ffn`` follows the protocol of ``ffn_parts``. Raises ``ValueError`` when ``granularity`` does
    not divide the FFN width or ``copies``/``granularity`` are not positive.
    """
    _check_positive(copies=copies, granularity=granularity)
    parts = ffn_parts(ffn)
    d, h = parts.linear1.in_features, parts.linear1.out_features
    if h % granularity != 0:
        raise ValueError(f"granularity {granularity} does not divide the FFN width {h} "
                         f"(hidden size of {type(ffn).__name__}.linear1)")
    he = h // granularity
    w1 = parts.linear1.weight
    activation = copy.deepcopy(parts.activation) if isinstance(parts.activation, nn.Module) else parts.activation
    moe = MoEFFN(d, he, copies, granularity, activation, parts.dropout, capacity_factor=capacity_factor,
                 aux_loss_weight=aux_loss_weight, record_routing=record_routing, device=w1.device, dtype=w1.dtype)

    zeros_h, zeros_d = w1.new_zeros(h), w1.new_zeros(d)
    b1 = parts.linear1.bias if parts.linear1.bias is not None else zeros_h
    b2 = parts.linear2.bias if parts.linear2.bias is not None else zeros_d
    with torch.no_grad():
        piece_w1 = w1.detach().reshape(granularity, he, d)                          # rows of W1
        piece_b1 = b1.detach().reshape(granularity, he)
        piece_w2 = parts.linear2.weight.detach().reshape(d, granularity, he).permute(1, 0, 2)  # columns of W2
        piece_b2 = (b2.detach() / granularity).expand(granularity, d)
        moe.w1.copy_(piece_w1.repeat(copies, 1, 1))   # expert c*k + j = piece j of copy c
        moe.b1.copy_(piece_b1.repeat(copies, 1))
        moe.w2.copy_(piece_w2.repeat(copies, 1, 1))
        moe.b2.copy_(piece_b2.repeat(copies, 1))
    return moe.train(ffn.training)


class _InlineFFNView(nn.Module):
    """Exposes a layer's inline FFN parts under the ``ffn_parts`` attribute names."""

    def __init__(self, linear1, activation, dropout, linear2):
        super().__init__()
        self.linear1, self.activation, self.linear2 = linear1, activation, linear2
        if dropout is not None:
            self.dropout = dropout


def replace_decoder_ffns(decoder_module: nn.Module, copies: int, granularity: int,
                         ffn_attr_name: str | Sequence[str] = "ffn", *,
                         inline_parts: tuple[str, str, str | None, str] | None = None,
                         **moe_options) -> list[str]:
    """Replace every FFN of ``decoder_module`` by ``split_ffn_into_experts(ffn, copies, granularity)``.

    Two layouts are supported:

    * ``ffn_attr_name``: any submodule whose child is called ``ffn_attr_name`` (one name or several)
      has that child replaced, e.g. ``layer.ffn = MoEFFN``.
    * ``inline_parts=(linear1, activation, dropout, linear2)`` attribute names, for layers that hold
      their FFN inline and compute ``linear2(dropout(activation(linear1(x))))`` (D-FINE's decoder
      layer: ``("linear1", "activation", "dropout3", "linear2")``; ``nn.TransformerDecoderLayer``:
      ``("linear1", "activation", "dropout", "linear2")``; ``dropout`` may be ``None``). The
      ``MoEFFN`` takes the place of ``linear1`` and the other three become ``nn.Identity``, so
      the layer's own forward now computes the MoE FFN. When ``inline_parts`` is given,
      ``ffn_attr_name`` is not used.

    ``moe_options`` go to ``split_ffn_into_experts`` (``capacity_factor``, ``aux_loss_weight``,
    ``record_routing``). Returns the qualified names of the replaced modules (for inline layers the
    layer's name); raises ``ValueError`` if nothing was found.
    """
    replaced: list[str] = []
    if inline_parts is not None:
        if len(inline_parts) != 4:
            raise ValueError(f"inline_parts must name (linear1, activation, dropout, linear2), got {inline_parts}")
        l1, act, drop, l2 = inline_parts
        targets = [(n, m) for n, m in decoder_module.named_modules()
                   if isinstance(getattr(m, l1, None), nn.Linear) and isinstance(getattr(m, l2, None), nn.Linear)]
        for name, layer in targets:
            view = _InlineFFNView(getattr(layer, l1), getattr(layer, act, None),
                                  getattr(layer, drop, None) if drop is not None else None, getattr(layer, l2))
            view.train(layer.training)
            moe = split_ffn_into_experts(view, copies, granularity, **moe_options)
            setattr(layer, l1, moe)
            for attr in (act, drop, l2):
                if attr is not None:
                    setattr(layer, attr, nn.Identity())
            replaced.append(name)
        if not replaced:
            raise ValueError(f"replace_decoder_ffns: no module of {type(decoder_module).__name__} has Linear "
                             f"attributes {l1!r} and {l2!r} (inline_parts={inline_parts})")
        return replaced

    names = [ffn_attr_name] if isinstance(ffn_attr_name, str) else list(ffn_attr_name)
    targets = [(parent_name, parent, attr) for parent_name, parent in decoder_module.named_modules()
               for attr in names if isinstance(parent._modules.get(attr), nn.Module)
               and not isinstance(parent._modules[attr], MoEFFN)]
    for parent_name, parent, attr in targets:
        setattr(parent, attr, split_ffn_into_experts(parent._modules[attr], copies, granularity, **moe_options))
        replaced.append(f"{parent_name}.{attr}" if parent_name else attr)
    if not replaced:
        raise ValueError(f"replace_decoder_ffns: no FFN child named {names} in {type(decoder_module).__name__} "
                         f"(pass ffn_attr_name=... or inline_parts=...)")
    return replaced


# --------------------------------------------------------------------------- model-level helpers
def moe_parameter_counts(module: nn.Module) -> dict[str, int]:
    """``{"total": all parameters, "active": parameters one token uses}``.

    A token uses everything outside the MoE layers, each layer's router and ``top_k`` of its
    ``num_experts`` experts: ``active = total - sum over MoE layers of (E - k) * expert size``.
    """
    total = sum(p.numel() for p in module.parameters())
    inactive = sum((m.num_experts - m.top_k) * m.expert_parameter_count()
                   for m in module.modules() if isinstance(m, MoEFFN))
    return {"total": total, "active": total - inactive}


def collect_aux_loss(module: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted ``aux_loss`` of every MoE layer (``MoEFFN``, or any layer that sets an
    ``aux_loss`` tensor, e.g. its DeepSpeed expert-parallel twin) after its last forward."""
    losses = [m.aux_loss for m in module.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
    return torch.stack(losses).sum() if losses else None


def collect_routing_traces(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: (tokens, k) trace}`` of every ``MoEFFN`` recording routing; clears them."""
    return {name: m.pop_routing_trace() for name, m in module.named_modules()
            if isinstance(m, MoEFFN) and m.record_routing}


# --------------------------------------------------------------------------- expert analysis
def _check_trace(trace: torch.Tensor, num_experts: int) -> torch.Tensor:
    if trace.dim() != 2:
        raise ValueError(f"routing trace must be (tokens, k), got shape {tuple(trace.shape)}")
    trace = trace.long()
    if trace.numel() and (trace.min() < 0 or trace.max() >= num_experts):
        raise ValueError(f"routing trace has expert ids outside [0, {num_experts}): "
                         f"min {int(trace.min())}, max {int(trace.max())}")
    return trace


def expert_load(trace: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many tokens selected each expert: ``(E,)`` long."""
    trace = _check_trace(trace, num_experts)
    return torch.bincount(trace.reshape(-1), minlength=num_experts)


def coactivation_matrix(trace: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(E, E)`` long: ``[a, b]`` = tokens that selected both ``a`` and ``b``; diagonal = load."""
    trace = _check_trace(trace, num_experts)
    chosen = torch.zeros(trace.shape[0], num_experts, dtype=torch.long)
    chosen.scatter_(1, trace.cpu(), 1)  # a token selects distinct experts; duplicates count once
    return chosen.t() @ chosen


def stable_partners(coact: torch.Tensor, threshold: float) -> torch.Tensor:
    """For each expert, how many other experts join it in more than ``threshold`` of its activations.

    ``coact`` is a ``coactivation_matrix``. Experts that never ran have 0 partners.
    """
    if coact.dim() != 2 or coact.shape[0] != coact.shape[1]:
        raise ValueError(f"coactivation matrix must be square, got shape {tuple(coact.shape)}")
    load = coact.diagonal().clamp(min=1).unsqueeze(1).double()
    share = coact.double() / load
    share.fill_diagonal_(0.0)
    return (share > threshold).sum(dim=1)


def summarise_layers(traces_by_layer: Mapping[str, torch.Tensor], num_experts: int,
                     threshold: float = 0.2) -> dict[str, dict[str, float | list[int]]]:
    """Per-layer expert statistics behind the paper's shallow-vs-deep observation.

    For each layer: ``tokens``; ``load`` (histogram); ``load_cv`` (coefficient of variation of the
    load, 0 = perfectly balanced); ``mean_partners`` (distinct experts each active expert was ever
    co-selected with: shallow layers explore many); ``mean_stable_partners`` (partners above
    ``threshold`` of an expert's activations: deep layers settle on 2-3); ``unique_combinations``
    (distinct expert sets used) and ``top_combination_share`` (share of tokens on the commonest
    set).
    """
    summary: dict[str, dict[str, float | list[int]]] = {}
    for layer, trace in traces_by_layer.items():
        trace = _check_trace(trace, num_experts)
        coact = coactivation_matrix(trace, num_experts)
        load = coact.diagonal().clone()
        active = load > 0
        off = coact.clone()
        off.fill_diagonal_(0)
        partners = (off > 0).sum(dim=1)
        stable = stable_partners(coact, threshold)
        combos = torch.sort(trace, dim=1).values
        if trace.shape[0]:
            _, counts = torch.unique(combos, dim=0, return_counts=True)
        else:
            counts = torch.zeros(0, dtype=torch.long)
        loadf = load.double()
        summary[layer] = {
            "tokens": int(trace.shape[0]),
            "load": load.tolist(),
            "load_cv": float(loadf.std(unbiased=False) / loadf.mean()) if loadf.sum() > 0 else 0.0,
            "mean_partners": float(partners[active].double().mean()) if active.any() else 0.0,
            "mean_stable_partners": float(stable[active].double().mean()) if active.any() else 0.0,
            "unique_combinations": int(counts.numel()),
            "top_combination_share": float(counts.max() / trace.shape[0]) if counts.numel() else 0.0,
        }
    return summary
