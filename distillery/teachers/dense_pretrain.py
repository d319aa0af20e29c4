"""Training a DINOv3 teacher that knows a domain, and measuring whether its features do.

Why dense supervision, not DINO/iBOT
------------------------------------
Nothing can be downloaded on the machines Distillery's embedded default runs on, so a teacher
that knows the synthetic domain must be trained here, on 2 CPU cores, in about two minutes.
Self-supervised DINO/iBOT training learns from a student/teacher pair on multi-crop views with a
centring and sharpening schedule; even at this width it needs tens of thousands of steps before
its patch features separate objects, which is hours of CPU. Dense supervision from the labels of
a *disjoint* image pool (:func:`patch_labels_from_boxes`: the class of the box that holds a
patch's centre, 0 for background) reaches features that carry the domain in a few hundred steps:
a cross-entropy through a linear head on the very tokens the frozen teacher returns (the
final-norm patch tokens), so what the head needs is what the student will distil. The student's
own images and labels are never seen: the pool comes from another seed of the generator.

What is trained is exactly what :class:`~distillery.teachers.dinov3.DinoV3Teacher` runs: the timm
model from :func:`~distillery.teachers.dinov3.build_dinov3_vit`, fed by
:func:`~distillery.teachers.dinov3.normalise_and_pool`, read through
:func:`~distillery.teachers.dinov3.patch_grid`, with Meta's bf16-rounded RoPE periods (so that a
file written by :func:`~distillery.teachers.dinov3_weights.to_meta_state_dict` loads back into the
same model, bit for bit). The frozen teacher class itself stays frozen; the linear head is thrown
away after training.

:func:`linear_probe` is the measurement: a linear classifier of frozen patch features for the
per-patch class, trained on one set of images and scored by balanced accuracy (the mean of the
per-class recalls, so that the background, most of the patches, counts as one class among seven)
on another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillery.teachers.dinov3 import (IMAGENET_MEAN, IMAGENET_STD, DinoV3Teacher, build_dinov3_vit,
                                        normalise_and_pool, patch_grid)
from distillery.teachers.dinov3_weights import set_rope_periods

__all__ = ["DensePretrainResult", "DensePretrainSettings", "balanced_accuracy", "class_weights", "class_weights_of_counts",
           "dense_lr_factor", "dense_param_groups", "dense_patch_logits", "dense_patch_loss", "linear_probe",
           "patch_labels_from_boxes", "random_flips", "teacher_features", "train_dense_teacher"]


# --------------------------------------------------------------------------- labels

def patch_labels_from_boxes(boxes: Sequence[Sequence[tuple[int, Sequence[float]]]], image_size: int,
                            grid: int) -> torch.Tensor:
    """(N, grid, grid) int64 per-patch classes from per-image ``(class, (x0, y0, x1, y1))`` boxes.

    ``class`` is >= 1 (0 is the background); box corners are pixels of a square ``image_size``
    image. A patch takes the class of the box that holds its centre, the smallest such box when
    several do; a patch whose centre no box holds is background.
    """
    if grid < 1 or image_size < grid:
        raise ValueError(f"patch labels: need 1 <= grid <= image_size, got grid {grid}, image_size {image_size}")
    cell = image_size / grid
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * cell
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    out = torch.zeros((len(boxes), grid, grid), dtype=torch.int64)
    for i, image_boxes in enumerate(boxes):
        area = torch.full((grid, grid), math.inf, dtype=torch.float64)
        for cls, (x0, y0, x1, y1) in image_boxes:
            if int(cls) < 1:
                raise ValueError(f"patch labels: image {i} has a box of class {cls}; classes start at 1 "
                                 "(0 is the background)")
            inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
            smaller = inside & (area > (x1 - x0) * (y1 - y0))
            out[i][smaller] = int(cls)
            area[smaller] = (x1 - x0) * (y1 - y0)
    return out


# --------------------------------------------------------------------------- training

@dataclass(frozen=True)
class DensePretrainSettings:
    """How the teacher is trained: AdamW, linear warm-up then cosine to zero, random horizontal
    flips (image and label grid together), a class-balanced cross-entropy (weights from the
    pool's patch counts, so the background does not swamp the objects)."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    seed: int = 0
    flip: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"dense pretraining: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"dense pretraining: lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("dense pretraining: warmup_steps and weight_decay must be >= 0")


@dataclass
class DensePretrainResult:
    """The trained timm ViT (eval mode; wrap it with a Meta-layout file and ``DinoV3Teacher``),
    the per-step history (``step``, ``loss``, ``patch_accuracy`` on the batch) and the seconds."""

    model: nn.Module
    head: nn.Linear
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _check_pool(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"dense pretraining: images must be (N, 3, S, S) uint8, got {tuple(images.shape)} "
                         f"{images.dtype}")
    if labels.ndim != 3 or labels.shape[0] != images.shape[0] or labels.dtype != torch.int64:
        raise ValueError(f"dense pretraining: labels must be (N, h, w) int64 with N = {images.shape[0]}, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"dense pretraining: labels must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 over the classes present (absent: 0)."""
    return class_weights_of_counts(torch.bincount(labels.flatten(), minlength=num_classes))


def class_weights_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """:func:`class_weights` from per-class patch counts."""
    counts = counts.double()
    weights = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return (weights * (counts > 0).sum() / weights.sum()).float()


def dense_lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """The learning-rate factor of ``step`` of ``steps``: linear warm-up over ``warmup_steps``, then
    cosine to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    rest = max(steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / rest))


def dense_param_groups(model: nn.Module, head: nn.Linear, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups: weight decay on the matrices (tokens excepted) and the head's weight, none
    on the rest."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token" not in n)]
    return [{"params": decay + [head.weight], "weight_decay": weight_decay},
            {"params": no_decay + [head.bias], "weight_decay": 0.0}]


def random_flips(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image flipped horizontally with its label grid, with probability 1/2 (drawn from ``generator``)."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return (torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images),
            torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels))


def dense_patch_logits(model: nn.Module, head: nn.Linear, images: torch.Tensor, mean: torch.Tensor,
                       std: torch.Tensor, pool: int, side: int) -> torch.Tensor:
    """(N * side * side, classes) logits of the per-patch head on the teacher's patch tokens of
    (N, 3, S, S) images in [0, 1] (row-major patches, image by image), in the head's dtype."""
    x = normalise_and_pool(images, mean, std, pool).to(head.weight.dtype)
    grid = patch_grid(model, x, (side, side))
    return head(grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]))


def dense_patch_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """The dense objective: class-weighted cross-entropy of :func:`dense_patch_logits` against the
    (N, side, side) per-patch classes."""
    return F.cross_entropy(logits, labels.reshape(-1), weight=class_weights)


def train_dense_teacher(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, model_name: str,
                        model_kwargs: Mapping[str, Any] | None = None, pool: int = 2,
                        settings: DensePretrainSettings = DensePretrainSettings(),
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                        log_every: int = 50,
                        on_log: Callable[[dict[str, float]], None] | None = None) -> DensePretrainResult:
    """Train a timm DINOv3 ViT (built as the teacher builds it) with a per-patch linear head.

    ``images``: (N, 3, S, S) uint8, the teacher's input size S; ``labels``: (N, h, w) int64 per-patch
    classes in ``[0, num_classes)`` on the teacher's grid (S / pool / patch). Single process, plain
    PyTorch, on the images' device; the caller's global RNG is left untouched (batches, flips and
    the initialisation come from ``settings.seed``). ``on_log`` gets each ``log_every``-th history row.
    """
    import time

    _check_pool(images, labels, num_classes)
    model = build_dinov3_vit(model_name, model_kwargs, seed=settings.seed).to(images.device)
    # Meta's files keep the RoPE periods in bf16 and its model runs with those: train with them,
    # so that the Meta-layout file of this model gives back exactly this model.
    set_rope_periods(model, model.rope.periods.to(torch.bfloat16).float())
    patch = int(model.patch_embed.patch_size[0])
    side = images.shape[-1] // pool // patch
    if images.shape[-1] % (pool * patch) or labels.shape[1:] != (side, side):
        raise ValueError(f"dense pretraining: {images.shape[-1]} px / pool {pool} / patch {patch} gives a "
                         f"{side}x{side} grid; labels are {tuple(labels.shape[1:])}")
    generator = torch.Generator().manual_seed(settings.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 2)
        head = nn.Linear(int(model.embed_dim), num_classes).to(images.device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    weights = class_weights(labels, num_classes).to(images.device)

    optimizer = torch.optim.AdamW(dense_param_groups(model, head, settings.weight_decay), lr=settings.lr,
                                  betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: dense_lr_factor(s, settings.steps, settings.warmup_steps))
    result = DensePretrainResult(model=model, head=head)
    model.train()
    start = time.perf_counter()
    n = images.shape[0]
    order = torch.randperm(n, generator=generator)
    cursor = 0
    for step in range(settings.steps):
        if cursor + settings.batch_size > n:  # a new epoch: a new permutation (the tail is dropped)
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor:cursor + settings.batch_size].to(images.device)
        cursor += settings.batch_size
        x = images[index].float().div_(255.0)
        y = labels[index]
        if settings.flip:
            x, y = random_flips(x, y, generator)
        logits = dense_patch_logits(model, head, x, mean_t, std_t, pool, side)
        target = y.reshape(-1)
        loss = dense_patch_loss(logits, y, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % log_every == 0 or step + 1 == settings.steps:
            row = {"step": step + 1, "loss": loss.item(),
                   "patch_accuracy": float((logits.argmax(1) == target).float().mean())}
            result.history.append(row)
            if on_log is not None:
                on_log(row)
    result.seconds = time.perf_counter() - start
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return result


# --------------------------------------------------------------------------- the probe

@torch.no_grad()
def teacher_features(teacher: DinoV3Teacher, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, C, h, w) frozen teacher grids of (N, 3, S, S) uint8 images, in batches."""
    out = [teacher(images[i:i + batch_size].float().div(255.0)) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def balanced_accuracy(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean recall over the classes present in ``target`` (each class counts the same, whatever its size)."""
    recalls = []
    for c in range(num_classes):
        mask = target == c
        if mask.any():
            recalls.append(float((predicted[mask] == c).float().mean()))
    if not recalls:
        raise ValueError("balanced accuracy of an empty target")
    return sum(recalls) / len(recalls)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, *, steps: int = 300, lr: float = 0.05,
                 weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """Balanced accuracy of a linear classifier of frozen patch features for the per-patch class.

    Features (N, C, h, w) and labels (N, h, w). The features are standardised with the train set's
    per-channel mean and std; the classifier is trained full-batch with AdamW on a class-balanced
    cross-entropy, the same way whatever the teacher, and scored on the test set. Returns
    ``balanced_accuracy`` (test), ``train_balanced_accuracy`` and ``accuracy`` (test, plain).
    """
    def flat(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.ndim != 4 or labels.shape != (features.shape[0], *features.shape[2:]):
            raise ValueError(f"linear probe: features (N, C, h, w) and labels (N, h, w) must agree, got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float(), labels.reshape(-1)

    x_train, y_train = flat(train_features, train_labels)
    x_test, y_test = flat(test_features, test_labels)
    mu, sigma = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mu) / sigma, (x_test - mu) / sigma
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(x_train.shape[1], num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    weights = class_weights(y_train, num_classes)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(probe(x_train), y_train, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        test_pred = probe(x_test).argmax(1)
        train_pred = probe(x_train).argmax(1)
    return {"balanced_accuracy": balanced_accuracy(test_pred, y_test, num_classes),
            "train_balanced_accuracy": balanced_accuracy(train_pred, y_train, num_classes),
            "accuracy": float((test_pred == y_test).float().mean())}
