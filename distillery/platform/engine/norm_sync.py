"""Normalisation statistics that agree across data-parallel ranks (both training workers use this).

DeepSpeed keeps the *parameters* of data-parallel ranks identical, but not the buffers: a
BatchNorm layer's running mean and variance follow the batches of the rank that computed them.
Left alone, every rank would evaluate its shard of the val set with a different model, and the
checkpoint would keep rank 0's statistics only. Two remedies, chosen by the backend:

* CUDA/NCCL: BatchNorm layers become ``torch.nn.SyncBatchNorm`` before DeepSpeed wraps the model
  (:func:`distillery.platform.engine.batchnorm.batchnorm_for_backend`), as the reference recipes
  (``sync_bn: True``) train: batch statistics are computed over the global batch, so the running
  statistics agree step by step.
* gloo on CPU (SyncBatchNorm needs a GPU): the running statistics are averaged over ranks
  (:func:`average_norm_statistics`) before each evaluation and each checkpoint, for the trained
  model and for its EMA copy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_norm_statistics"]


def _running_statistics(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(floating running mean/var buffers, integer num_batches_tracked buffers) of the norm layers."""
    floats: list[torch.Tensor] = []
    counters: list[torch.Tensor] = []
    for layer in module.modules():
        # _NormBase: BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm with tracked statistics.
        if not isinstance(layer, nn.modules.batchnorm._NormBase) or not layer.track_running_stats:
            continue
        floats += [b for b in (layer.running_mean, layer.running_var) if b is not None and b.numel()]
        if layer.num_batches_tracked is not None:
            counters.append(layer.num_batches_tracked)
    return floats, counters


@torch.no_grad()
def average_norm_statistics(*modules: nn.Module) -> None:
    """Average the running statistics of every norm layer of ``modules`` over all ranks, in place.

    Running means and variances are averaged (in float64, one all-reduce for all of them);
    ``num_batches_tracked`` counters become their integer mean, the same on every rank. Only
    the layers' running statistics change: other buffers (position tables, pixel means) are
    constants that every rank already shares. Without a process group, or with one rank, nothing
    happens. Every rank must call this with the same modules (it is a collective)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    floats: list[torch.Tensor] = []
    counters: list[torch.Tensor] = []
    for module in modules:
        f, c = _running_statistics(module)
        floats += f
        counters += c
    for buffers, dtype in ((floats, torch.float64), (counters, torch.int64)):
        if not buffers:
            continue
        flat = torch.cat([b.detach().to(dtype).reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat = flat / world if dtype.is_floating_point else torch.div(flat, world, rounding_mode="floor")
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
