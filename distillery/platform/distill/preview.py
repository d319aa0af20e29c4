"""The picture at the start of a training run: augmented samples beside their teacher grids.

Each row is one training sample: the augmented image with its boxes, and the teacher feature
grid it is paired with (after the same geometric transform), coloured by its first three
principal components (one PCA basis for the whole picture, so colours compare across rows),
with the same boxes drawn over it. If the cached features follow the augmentation, the objects'
colours sit inside their boxes; positions with no teacher feature (zoom-out or Mosaic fill) are
black.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from distillery.data.augment import Augmenter
from distillery.data.sample import Sample, render_features
from distillery.platform.distill.spec import DistillRun
from distillery.platform.io import storage

__all__ = ["log_augment_preview", "pca_rgb", "plot_augment_preview"]

log = logging.getLogger(__name__)


def pca_rgb(grids: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """(C, h, w) feature grids -> (h, w, 3) RGB images in [0, 1]: the first three principal
    components of all valid positions of all grids, each stretched between its 1st and 99th
    percentile. Invalid positions are black."""
    valid = torch.cat([g.reshape(g.shape[0], -1)[:, m.reshape(-1)].T for g, m in zip(grids, masks)]).double()
    if valid.shape[0] < 2:
        return [np.zeros((*g.shape[1:], 3)) for g in grids]
    mean = valid.mean(0)
    _, _, v = torch.linalg.svd(valid - mean, full_matrices=False)
    basis = v[:3].T  # (C, <=3)
    projected = (valid - mean) @ basis
    lo = torch.quantile(projected, 0.01, dim=0)
    hi = torch.quantile(projected, 0.99, dim=0)
    out = []
    for g, m in zip(grids, masks):
        c, h, w = g.shape
        p = (g.reshape(c, -1).T.double() - mean) @ basis
        rgb = ((p - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        if rgb.shape[1] < 3:  # fewer than 3 components (a 1- or 2-channel grid)
            rgb = torch.cat([rgb, torch.zeros(rgb.shape[0], 3 - rgb.shape[1], dtype=rgb.dtype)], 1)
        rgb[~m.reshape(-1)] = 0
        out.append(rgb.reshape(h, w, 3).numpy())
    return out


def plot_augment_preview(samples: Sequence[Sample], category_names: Sequence[str], path: str | Path,
                         title: str, cell: int = 16) -> None:
    """Save the picture to ``path`` (PNG). ``category_names[label]`` names a box's class;
    ``cell``: image pixels per rendered teacher position (16 = the ViT's patch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in samples if s.layers]
    if not samples:
        raise ValueError("augment preview: no sample has a teacher grid (teacher_mode must be cached)")
    rendered = [render_features(s, (max(1, s.size[0] // cell), max(1, s.size[1] // cell))) for s in samples]
    colours = pca_rgb([g for g, _ in rendered], [m for _, m in rendered])
    fig, axes = plt.subplots(len(samples), 2, figsize=(7, 3.4 * len(samples)), squeeze=False)
    for row, (sample, rgb) in enumerate(zip(samples, colours)):
        h, w = sample.size
        image_ax, grid_ax = axes[row]
        image_ax.imshow(sample.image.permute(1, 2, 0).numpy())
        grid_ax.imshow(rgb, extent=(0, w, h, 0), interpolation="nearest")
        for ax in (image_ax, grid_ax):
            for box, label in zip(sample.boxes.tolist(), sample.labels.tolist()):
                x0, y0, x1, y1 = box
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.2))
                name = category_names[label] if 0 <= label < len(category_names) else str(label)
                ax.text(x0, y0, name, color="yellow", fontsize=6, va="bottom")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
        image_ax.set_ylabel(f"image {sample.image_id}" + (f" (view {sample.view})" if sample.view else ""),
                            fontsize=8)
        if row == 0:
            image_ax.set_title("augmented sample + boxes", fontsize=9)
            grid_ax.set_title("its teacher grid (PCA -> RGB)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def log_augment_preview(plain_samples: Sequence[Sample], augmenter: Augmenter, count: int, seed: int,
                        run: DistillRun, logger) -> None:
    """``plots/augment_preview.png`` in the run storage and (with ``logger``, rank 0's
    MetricsLogger) in MLflow: ``count`` of the first batch's samples as the first
    strong-augmentation epoch transforms them. Drawn with an Augmenter of its own, so training's
    random stream is untouched; a failure to draw is reported, never a reason to stop training."""
    e0 = augmenter.cfg.policy_epochs[0]
    epoch = e0 if augmenter.strong(e0) else 0
    try:
        samples = Augmenter(augmenter.cfg, seed=seed * 1000 + 999).batch(
            copy.deepcopy(list(plain_samples[:count])), epoch)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "augment_preview.png")
            plot_augment_preview(samples, run.categories["names"], path,
                                 title=f"augmentation of epoch {epoch + 1} and the cached teacher grids")
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(run.run_storage, "plots", "augment_preview.png"), fh.read())
            if logger is not None:
                logger.log_artifact(path, "plots")
    except Exception as exc:  # noqa: BLE001 - a picture, never a reason to lose a training run
        log.warning("augment preview not drawn: %s: %s", type(exc).__name__, exc)
