"""Parameter-efficient fine-tuning of ViT backbones: AdaRoute adapters and a LoRA baseline.

``apply_peft(vit, "adaroute" | "lora" | "none", ...)`` freezes every parameter the ViT already
has, wraps chosen ``nn.Linear`` sub-layers of its blocks with trainable adapters and returns a
:class:`PeftReport` (trainable vs total parameter counts). It only touches the module it is
given: pass the backbone's ViT (``detector.backbone.vit``, a bare timm ``VisionTransformer`` or
``Eva`` such as ``vit_small_patch16_dinov3``, or the DINOv3 teacher ``vit_base_patch16_dinov3``),
and the detector's encoder, decoder and heads stay trainable because they are not inside it.
The caller decides what else to freeze.

AdaRoute (Lou, Yu, Yu, "Parameters as Experts: Adapting Vision Models with Dynamic Parameter
Routing", arXiv 2602.06862; released as ParaX)
-------------------------------------------------------------------------------------------
* **Shared expert centre.** One :class:`ExpertCentre` holds ``E`` down-projection experts
  ``(E, d_in, r)`` and ``E`` up-projection experts ``(E, r, d_out)``, one tensor each. Every
  adapted layer of the same kind (e.g. ``attn.proj`` of all adapted blocks) draws its weights
  from the same centre: the abstract's "AdaRoute modules across multiple network layers share
  the same expert center", which gives the cross-layer interaction the paper argues for. The
  centres are registered once, on the ViT, as ``<vit>.peft_centres.<kind>``; the adapted layers
  only hold an unregistered reference, so each centre appears once in ``named_parameters()``,
  ``state_dict()`` and the optimizer (DeepSpeed ZeRO 0-2 and DDP see ordinary parameters).
  Following the released code, the default number of experts equals the number of adapted
  blocks.
* **Router, per adapted layer.** The layer's input tokens are mean-pooled per sample; a small MLP
  ``Linear(d_in, h) -> GELU -> Linear(h, 2E)`` (h = 16 as in the released code) gives two sets of
  logits, and a softmax over each gives per-sample mixing weights for the down and the up
  experts (dense mixing by default, as in the released code; ``top_k`` keeps only the k largest
  logits of each set before the softmax, so the other experts get exactly zero weight).
* **Dynamic low-rank adapter.** Per sample, ``D = sum_e w_down[e] * down[e]`` (d_in, r) and
  ``U = sum_e w_up[e] * up[e]`` (r, d_out); the layer computes
  ``y = W x + b + scale * U^T GELU(D^T x)`` (the frozen layer's output plus the adapter). The
  weights depend on the input, so unlike LoRA the adapter cannot be folded into ``W``: it stays
  in the exported model. It is written with ``matmul``/``bmm``, ``mean``, ``softmax`` and
  (optionally) ``topk`` only, with no data-dependent Python branches, so it exports to ONNX with
  a dynamic batch axis.
* **Zero start.** The up-projection experts are zero-initialised, so at step 0 every mixed ``U``
  is zero and the adapted model equals the frozen one. The first backward still reaches the up
  experts (their gradient is ``w_up[e] * GELU(D^T x) * dL/dy`` with random ``D``); once ``U`` is
  non-zero the down experts and the router receive gradient too, the same argument as LoRA's
  zero-initialised ``B``. The down experts start like ``nn.Linear`` weights,
  ``U(-1/sqrt(d_in), 1/sqrt(d_in))``, independently per expert.

What is adapted, and why
------------------------
The paper inserts an AdaRoute module on the residual stream *after* each branch: in Swin one
after the attention branch and one after the FFN branch of every block, all of a stage sharing
one centre; in its ViT one after each block. Our default adapts, in every chosen block, the two
``nn.Linear`` layers that write those branches into the residual stream: ``attn.proj`` (end of
the attention branch, ``d -> d``) and ``mlp.fc2`` (end of the MLP branch, ``hidden -> d``), as
parallel adapters. Working at ``nn.Linear`` granularity (any dotted path inside a block can be
chosen with ``sublayers=``, e.g. ``("attn.qkv", "mlp.fc1")``) buys three things:

1. LoRA adapts exactly the same layers, and because they are linear, LoRA can be merged into the
   frozen weights for export (:func:`merge_lora`). Adapting a whole block or a whole MLP would
   make the LoRA baseline unmergeable.
2. It is generic across timm's ``VisionTransformer`` blocks (``attn.proj``, ``mlp.fc2``,
   ``ls1/ls2``) and ``Eva`` blocks (DINOv3: ``attn.proj``, ``mlp.fc2`` in ``Mlp``, ``GluMlp`` and
   ``SwiGLU`` alike, ``gamma_1/gamma_2``): nothing about the block's forward (RoPE arguments,
   layer scale, drop path) has to be re-implemented, and the branch's own layer scale still
   applies to the adapter, as it does to the rest of the branch.
3. The frozen weight stays at its original ``state_dict`` key (``blocks.3.attn.proj.weight``): the
   wrappers subclass ``nn.Linear`` and reuse the original parameters, so a pretrained checkpoint
   loads into an adapted model (``strict=False`` for the new keys) and a merged LoRA model has
   exactly the original keys.

Because ``fc2``'s input (``hidden``) and ``proj``'s input (``d``) differ, each adapted kind has
its own centre (the paper likewise keeps one centre per stage, i.e. per width).

The router pools over all tokens of the layer input (class and register tokens included): the
wrapped ``nn.Linear`` does not know how many prefix tokens the model has, and a mean over a few
hundred patch tokens is barely moved by five prefix tokens.

LoRA baseline
-------------
:class:`LoRALinear`: ``y = W x + b + (alpha / r) * B A x`` with ``A`` (r, d_in) initialised like
``nn.Linear`` weights and ``B`` (d_out, r) zero, on the same sub-layers. ``lora_alpha=None`` means
``alpha = r`` (scaling 1, the same as AdaRoute's default ``scale``). :func:`lora_rank_for_budget`
picks the rank whose trainable-parameter count is closest to a given AdaRoute budget.

Not supported: DeepSpeed ZeRO-3 is untested (the centre is called as a module by each adapted
layer, so ZeRO-3's gather hooks do fire, but nothing checks it); deep-copying a single block
(rather than the whole ViT) gives the copy a private centre.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_SUBLAYERS",
    "AdaRouteLinear",
    "AdaRouteRouter",
    "ExpertCentre",
    "LoRALinear",
    "PeftReport",
    "apply_peft",
    "count_parameters",
    "lora_params_per_rank",
    "lora_rank_for_budget",
    "merge_lora",
]

PeftMethod = Literal["adaroute", "lora", "none"]
METHODS: tuple[str, ...] = ("adaroute", "lora", "none")

# The two projections that write the attention and the MLP branch into the residual stream.
DEFAULT_SUBLAYERS: tuple[str, ...] = ("attn.proj", "mlp.fc2")

CENTRES_ATTRIBUTE = "peft_centres"


# --------------------------------------------------------------------------------------------
# AdaRoute
# --------------------------------------------------------------------------------------------
class ExpertCentre(nn.Module):
    """The shared pool of expert matrices: ``down`` (E, d_in, r) and ``up`` (E, r, d_out).

    Calling the module returns ``(down, up)``. Adapted layers call it instead of reading the
    attributes so that module hooks (e.g. a sharding engine's parameter gather) see the use.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int, *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_positive("ExpertCentre", num_experts=num_experts, in_features=in_features,
                        out_features=out_features, rank=rank)
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(num_experts, in_features, rank, **factory))
        self.up = nn.Parameter(torch.empty(num_experts, rank, out_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Down experts like nn.Linear weights of fan-in d_in (independently per expert); up experts
        # zero so that every mixed up-projection is zero and the adapted model starts as the frozen one.
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.down, -bound, bound)
        nn.init.zeros_(self.up)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.down, self.up

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}")


class AdaRouteRouter(nn.Module):
    """Mean-pooled tokens ``(B, N, d_in)`` -> mixing weights ``(B, E)`` for down and for up experts."""

    def __init__(self, in_features: int, num_experts: int, hidden: int = 16, top_k: int | None = None, *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_positive("AdaRouteRouter", in_features=in_features, num_experts=num_experts, hidden=hidden)
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"AdaRouteRouter: top_k must be in [1, num_experts={num_experts}] or None, "
                             f"got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden, **factory)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 2 * num_experts, **factory)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = tokens.mean(dim=1)
        logits = self.fc2(self.act(self.fc1(pooled)))
        down_logits = logits[:, : self.num_experts]
        up_logits = logits[:, self.num_experts:]
        return self._mixing_weights(down_logits), self._mixing_weights(up_logits)

    def _mixing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        # Softmax in float32: under bf16/fp16 training the weights must still sum to 1.
        logits = logits.float()
        if self.top_k is not None and self.top_k < self.num_experts:
            # Keep the k largest logits per sample; the others get exactly zero weight. A tie at
            # the k-th value keeps all tied experts (no data-dependent branching needed for that).
            kth_largest = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        return logits.softmax(dim=-1).to(self.fc2.weight.dtype)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


def _adopt_linear(layer: nn.Linear, base: nn.Linear) -> None:
    """Initialise ``layer`` (an ``nn.Linear`` subclass) as a wrapper of ``base``: no fresh weight
    (``nn.Linear.__init__`` would allocate one), the original parameters reused, shapes copied."""
    nn.Module.__init__(layer)
    layer.in_features = base.in_features
    layer.out_features = base.out_features
    layer.weight = base.weight
    if base.bias is None:
        layer.register_parameter("bias", None)
    else:
        layer.bias = base.bias


class AdaRouteLinear(nn.Linear):
    """A frozen ``nn.Linear`` plus an AdaRoute adapter whose weights are routed from a shared centre.

    ``forward(x) = F.linear(x, W, b) + scale * bmm(GELU(bmm(x, D)), U)`` with per-sample
    ``D = w_down @ centre.down`` and ``U = w_up @ centre.up``. ``x`` is ``(B, N, d_in)`` (any
    ``(B, ..., d_in)`` is flattened to tokens). ``weight``/``bias`` are the original parameters.
    """

    def __init__(self, base: nn.Linear, centre: ExpertCentre, *, router_hidden: int = 16,
                 top_k: int | None = None, scale: float = 1.0) -> None:
        if (centre.in_features, centre.out_features) != (base.in_features, base.out_features):
            raise ValueError(f"AdaRouteLinear: centre is {centre.in_features}->{centre.out_features} but the "
                             f"layer is {base.in_features}->{base.out_features}")
        _adopt_linear(self, base)
        # Deliberately NOT registered as a submodule: the centre is registered once on the ViT
        # (``peft_centres``); registering it here as well would list it once per layer in state_dict.
        object.__setattr__(self, "_centre", centre)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.router = AdaRouteRouter(self.in_features, centre.num_experts, router_hidden, top_k, **factory)
        self.scale = float(scale)

    @property
    def centre(self) -> ExpertCentre:
        return self._centre

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"AdaRouteLinear expects tokens shaped (B, N, {self.in_features}) "
                             f"(or (B, ..., {self.in_features})), got shape {tuple(x.shape)}")
        return x.flatten(1, -2) if x.dim() > 3 else x

    def routing_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample mixing weights ``(w_down, w_up)``, each ``(B, E)``, for this layer's input."""
        return self.router(self._tokens(x))

    def dynamic_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample adapter matrices ``D`` (B, d_in, r) and ``U`` (B, r, d_out) for this input."""
        w_down, w_up = self.routing_weights(x)
        down, up = self._centre()
        num_experts, _, rank = down.shape
        mixed_down = torch.matmul(w_down, down.reshape(num_experts, -1)).reshape(-1, self.in_features, rank)
        mixed_up = torch.matmul(w_up, up.reshape(num_experts, -1)).reshape(-1, rank, self.out_features)
        return mixed_down, mixed_up

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution ``scale * U^T GELU(D^T x)`` (before adding the frozen output)."""
        tokens = self._tokens(x)
        mixed_down, mixed_up = self.dynamic_weights(tokens)
        delta = torch.bmm(F.gelu(torch.bmm(tokens, mixed_down)), mixed_up)
        if x.dim() > 3:
            delta = delta.reshape(x.shape[:-1] + (self.out_features,))
        return self.scale * delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.adapter(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, experts={self._centre.num_experts}, "
                f"rank={self._centre.rank}, scale={self.scale}")


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------
class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a static low-rank update: ``W x + b + (alpha / r) * B A x``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        _check_positive("LoRALinear", rank=rank)
        _adopt_linear(self, base)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # A
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # B, zero: start = frozen
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.lora_down, -bound, bound)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_up @ self.lora_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = F.linear(x, self.weight, self.bias)
        return frozen + self.scaling * F.linear(F.linear(x, self.lora_down), self.lora_up)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (alpha / r) B A`` (same bias, same requires_grad flags)."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        merged.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
        merged.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            merged.bias.copy_(self.bias)
            merged.bias.requires_grad_(self.bias.requires_grad)
        return merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}")


# --------------------------------------------------------------------------------------------
# apply_peft and friends
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftReport:
    """What :func:`apply_peft` did to one module. Counts are over that module only, shared tensors once."""

    method: str
    target: str
    adapted_layers: tuple[str, ...]
    original_params: int
    adapter_params: int
    total_params: int
    trainable_params: int
    config: dict = field(default_factory=dict)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def as_dict(self) -> dict:
        """Flat, JSON-friendly view (e.g. for experiment tracking)."""
        out = asdict(self)
        out["adapted_layers"] = list(self.adapted_layers)
        out["frozen_params"] = self.frozen_params
        out["trainable_fraction"] = self.trainable_fraction
        return out

    def summary(self) -> str:
        return (f"{self.target}: {self.method}, {len(self.adapted_layers)} adapted layers, "
                f"trainable {self.trainable_params:,} / total {self.total_params:,} "
                f"({100.0 * self.trainable_fraction:.2f}%), adapters {self.adapter_params:,}")


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module``; a tensor shared by several layers counts once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def apply_peft(
    model: nn.Module,
    method: PeftMethod,
    *,
    blocks: Iterable[int] | None = None,
    sublayers: Sequence[str] = DEFAULT_SUBLAYERS,
    rank: int = 16,
    num_experts: int | None = None,
    top_k: int | None = None,
    router_hidden: int = 16,
    scale: float = 1.0,
    lora_alpha: float | None = None,
    target: str = "backbone",
) -> PeftReport:
    """Freeze ``model`` (a ViT with ``.blocks``) and insert adapters into its blocks, in place.

    Args:
        model: the ViT module itself (timm ``VisionTransformer``/``Eva`` or anything with
            ``.blocks``). Only its parameters are frozen; modules outside it are not touched.
        method: ``"adaroute"``, ``"lora"`` or ``"none"`` (leave the module as it is: no freezing,
            no adapters, i.e. ordinary fine-tuning; the report still counts its parameters).
        blocks: indices into ``model.blocks`` to adapt (negative indices allowed); default all.
        sublayers: dotted paths of ``nn.Linear`` layers inside each block to adapt.
        rank: bottleneck width r of the AdaRoute experts, or the LoRA rank.
        num_experts: AdaRoute experts per centre; default the number of adapted blocks.
        top_k: AdaRoute sparse mixing (keep the k largest router logits); default dense softmax.
        router_hidden: hidden width of each AdaRoute router MLP.
        scale: constant factor on the AdaRoute adapter output.
        lora_alpha: LoRA alpha (scaling alpha / rank); default ``alpha = rank``.
        target: label of the adapted part, reported back (e.g. ``"backbone"``, ``"teacher"``).

    Returns:
        a :class:`PeftReport` with the adapted layer names and trainable vs total counts.
    """
    if method not in METHODS:
        raise ValueError(f"apply_peft(method={method!r}): expected one of {', '.join(METHODS)}")
    original = count_parameters(model)
    if method == "none":
        return PeftReport(method=method, target=target, adapted_layers=(), original_params=original,
                          adapter_params=0, total_params=original,
                          trainable_params=count_parameters(model, trainable_only=True), config={})

    _check_positive("apply_peft", rank=rank)
    if _is_adapted(model):
        raise RuntimeError(f"apply_peft: the {target} module already has adapters; build a fresh model "
                           "(and load its state_dict) instead of adapting twice")
    layers = _find_target_layers(model, blocks, sublayers)
    n_blocks = len({block_index for block_index, _, _ in layers})

    experts = n_blocks if num_experts is None else num_experts
    if method == "adaroute":  # validate everything before touching the model
        _check_positive("apply_peft", num_experts=experts, router_hidden=router_hidden)
        if top_k is not None and not 1 <= top_k <= experts:
            raise ValueError(f"apply_peft(top_k={top_k}): must be in [1, num_experts={experts}] or None")
        _check_centre_shapes(layers)

    for p in model.parameters():
        p.requires_grad_(False)

    config: dict = {"blocks": sorted({block_index for block_index, _, _ in layers}),
                    "sublayers": list(sublayers), "rank": rank}
    if method == "adaroute":
        centres = _build_centres(layers, experts, rank)
        setattr(model, CENTRES_ATTRIBUTE, centres)  # registered once, on the ViT
        for _, path, layer in layers:
            centre = centres[_centre_key(path.split(".", 2)[2])]
            _replace(model, path, AdaRouteLinear(layer, centre, router_hidden=router_hidden,
                                                 top_k=top_k, scale=scale))
        config.update(num_experts=experts, top_k=top_k, router_hidden=router_hidden, scale=scale)
    else:  # lora
        for _, path, layer in layers:
            _replace(model, path, LoRALinear(layer, rank, lora_alpha))
        config.update(lora_alpha=float(rank if lora_alpha is None else lora_alpha))

    total = count_parameters(model)
    return PeftReport(method=method, target=target, adapted_layers=tuple(path for _, path, _ in layers),
                      original_params=original, adapter_params=total - original, total_params=total,
                      trainable_params=count_parameters(model, trainable_only=True), config=config)


def lora_rank_for_budget(model: nn.Module, adaroute_trainable_params: int, *,
                         blocks: Iterable[int] | None = None,
                         sublayers: Sequence[str] = DEFAULT_SUBLAYERS) -> int:
    """The LoRA rank whose trainable-parameter count on the same layers is closest to a budget.

    LoRA on layers ``d_in -> d_out`` costs ``r * sum(d_in + d_out)`` parameters, so the result is
    ``max(1, round(budget / sum(d_in + d_out)))``: its count is within half of ``sum(d_in + d_out)``
    of the budget (unless the budget is below one rank). ``model`` may be adapted or not.
    """
    if adaroute_trainable_params <= 0:
        raise ValueError(f"lora_rank_for_budget: adaroute_trainable_params must be > 0, "
                         f"got {adaroute_trainable_params}")
    per_rank = lora_params_per_rank(model, blocks=blocks, sublayers=sublayers)
    return max(1, round(adaroute_trainable_params / per_rank))


def lora_params_per_rank(model: nn.Module, *, blocks: Iterable[int] | None = None,
                         sublayers: Sequence[str] = DEFAULT_SUBLAYERS) -> int:
    """LoRA parameters added per unit of rank on the chosen layers: ``sum(d_in + d_out)``."""
    layers = _find_target_layers(model, blocks, sublayers)
    return sum(layer.in_features + layer.out_features for _, _, layer in layers)


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` inside ``model`` by its merged ``nn.Linear``, in place.

    Returns the number of merged layers. AdaRoute layers are input-dependent and stay as they are.
    """
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merge())
            merged += 1
    return merged


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_positive(where: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")


def _is_adapted(model: nn.Module) -> bool:
    return hasattr(model, CENTRES_ATTRIBUTE) or any(
        isinstance(m, (AdaRouteLinear, LoRALinear)) for m in model.modules())


def _centre_key(sublayer: str) -> str:
    return sublayer.replace(".", "_")  # ModuleDict keys may not contain dots


def _find_target_layers(model: nn.Module, blocks: Iterable[int] | None,
                        sublayers: Sequence[str]) -> list[tuple[int, str, nn.Linear]]:
    """``(block index, qualified name, layer)`` for every chosen sub-layer of every chosen block."""
    all_blocks = getattr(model, "blocks", None)
    if not isinstance(all_blocks, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"apply_peft: {type(model).__name__} has no `.blocks` (nn.Sequential/nn.ModuleList); "
                         "pass the ViT module itself (e.g. detector.backbone.vit)")
    depth = len(all_blocks)
    if isinstance(sublayers, str) or not sublayers:
        raise ValueError(f"apply_peft(sublayers={sublayers!r}): expected a non-empty sequence of dotted paths")
    if blocks is None:
        indices = list(range(depth))
    else:
        indices = []
        for index in blocks:
            if not isinstance(index, int) or not -depth <= index < depth:
                raise ValueError(f"apply_peft(blocks=...): block index {index!r} is out of range for "
                                 f"{depth} blocks")
            indices.append(index % depth)
        indices = sorted(set(indices))
        if not indices:
            raise ValueError("apply_peft(blocks=...): no block selected")

    found = []
    for index in indices:
        block = all_blocks[index]
        for sublayer in sublayers:
            name = f"blocks.{index}.{sublayer}"
            try:
                layer = block.get_submodule(sublayer)
            except AttributeError as exc:
                raise ValueError(f"apply_peft(sublayers=...): {name} does not exist in "
                                 f"{type(block).__name__}") from exc
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"apply_peft(sublayers=...): {name} is a {type(layer).__name__}, "
                                 "not an nn.Linear")
            found.append((index, name, layer))
    return found


def _check_centre_shapes(layers: list[tuple[int, str, nn.Linear]]) -> None:
    """Every layer sharing a centre (same sub-layer path) must have the same widths."""
    shapes: dict[str, tuple[str, int, int]] = {}
    for _, name, layer in layers:
        key = _centre_key(name.split(".", 2)[2])
        first = shapes.setdefault(key, (name, layer.in_features, layer.out_features))
        if first[1:] != (layer.in_features, layer.out_features):
            raise ValueError(f"apply_peft: {name} is {layer.in_features}->{layer.out_features} but {first[0]} "
                             f"is {first[1]}->{first[2]}; one expert centre needs one shape (choose blocks of "
                             "one width, or other sublayers)")


def _build_centres(layers: list[tuple[int, str, nn.Linear]], num_experts: int, rank: int) -> nn.ModuleDict:
    """One centre per sub-layer kind, shared by that kind across all adapted blocks."""
    centres = nn.ModuleDict()
    for _, name, layer in layers:
        key = _centre_key(name.split(".", 2)[2])
        if key not in centres:
            centres[key] = ExpertCentre(num_experts, layer.in_features, layer.out_features, rank,
                                        device=layer.weight.device, dtype=layer.weight.dtype)
    return centres


def _replace(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, attribute = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attribute, new)
