"""BatchNorm across ranks: SyncBatchNorm under NCCL, plain BatchNorm under gloo.

The reference recipes (D-FINE/DEIM/RT-DETRv4, ``sync_bn: True``) train with SyncBatchNorm: with
4-8 images per GPU, per-rank batch statistics are noisy, and synchronising them gives every rank
the statistics of the global batch. PyTorch's SyncBatchNorm has CUDA kernels only, so on CPU
workers (gloo) the model keeps ordinary BatchNorm, and the workers average the running statistics
over ranks before each evaluation and checkpoint (:mod:`distillery.platform.engine.norm_sync`). The
conversion keeps parameter and buffer names, so checkpoints load into either form and the exported
model is the same.
"""

from __future__ import annotations

from torch import nn

__all__ = ["batchnorm_for_backend"]


def batchnorm_for_backend(model: nn.Module, backend: str) -> nn.Module:
    """``model`` with every BatchNorm converted to SyncBatchNorm when ``backend`` is ``nccl``;
    unchanged (the same object) for any other backend."""
    if backend != "nccl":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
