"""Dynamic-DINO experts on DeepSpeed's MoE layer (expert parallelism).

``to_deepspeed_moe`` turns a ``distillery.students.moe.MoEFFN`` into a ``deepspeed.moe.layer.MoE``
whose experts (``num_experts / ep_size`` per rank) start from the MoEFFN's expert weights, wrapped in
``DeepSpeedMoEFFN``: a drop-in ``(..., d) -> (..., d)`` module with the auxiliary loss as an
attribute. This is the only module that imports deepspeed for MoE.

What DeepSpeed 0.19.8's gate supports (``deepspeed/moe/sharded_moe.py``)
------------------------------------------------------------------------
``TopKGate`` dispatches ``k == 1`` to ``top1gating``, ``k == 2`` to ``top2gating`` and any other
``k`` to the general ``topkgating`` (the ``MoE`` docstring still says "only supports k=1 or k=2";
the code accepts any ``k``). None of them reproduces the dense FFN at step 0:

* ``top1gating`` weights the chosen expert by its raw softmax probability ``p < 1`` (no
  renormalisation), so a split FFN comes out scaled by ``p``;
* ``top2gating``/``topkgating`` renormalise the selected probabilities to sum to 1, so the ``k``
  pieces of one copy come out as ``FFN(x) / k``; ``top2gating`` also draws the second expert with
  Gumbel noise unless ``top2_2nd_expert_sampling=False``, and ``topkgating`` uses ``torch.topk``,
  whose order among tied values is unspecified;
* their router is a plain ``Linear(d, E, bias=False)`` whose equal rows need not give bitwise
  equal logits (see ``distillery.students.moe``).

``DynamicDinoGate`` therefore replaces the gate inside DeepSpeed's ``MOELayer``: it runs
``route_top_k`` (weights ``k * softmax(selected logits)``, stable tie-breaking, copy-shared router)
and returns routes in the layout ``MOELayer.forward`` of 0.19.8 asks for
(``sparse_routes=True``: ``l_aux, capacity, num_experts, indices[k, S], locations[k, S],
gates[k, S], exp_counts``), or the classic ``(l_aux, combine_weights, dispatch_mask, exp_counts)``
when called with ``sparse_routes=False``. ``use_our_gate=None`` picks our gate unless DeepSpeed's
is exact, which only happens for a single expert.

Process groups: ``deepspeed.moe`` keeps its expert-parallel groups in ``deepspeed.utils.groups``.
``to_deepspeed_moe`` with ``ep_size > 1`` needs ``deepspeed.init_distributed`` first: it creates
the group ``ep_size_<n>`` (if missing) to learn which experts this rank holds and loads exactly
those. ``deepspeed.initialize`` later finds the group and attaches it to the layer.
"""

from __future__ import annotations

import copy
from types import EllipsisType

import torch
from torch import nn

from deepspeed import comm as ds_dist
from deepspeed.comm import pg_utils
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups

from distillery.students.moe import DEFAULT_AUX_LOSS_WEIGHT, ExpertFFN, MoEFFN, TopKRouter, route_top_k

__all__ = [
    "DS_GATE_TOP_K",
    "DeepSpeedMoEFFN",
    "DynamicDinoGate",
    "deepspeed_gate_is_exact",
    "gather_moe_ffn",
    "to_deepspeed_moe",
]

#: Which DeepSpeed gating function serves which k in the pinned release (any k >= 1 is accepted).
DS_GATE_TOP_K = {1: "top1gating", 2: "top2gating", "k>2": "topkgating"}


def deepspeed_gate_is_exact(copies: int, granularity: int) -> bool:
    """Whether DeepSpeed's own ``TopKGate`` reproduces the dense FFN at step 0.

    Top-1 weighs by ``p`` (exact only when ``p == 1``: a single expert); top-k (k >= 2) weighs
    the ``k`` pieces by ``1/k`` each. Hence: only ``copies == granularity == 1``.
    """
    return copies * granularity == 1


class DynamicDinoGate(nn.Module):
    """Dynamic-DINO's top-k gate with DeepSpeed's gate interface (drop-in for ``TopKGate``).

    ``capacity_factor=None`` drops nothing: the buffer capacity is the largest expert load, agreed
    across the expert-parallel group (all-to-all needs equal buffers on every rank).
    """

    def __init__(self, router: TopKRouter, k: int, capacity_factor: float | None = None,
                 eval_capacity_factor: float | None = None, ep_group=None):
        super().__init__()
        self.router = router
        self.k = k
        self.num_experts = router.copies * router.granularity
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.ep_group = ep_group
        # Attributes MOELayer / the engine may read on a gate.
        self.wall_clock_breakdown = False
        self.gate_time = 0.0

    def _set_ep_group(self, ep_group) -> None:
        if self.ep_group is not None and ep_group is not self.ep_group:
            raise RuntimeError("DynamicDinoGate: attempting to replace an existing expert-parallel group")
        self.ep_group = ep_group

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None,
                sparse_routes: bool = False, use_tutel: bool = False):
        if use_tutel:
            raise ValueError("DynamicDinoGate does not support Tutel dispatch (use_tutel=True)")
        weight_dtype = self.router.copy_weight.dtype
        logits = self.router(input.to(weight_dtype)).float()
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        routing = route_top_k(logits, self.k, factor)
        kept = routing.kept
        if used_token is not None:
            kept = kept & used_token.bool().reshape(-1, 1)
        exp_counts = torch.bincount(routing.expert_index.reshape(-1), minlength=self.num_experts).detach()

        if routing.capacity is None:
            capacity = torch.max(torch.where(kept, routing.location + 1, torch.zeros_like(routing.location)))
            capacity = capacity.reshape(1).clamp(min=1)
        else:
            capacity = torch.tensor([routing.capacity], device=logits.device)
        if pg_utils.is_parallel(self.ep_group):  # every rank must size its buffers the same
            ds_dist.all_reduce(capacity, op=ds_dist.ReduceOp.MAX, group=self.ep_group)
        capacity = capacity.reshape(())

        gates = routing.combine_weight * kept
        l_aux = routing.balance_loss
        if sparse_routes:
            indices = torch.where(kept, routing.expert_index, torch.full_like(routing.expert_index, -1))
            locations = routing.location * kept
            return (l_aux, capacity, self.num_experts, indices.t().contiguous().to(torch.int32),
                    locations.t().contiguous().to(torch.int32), gates.t().contiguous(), exp_counts)

        # Dense GShard form: combine_weights[s, e, c].
        num_tokens = logits.shape[0]
        combine = torch.zeros(num_tokens, self.num_experts, int(capacity), device=logits.device)
        token = torch.arange(num_tokens, device=logits.device).unsqueeze(1).expand_as(routing.expert_index)
        location = routing.location.clamp(max=int(capacity) - 1)
        combine = combine.index_put((token, routing.expert_index, location), gates, accumulate=True)
        return l_aux, combine, combine.bool(), exp_counts


class DeepSpeedMoEFFN(nn.Module):
    """``(..., d) -> (..., d)`` around ``deepspeed.moe.layer.MoE``.

    After each forward: ``aux_loss`` (``aux_loss_weight * load_balancing_loss``),
    ``load_balancing_loss`` and ``exp_counts`` (tokens per expert on this rank, before capacity).
    """

    def __init__(self, moe: MoE, *, copies: int, granularity: int, d_model: int, expert_hidden: int,
                 aux_loss_weight: float = DEFAULT_AUX_LOSS_WEIGHT):
        super().__init__()
        self.moe = moe
        self.copies, self.granularity = copies, granularity
        self.num_experts, self.top_k = copies * granularity, granularity
        self.d_model, self.expert_hidden = d_model, expert_hidden
        self.aux_loss_weight = aux_loss_weight
        self.aux_loss: torch.Tensor | None = None
        self.load_balancing_loss: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None

    @property
    def gate(self) -> nn.Module:
        return self.moe.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"DeepSpeedMoEFFN: input's last dimension is {x.shape[-1]}, "
                             f"expected d_model={self.d_model}")
        out, l_aux, exp_counts = self.moe(x)
        self.load_balancing_loss = l_aux
        self.aux_loss = self.aux_loss_weight * l_aux
        self.exp_counts = exp_counts
        return out


def _expert_parallel_rank(ep_size: int, use_data_before_expert_parallel: bool) -> int:
    """This rank's position in its expert-parallel group, creating DeepSpeed's groups if needed."""
    if ep_size == 1:
        return 0
    if not ds_dist.is_initialized():
        raise RuntimeError(f"to_deepspeed_moe(ep_size={ep_size}) needs torch.distributed: call "
                           "deepspeed.init_distributed() first")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    return groups._get_expert_parallel_rank(name)


def to_deepspeed_moe(moe_ffn: MoEFFN, ep_size: int = 1, use_our_gate: bool | None = None,
                     capacity_factor: float | None | EllipsisType = ...,
                     eval_capacity_factor: float | None | EllipsisType = ..., *,
                     aux_loss_weight: float | None = None,
                     use_data_before_expert_parallel: bool = False) -> DeepSpeedMoEFFN:
    """Build DeepSpeed's MoE layer from ``moe_ffn``'s router and experts.

    * ``ep_size``: ranks the ``E`` experts are spread over (``E % ep_size == 0``); this rank gets
      experts ``[r * E / ep_size, (r + 1) * E / ep_size)`` where ``r`` is its expert-parallel rank.
    * ``use_our_gate``: ``True`` plugs ``DynamicDinoGate`` (step-0 exact); ``False`` keeps
      DeepSpeed's ``TopKGate`` (router weight copied, no noise, no random token selection; step 0
      gives ``FFN/k`` or ``p * FFN``); ``None`` (default) uses ours unless
      ``deepspeed_gate_is_exact``.
    * ``capacity_factor`` / ``eval_capacity_factor``: ``None`` drops no token; default: the
      ``MoEFFN``'s ``capacity_factor`` (for both).
    * ``aux_loss_weight``: default the ``MoEFFN``'s.
    """
    if not isinstance(moe_ffn, MoEFFN):
        raise TypeError(f"to_deepspeed_moe expects an MoEFFN, got {type(moe_ffn).__name__}")
    E, k = moe_ffn.num_experts, moe_ffn.top_k
    if ep_size <= 0 or E % ep_size != 0:
        raise ValueError(f"to_deepspeed_moe: ep_size={ep_size} must divide the number of experts {E}")
    if capacity_factor is ...:
        capacity_factor = moe_ffn.capacity_factor
    if eval_capacity_factor is ...:
        eval_capacity_factor = capacity_factor
    if use_our_gate is None:
        use_our_gate = not deepspeed_gate_is_exact(moe_ffn.copies, moe_ffn.granularity)
    if not use_our_gate and (capacity_factor is None) != (eval_capacity_factor is None):
        raise ValueError("DeepSpeed's TopKGate has one drop_tokens switch: capacity_factor and "
                         "eval_capacity_factor must both be None or both be numbers")

    activation = (copy.deepcopy(moe_ffn.activation) if isinstance(moe_ffn.activation, nn.Module)
                  else moe_ffn.activation)
    template = ExpertFFN(moe_ffn.d_model, moe_ffn.expert_hidden, activation, moe_ffn.dropout.p)
    template = template.to(moe_ffn.w1.device, moe_ffn.w1.dtype)
    drop_tokens = capacity_factor is not None
    moe = MoE(hidden_size=moe_ffn.d_model, expert=template, num_experts=E, ep_size=ep_size, k=k,
              capacity_factor=capacity_factor if drop_tokens else 1.0,
              eval_capacity_factor=eval_capacity_factor if eval_capacity_factor is not None else 1.0,
              min_capacity=0, drop_tokens=drop_tokens, use_rts=False, noisy_gate_policy=None,
              top2_2nd_expert_sampling=False)

    if use_our_gate:
        router = copy.deepcopy(moe_ffn.router)
        moe.deepspeed_moe.gate = DynamicDinoGate(router, k, capacity_factor, eval_capacity_factor)
    else:
        gate = moe.deepspeed_moe.gate
        assert isinstance(gate, TopKGate)
        with torch.no_grad():
            gate.wg.weight.copy_(moe_ffn.router.weight.detach())

    rank = _expert_parallel_rank(ep_size, use_data_before_expert_parallel)
    local = E // ep_size
    with torch.no_grad():
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            e = rank * local + i
            expert.linear1.weight.copy_(moe_ffn.w1[e])
            expert.linear1.bias.copy_(moe_ffn.b1[e])
            expert.linear2.weight.copy_(moe_ffn.w2[e])
            expert.linear2.bias.copy_(moe_ffn.b2[e])
    weight = moe_ffn.aux_loss_weight if aux_loss_weight is None else aux_loss_weight
    return DeepSpeedMoEFFN(moe, copies=moe_ffn.copies, granularity=moe_ffn.granularity, d_model=moe_ffn.d_model,
                           expert_hidden=moe_ffn.expert_hidden, aux_loss_weight=weight)


def gather_moe_ffn(module: DeepSpeedMoEFFN) -> MoEFFN:
    """Collect every rank's experts into one plain ``MoEFFN`` (e.g. to export after training).

    Collective over the expert-parallel group when ``ep_size > 1``: every rank of the group must
    call it. Capacity settings come from the gate's training values. From a layer with DeepSpeed's
    own ``TopKGate`` the router's logits and the experts carry over exactly, but the result then
    combines experts with Dynamic-DINO's normalisation (``k * softmax``), not DeepSpeed's.
    """
    ds_moe = module.moe
    gate = module.gate
    experts = module.local_experts
    first = experts[0]
    activation = copy.deepcopy(first.activation) if isinstance(first.activation, nn.Module) else first.activation
    capacity_factor = (gate.capacity_factor if isinstance(gate, DynamicDinoGate)
                       else (gate.capacity_factor if gate.drop_tokens else None))
    w = first.linear1.weight
    out = MoEFFN(module.d_model, module.expert_hidden, module.copies, module.granularity, activation,
                 first.dropout.p, capacity_factor=capacity_factor, aux_loss_weight=module.aux_loss_weight,
                 device=w.device, dtype=w.dtype)

    def stacked(get) -> torch.Tensor:
        local = torch.stack([get(ex).detach() for ex in experts])
        if ds_moe.ep_size == 1:
            return local
        group = ds_moe.deepspeed_moe.ep_group
        if group is None:
            raise RuntimeError("gather_moe_ffn: the layer has no expert-parallel group yet "
                               "(deepspeed.initialize or set_deepspeed_parallelism first)")
        parts = [torch.empty_like(local) for _ in range(ds_moe.ep_size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    with torch.no_grad():
        out.w1.copy_(stacked(lambda ex: ex.linear1.weight))
        out.b1.copy_(stacked(lambda ex: ex.linear1.bias))
        out.w2.copy_(stacked(lambda ex: ex.linear2.weight))
        out.b2.copy_(stacked(lambda ex: ex.linear2.bias))
        if isinstance(gate, DynamicDinoGate):
            out.router.load_state_dict(gate.router.state_dict())
        else:  # a plain Linear router: all of it in the per-expert part, exactly the same logits
            out.router.copy_weight.zero_()
            out.router.piece_weight.copy_(gate.wg.weight)
    return out
