"""Augmentation keeps cached features faithful: every geometric op moves the feature grid with
the image. Checked with an *equivariant* stand-in teacher (average pooling of a smooth image):
the rendered cached grid must match the stand-in run on the augmented image."""

import random

import pytest
import torch
import torch.nn.functional as F

from distillery.data import augment as A, sample as S, transforms as T

STRIDE = 16


def smooth_image(h=256, w=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g)
    return (F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1) * 255).to(torch.uint8)


def teacher(image):
    """Stand-in teacher: one feature per 16x16 patch (the mean colour), like a ViT grid."""
    return F.avg_pool2d(image.float()[None] / 255.0, STRIDE)[0]


def sample(seed=0, h=256, w=256):
    img = smooth_image(h, w, seed)
    boxes = torch.tensor([[40.0, 50.0, 60.0, 70.0], [150.0, 120.0, 80.0, 90.0]])
    return S.Sample.create(img, boxes, torch.tensor([1, 2]), grid=teacher(img), image_id=seed)


def fidelity(s):
    oh, ow = s.size[0] // STRIDE, s.size[1] // STRIDE
    cached, mask = S.render_features(s, (oh, ow))
    online = teacher(s.image)
    err = (cached - online).abs().mean(0)[mask]
    return err.mean().item(), mask.float().mean().item()


OPS = {
    "identity": lambda s: s,
    "hflip": T.hflip,
    "resize": lambda s: T.resize(s, (320, 320)),
    "crop": lambda s: T.crop(s, 32, 64, 160, 128),
    "zoom_out": lambda s: T.zoom_out(s, 2.0, 64, 128),
    "affine": lambda s: T.affine(s, 8.0, (10.0, -12.0), 1.2),
    "chain": lambda s: T.resize(T.hflip(T.crop(T.zoom_out(s, 1.5, 32, 64), 16, 16, 256, 256)), (192, 192)),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_geometric_ops_move_features_with_the_image(op):
    err, coverage = fidelity(OPS[op](sample()))
    assert coverage > 0.2
    # Mean colour error per patch: small (resampling only); ignoring the map gives 0.16-0.42 here.
    assert err < 0.03, (op, err)


def test_a_wrong_map_is_detected():
    s = T.hflip(sample())
    s.layers[0].to_source = torch.eye(3)  # forget the flip
    assert fidelity(s)[0] > 0.1


def test_zoom_out_border_is_masked_and_boxes_follow():
    s = T.zoom_out(sample(), 2.0, 256, 0)
    _, mask = S.render_features(s, (32, 32))
    assert not mask[:, :16].any() and mask[:16, 16:].all() and not mask[16:, :].any()
    assert torch.allclose(s.boxes[0], torch.tensor([296.0, 50.0, 356.0, 120.0]))


def test_mosaic_composes_four_grids():
    parts = [sample(seed=i) for i in range(4)]
    m = T.mosaic(parts, tile=128)
    assert m.size == (256, 256) and len(m.layers) == 4 and len(m.boxes) == 8
    err, coverage = fidelity(m)
    assert coverage > 0.99 and err < 0.02
    m2 = T.mosaic(parts, tile=128, angle=5.0, translate=(8.0, -8.0), scale=0.8)
    err2, cov2 = fidelity(m2)
    assert cov2 < 0.99  # the affine brings in fill at the borders
    # Patches straddling two tiles mix four unrelated images in the online grid: the cached
    # grid (one tile per patch centre) differs there, so the bound is looser than for one image.
    assert err2 < 0.06
    m2.layers = m.layers  # forgetting the affine is far worse
    assert fidelity(m2)[0] > 0.2


def test_mixup_blends_images_and_features_with_one_weight():
    a, b = sample(0), sample(1)
    m = T.mixup(a, b, 0.3)
    cached, mask = S.render_features(m, (16, 16))
    expected = 0.3 * teacher(a.image) + 0.7 * teacher(b.image)
    assert mask.all() and (cached - expected).abs().max() < 1e-5
    assert len(m.boxes) == 4


def test_photometric_touches_only_the_image():
    torch.manual_seed(0)
    s = sample()
    p = T.photometric(s)
    assert torch.equal(p.boxes, s.boxes) and p.layers is s.layers or p.layers == s.layers


def test_augmenter_schedule_and_collate():
    cfg = A.AugmentConfig(size=128, policy_epochs=(1, 3, 4), mixup_epochs=(1, 3), multiscale_stop_epoch=4)
    aug = A.Augmenter(cfg, seed=0)
    torch.manual_seed(0)
    batch = [sample(i) for i in range(4)]
    early = aug.batch(batch, epoch=0)
    assert all(s.size == (128, 128) or s.size[0] in T.multiscale_sizes(128) for s in early)
    for epoch in (1, 2, 4):
        out = aug.batch(batch, epoch)
        b = S.collate(out, f5_hw=(4, 4))
        assert b["images"].dtype == torch.float32 and b["images"].max() <= 1.0
        assert b["teacher_grid"].shape == (4, 3, 4, 4) and b["teacher_mask"].shape == (4, 4, 4)
        for t in b["targets"]:
            assert t["boxes"].shape[1] == 4 and (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()
            assert len(t["labels"]) == len(t["boxes"])
    late = aug.batch(batch, epoch=4)  # past the policy: flip + resize only
    assert all(s.size == (128, 128) for s in late) and all(len(s.layers) == 1 for s in late)


def test_iou_crop_keeps_a_box_centre():
    s = sample()
    rng = random.Random(3)
    for _ in range(20):
        p = T.iou_crop_params(s, rng)
        if p is None:
            continue
        x0, y0, cw, ch = p
        c = (s.boxes[:, :2] + s.boxes[:, 2:]) / 2
        assert (((c[:, 0] > x0) & (c[:, 0] < x0 + cw) & (c[:, 1] > y0) & (c[:, 1] < y0 + ch))).any()
