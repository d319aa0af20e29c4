"""Deep Semantic Injector (DSI) of RT-DETRv4: align the AIFI output F5 with a frozen teacher's patch grid.

Training only. The projector is a single ``nn.Linear(hidden_dim, teacher_dim)`` applied to every
F5 position (``model.dsi``); the teacher grid is resized to F5's size; the loss is the mean over
images and positions of ``1 - cos(P(F5)[i, j], T[i, j])`` (paper eq. 2; the official
``RTv4Criterion.loss_distillation``). Order as in the official code: project the student first
(in the encoder), resize the *teacher* bilinearly (``align_corners=False``) to (H5, W5) only when
the sizes differ, then compare per position. Gradients reach the projector, AIFI and the
backbone (F5 is not detached); the teacher grid is treated as a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dsi_loss", "project_f5"]


def project_f5(student_f5: torch.Tensor, projector: nn.Module) -> torch.Tensor:
    """(B, C, H5, W5) -> (B, H5 * W5, C_t): the projector applied to each F5 position."""
    if student_f5.dim() != 4:
        raise ValueError(f"dsi: student F5 must be (B, C, H, W), got shape {tuple(student_f5.shape)}")
    return projector(student_f5.flatten(2).transpose(1, 2))


def dsi_loss(student_f5: torch.Tensor, teacher_grid: torch.Tensor, projector: nn.Module,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images and F5 positions of ``1 - cosine(projector(F5), teacher)``.

    Args:
        student_f5: (B, C, H5, W5), the model's train-mode ``out["f5"]``.
        teacher_grid: (B, C_t, h, w) teacher patch features (CLS / register tokens already
            dropped); bilinearly resized to (H5, W5) when (h, w) differs.
        projector: maps C -> C_t on the last dimension (``model.dsi``).
        mask: optional (B, H5, W5) bool, True where the teacher grid is valid. A cached grid
            carried through zoom-out or Mosaic has positions with no teacher feature (the
            canvas fill); they are left out of the mean. Requires the grid at F5's size.
    Returns:
        A scalar in [0, 2]: 0 when aligned, 1 when orthogonal.
    """
    if teacher_grid.dim() != 4:
        raise ValueError(f"dsi: teacher grid must be (B, C_t, h, w), got shape {tuple(teacher_grid.shape)}")
    if teacher_grid.shape[0] != student_f5.shape[0]:
        raise ValueError(f"dsi: batch sizes differ: student F5 {student_f5.shape[0]}, teacher {teacher_grid.shape[0]}")
    projected = project_f5(student_f5, projector)  # (B, N, C_t)
    if projected.shape[-1] != teacher_grid.shape[1]:
        raise ValueError(f"dsi: projector gives {projected.shape[-1]} channels but the teacher grid has "
                         f"{teacher_grid.shape[1]} (set teacher_dim to the teacher's width)")
    teacher = teacher_grid.detach().to(projected.dtype)
    height, width = student_f5.shape[-2:]
    if tuple(teacher.shape[-2:]) != (height, width):
        teacher = F.interpolate(teacher, size=(height, width), mode="bilinear", align_corners=False)
    teacher = teacher.flatten(2).transpose(1, 2)  # (B, N, C_t)
    cosine = (F.normalize(projected, dim=-1) * F.normalize(teacher, dim=-1)).sum(-1)
    if mask is None:
        return (1.0 - cosine).mean()
    if tuple(mask.shape) != (student_f5.shape[0], height, width):
        raise ValueError(f"dsi: mask must be (B, H5, W5) = {(student_f5.shape[0], height, width)}, "
                         f"got {tuple(mask.shape)}")
    weight = mask.flatten(1).to(cosine.dtype)
    return ((1.0 - cosine) * weight).sum() / weight.sum().clamp_min(1.0)
