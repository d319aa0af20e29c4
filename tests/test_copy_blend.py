"""Copy-Blend: objects from other samples blended in, boxes consistent, background kept, features mixed locally."""

from __future__ import annotations

import random

import pytest
import torch

from distillery.data.sample import Sample, collate, render_features
from distillery.data.copy_blend import copy_blend

H, W = 96, 128


def _sample(seed: int, boxes_xyxy: list[list[float]], labels: list[int], with_grid: bool = True) -> Sample:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    grid = torch.randn(4, H // 16, W // 16, generator=g) if with_grid else None
    boxes = torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    return Sample.create(image, xywh, torch.tensor(labels, dtype=torch.long), grid, image_id=seed)


def _changed(before: Sample, after: Sample) -> torch.Tensor:
    return (before.image != after.image).any(0)


def test_boxes_labels_and_pixels_are_consistent():
    target = _sample(0, [[10, 10, 40, 30]], [1])
    donor = _sample(1, [[20, 30, 60, 70], [70, 5, 120, 50], [0, 0, 5, 5]], [4, 6, 9])  # last one: < 100 px^2
    out = copy_blend(target, [donor], random.Random(0), num_objects=3, beta=0.5, expand_ratios=None)

    # Originals first and unchanged; two new objects (the small one is not in the pool).
    assert len(out.boxes) == 3 and torch.equal(out.boxes[:1], target.boxes) and out.labels[0] == 1
    assert sorted(out.labels[1:].tolist()) == [4, 6]
    donor_box = {int(label): box for label, box in zip(donor.labels, donor.boxes)}
    blended = target.image.float()
    for box, label in zip(out.boxes[1:], out.labels[1:]):
        x1, y1, x2, y2 = box.int().tolist()
        sx1, sy1, sx2, sy2 = donor_box[int(label)].int().tolist()
        assert (x2 - x1, y2 - y1) == (sx2 - sx1, sy2 - sy1)  # same object size
        assert 0 <= x1 and x2 <= W and 0 <= y1 and y2 <= H
        patch = donor.image[:, sy1:sy2, sx1:sx2].float()
        blended[:, y1:y2, x1:x2] = 0.5 * blended[:, y1:y2, x1:x2] + 0.5 * patch
    # Every pixel is exactly what blending the donor objects at the new boxes gives.
    assert torch.equal(out.image, blended.round().clamp(0, 255).to(torch.uint8))
    # Model targets stay consistent: normalised cxcywh inside [0, 1], labels aligned.
    targets = collate([out])["targets"][0]
    assert len(targets["boxes"]) == len(targets["labels"]) == 3
    assert (targets["boxes"] >= 0).all() and (targets["boxes"] <= 1).all()


def test_background_is_kept_and_only_the_patches_change():
    target = _sample(2, [[5, 5, 30, 30]], [0])
    donor = _sample(3, [[40, 20, 80, 60]], [7])
    rng = random.Random(1)
    out = copy_blend(target, [donor], rng, num_objects=1, beta=0.55, expand_ratios=(0.1, 0.25))
    x1, y1, x2, y2 = out.boxes[1].int().tolist()
    changed = _changed(target, out)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    # The changed area is the object plus its context margin (at most 25 % of the size per side).
    assert xs.min() <= x1 and xs.max() >= x2 - 1 and ys.min() <= y1 and ys.max() >= y2 - 1
    assert xs.min() >= x1 - int(0.25 * (x2 - x1)) and xs.max() <= x2 - 1 + int(0.25 * (x2 - x1))
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = False
    assert torch.equal(out.image[:, outside], target.image[:, outside])
    # Inside, the background still shows through: neither the target's nor the donor's pixels alone.
    region_out = out.image[:, y1:y2, x1:x2].float()
    sx1, sy1, sx2, sy2 = donor.boxes[0].int().tolist()
    expected = 0.55 * target.image[:, y1:y2, x1:x2].float() + 0.45 * donor.image[:, sy1:sy2, sx1:sx2].float()
    assert (region_out - expected).abs().max() <= 0.5 + 1e-4
    assert not torch.equal(out.image[:, y1:y2, x1:x2], donor.image[:, sy1:sy2, sx1:sx2])


def test_features_are_blended_like_the_pixels_and_only_inside_the_patch():
    target = _sample(4, [[5, 5, 30, 30]], [0])
    donor = _sample(5, [[32, 32, 96, 80]], [3])
    # A donor grid linear in the cell index: bilinear resampling reproduces it exactly, so the
    # donor's feature at any pixel (x, y) is known: A (x / 16 - 0.5) + B (y / 16 - 0.5) + C.
    a, b, c = torch.randn(4), torch.randn(4), torch.randn(4)
    rows, cols = torch.meshgrid(torch.arange(H // 16.0), torch.arange(W // 16.0), indexing="ij")
    donor.layers[0].grid = a[:, None, None] * cols + b[:, None, None] * rows + c[:, None, None]
    out = copy_blend(target, [donor], random.Random(2), num_objects=1, beta=0.4, expand_ratios=None)
    assert len(out.layers) == 2 and out.layers[0] is target.layers[0]
    x1, y1, x2, y2 = out.boxes[1].tolist()
    sx1, sy1 = donor.boxes[0, :2].tolist()
    size = (H // 8, W // 8)  # render at 8 px cells
    before, _ = render_features(target, size)
    after, mask = render_features(out, size)
    assert mask.all()
    checked = 0
    for cy in range(size[0]):
        for cx in range(size[1]):
            px, py = (cx + 0.5) * 8, (cy + 0.5) * 8
            if not (x1 < px < x2 and y1 < py < y2):
                torch.testing.assert_close(after[:, cy, cx], before[:, cy, cx])
            elif x1 + 8 <= px <= x2 - 8 and y1 + 8 <= py <= y2 - 8:  # half a patch cell from its edges
                dx, dy = px - x1 + sx1, py - y1 + sy1  # the same point of the object in the donor
                donor_feature = a * (dx / 16 - 0.5) + b * (dy / 16 - 0.5) + c
                torch.testing.assert_close(after[:, cy, cx], 0.4 * before[:, cy, cx] + 0.6 * donor_feature,
                                           atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked >= 12


def test_empty_pool_small_objects_and_reproducibility():
    target = _sample(6, [[10, 10, 40, 40]], [2])
    tiny_only = _sample(7, [[0, 0, 8, 8]], [5])
    assert copy_blend(target, [tiny_only], random.Random(0)) is target  # nothing reaches 100 px^2
    empty = _sample(8, [], [])
    assert copy_blend(target, [empty], random.Random(0)) is target
    donor = _sample(9, [[20, 20, 60, 60], [70, 10, 110, 50]], [1, 3], with_grid=False)
    a = copy_blend(target, [donor], random.Random(5))
    assert len(a.boxes) == 1 + 2 and len(a.layers) == 1  # a donor without cached features adds no layer
    b = copy_blend(target, [donor, target], random.Random(5))
    again = copy_blend(target, [donor, target], random.Random(5))
    assert torch.equal(b.image, again.image) and torch.equal(b.boxes, again.boxes)
    assert len(b.boxes) == 1 + 3  # the pool (the whole batch) includes the target's own object
    assert len(b.layers) == 1 + int((b.labels[1:] == 2).sum())  # its copy carries its features
    with pytest.raises(ValueError, match="beta"):
        copy_blend(target, [donor], random.Random(0), beta=1.0)


def test_augmenter_schedules_copy_blend_as_the_alternative_to_mixup():
    """In the window and without Mixup, a batch gets Copy-Blend (more boxes per image); with
    ``copyblend_prob=0`` (the RT-DETRv4 recipe) the augmenter draws exactly what it drew before."""
    from distillery.data.augment import AugmentConfig, Augmenter

    batch = [_sample(10, [[10, 10, 50, 40]], [1]), _sample(11, [[60, 30, 110, 80]], [2])]
    base = dict(size=96, policy_epochs=(100, 100, 100), mixup_prob=0.0, flip_prob=0.0, multiscale_stop_epoch=0)
    blended = Augmenter(AugmentConfig(**base, copyblend_prob=1.0, copyblend_epochs=(0, 2)), seed=0).batch(batch, 0)
    assert all(len(s.boxes) > 1 for s in blended)
    outside = Augmenter(AugmentConfig(**base, copyblend_prob=1.0, copyblend_epochs=(1, 2)), seed=0).batch(batch, 0)
    assert [len(s.boxes) for s in outside] == [1, 1]
    # Mixup taken: Copy-Blend skipped (mixed images keep the two samples' boxes, nothing more).
    mixed = Augmenter(AugmentConfig(**{**base, "mixup_prob": 1.0}, mixup_epochs=(0, 2), copyblend_prob=1.0,
                                    copyblend_epochs=(0, 2)), seed=0).batch(batch, 0)
    assert [len(s.boxes) for s in mixed] == [2, 2]
    # Off: the RNG stream is untouched, so later draws are the same as without the option.
    a, b = Augmenter(AugmentConfig(**base), seed=3), Augmenter(AugmentConfig(**base, copyblend_epochs=(0, 9)), seed=3)
    a.batch(batch, 0), b.batch(batch, 0)
    assert a.rng.random() == b.rng.random()
