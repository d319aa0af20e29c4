"""RT-DETRv4 student model: shapes through every stage, building blocks against slow references.

Everything runs on ``rtdetrv4_tiny`` (same classes as S/M/L/X, small numbers) at 128 x 128, B = 2.
"""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, box_convert

from distillery.students import RTDETRv4, WeightsError, build_student
from distillery.students.box_ops import (
    box_to_edge_distances,
    edge_distance_bins,
    edge_distances_to_box,
    weighting_function,
)
from distillery.students.deformable import MSDeformableAttention, multi_scale_deformable_attention
from distillery.students.denoising import build_denoising_queries
from distillery.students.encoder import sincos_position_embedding_2d

SIZE = 128


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.tensor([1, 5, 7]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]


@pytest.fixture(scope="module")
def tiny() -> RTDETRv4:
    torch.manual_seed(0)
    return build_student("rtdetrv4_tiny")


# ------------------------------------------------------------------------------------------ shapes
def test_stage_shapes(tiny):
    spec = tiny.spec
    tiny.eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = tiny.backbone(images)
        assert tiny.backbone.strides == [8, 16, 32]
        assert [tuple(f.shape) for f in feats] == [
            (2, c, SIZE // s, SIZE // s) for c, s in zip(tiny.backbone.out_channels, (8, 16, 32))]
        assert tiny.backbone.out_channels == [256, 512, 1024]  # HGNetv2-B0

        fused, f5 = tiny.encoder(feats)
        hidden = spec.encoder_hidden_dim
        assert [tuple(f.shape) for f in fused] == [(2, hidden, SIZE // s, SIZE // s) for s in (8, 16, 32)]
        assert tuple(f5.shape) == (2, hidden, SIZE // 32, SIZE // 32)

        out = tiny(images)
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert tuple(out["pred_logits"].shape) == (2, spec.num_queries, 80)
    assert tuple(out["pred_boxes"].shape) == (2, spec.num_queries, 4)
    assert torch.isfinite(out["pred_logits"]).all()
    assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"] <= 1).all()


def test_train_outputs(tiny):
    spec = tiny.spec
    tiny.train()
    torch.manual_seed(1)
    out = tiny(torch.rand(2, 3, SIZE, SIZE), _targets())
    tiny.eval()
    q, bins = spec.num_queries, 4 * (spec.reg_max + 1)
    assert {"pred_logits", "pred_boxes", "pred_corners", "ref_points", "aux_outputs", "pre_outputs",
            "enc_aux_outputs", "reg_scale", "up", "dn_outputs", "dn_pre_outputs", "dn_meta", "f5"} == set(out)
    assert tuple(out["pred_corners"].shape) == (2, q, bins)
    assert tuple(out["ref_points"].shape) == (2, q, 4)
    assert len(out["aux_outputs"]) == spec.num_decoder_layers - 1
    for aux in out["aux_outputs"]:
        assert tuple(aux["pred_logits"].shape) == (2, q, 80)
        assert aux["teacher_corners"] is out["pred_corners"]
        assert aux["teacher_logits"] is out["pred_logits"]
    assert tuple(out["pre_outputs"]["pred_boxes"].shape) == (2, q, 4)
    assert tuple(out["enc_aux_outputs"][0]["pred_logits"].shape) == (2, q, 80)
    assert tuple(out["f5"].shape) == (2, spec.encoder_hidden_dim, SIZE // 32, SIZE // 32)
    assert out["f5"].requires_grad

    meta = out["dn_meta"]
    # 3 objects at most -> groups = num_denoising // 3, 2 * 3 queries per group.
    assert meta.num_groups == spec.num_denoising // 3 and meta.num_denoising == 6 * meta.num_groups
    assert len(out["dn_outputs"]) == spec.num_decoder_layers
    assert tuple(out["dn_outputs"][0]["pred_boxes"].shape) == (2, meta.num_denoising, 4)
    assert "teacher_corners" not in out["dn_outputs"][-1]
    assert [len(p) for p in meta.positive_indices] == [3 * meta.num_groups, 0]


def test_train_without_objects_has_no_denoising(tiny):
    tiny.train()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = tiny(torch.rand(2, 3, SIZE, SIZE), empty)
    out_none = tiny(torch.rand(2, 3, SIZE, SIZE), None)
    tiny.eval()
    for o in (out, out_none):
        assert "dn_outputs" not in o and "dn_meta" not in o
        assert "f5" in o and len(o["aux_outputs"]) == tiny.spec.num_decoder_layers - 1


def test_eval_path_exports_as_a_graph(tiny):
    """The eval forward has no data-dependent Python control flow: torch.export captures one graph
    (the input size is fixed, as in the reference export) that reproduces eager on a new input."""
    tiny.eval()

    class Wrapper(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model(x)
            return out["pred_logits"], out["pred_boxes"]

    program = torch.export.export(Wrapper(tiny), (torch.rand(1, 3, SIZE, SIZE),))
    other = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        eager = tiny(other)
        logits, boxes = program.module()(other)
    torch.testing.assert_close(logits, eager["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes, eager["pred_boxes"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ build
def test_build_overrides():
    model = build_student("rtdetrv4_tiny", num_classes=3, num_queries=12, num_decoder_layers=3,
                          eval_spatial_size=320, teacher_dim=384)
    assert model.eval_spatial_size == (320, 320)
    assert isinstance(model.dsi, nn.Linear) and (model.dsi.in_features, model.dsi.out_features) == (64, 384)
    assert len(model.decoder.layers) == 3
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 96, 64))  # any multiple of 32
    assert tuple(out["pred_logits"].shape) == (1, 12, 3)

    assert build_student("rtdetrv4_tiny", dsi=False).dsi is None
    assert build_student("rtdetrv4_tiny", teacher_dim=None).dsi is None
    assert build_student("rtdetrv4_tiny").dsi.out_features == 768
    with pytest.raises(TypeError, match="num_querys"):
        build_student("rtdetrv4_tiny", num_querys=10)
    with pytest.raises(KeyError, match="rtdetrv4_q"):
        build_student("rtdetrv4_q")
    with pytest.raises(ValueError, match="multiples of 32"):
        build_student("rtdetrv4_tiny", eval_spatial_size=(100, 100))


def test_bad_inputs(tiny):
    tiny.eval()
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny(torch.rand(1, 1, 128, 128))
    with pytest.raises(ValueError, match="memory tokens"):
        build_student("rtdetrv4_tiny", num_queries=1000).eval()(torch.rand(1, 3, 64, 64))


def test_component_of(tiny):
    seen = set()
    for name, _ in tiny.named_parameters():
        component = tiny.component_of(name)
        seen.add(component)
        if name.startswith("encoder.aifi."):
            assert component == "aifi"
        elif name.startswith("encoder."):
            assert component == "ccff"
        else:
            assert component == name.split(".")[0]
    assert seen == {"backbone", "aifi", "ccff", "decoder", "dsi"}
    assert tiny.component_of("module.encoder.aifi.linear1.weight") == "aifi"
    assert tiny.component_of("_orig_mod.module.decoder.layers.0.norm1.weight") == "decoder"
    with pytest.raises(KeyError, match="head.fc.weight"):
        tiny.component_of("head.fc.weight")
    dsi_params = sum(p.numel() for p in tiny.dsi.parameters())
    assert tiny.num_inference_parameters() == sum(p.numel() for p in tiny.parameters()) - dsi_params


# ------------------------------------------------------------------------------------------ backbone
def test_backbone_weights_load(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("hgnetv2_b0", pretrained=False)  # full classification model: stages.N.*, head.*
    path = tmp_path / "b0.pth"
    torch.save(source.state_dict(), path)
    model = build_student("rtdetrv4_tiny", backbone_weights=path)
    loaded = model.backbone.body.state_dict()
    torch.testing.assert_close(loaded["stages_2.blocks.1.layers.0.conv1.conv.weight"],
                               source.state_dict()["stages.2.blocks.1.layers.0.conv1.conv.weight"])
    torch.testing.assert_close(loaded["stem.stem1.conv.weight"], source.state_dict()["stem.stem1.conv.weight"])

    from safetensors.torch import save_file

    st_path = tmp_path / "b0.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.body.state_dict().items()}, str(st_path))
    again = build_student("rtdetrv4_tiny", backbone_weights=str(st_path))
    torch.testing.assert_close(again.backbone.body.state_dict()["stages_3.blocks.0.aggregation.1.conv.weight"],
                               loaded["stages_3.blocks.0.aggregation.1.conv.weight"])

    broken = dict(source.state_dict())
    broken.pop("stages.1.blocks.0.layers.0.conv.weight")
    broken["stages.9.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as info:
        build_student("rtdetrv4_tiny", backbone_weights=tmp_path / "broken.pth")
    assert "stages_1.blocks.0.layers.0.conv.weight" in str(info.value)
    assert "stages_9.extra.weight" in str(info.value)
    assert "broken.pth" in str(info.value)

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_student("rtdetrv4_tiny", backbone_weights=tmp_path / "nowhere.pth")
    torch.save(source.state_dict(), tmp_path / "b2_mismatch.pth")
    with pytest.raises(WeightsError, match="hgnetv2_b2"):
        build_student("rtdetrv4_tiny", backbone="hgnetv2_b2", backbone_weights=tmp_path / "b2_mismatch.pth")


def test_backbone_freezing():
    body = build_student("rtdetrv4_tiny").backbone.body
    assert all(p.requires_grad for p in body.parameters())  # RT-DETRv4 recipes: freeze_at = -1

    body = build_student("rtdetrv4_tiny", freeze_at=0).backbone.body  # stem only
    assert not any(p.requires_grad for p in body.stem.parameters())
    assert all(p.requires_grad for p in body.stages_0.parameters())

    body = build_student("rtdetrv4_tiny", freeze_at=1, freeze_stem_only=False).backbone.body
    for module, trainable in [(body.stem, False), (body.stages_0, False), (body.stages_1, False),
                              (body.stages_2, True), (body.stages_3, True)]:
        assert all(p.requires_grad == trainable for p in module.parameters())

    model = build_student("rtdetrv4_tiny", freeze_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.encoder.modules())  # only the backbone's


# ------------------------------------------------------------------------------------------ blocks
def _bilinear_zero_padded(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value (D, H, W) at normalised (x, y), align_corners=False, zeros outside: explicit 4-neighbour sum."""
    _, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[0], dtype=torch.float64)
    for xi, yi in itertools.product((x0, x0 + 1), (y0, y0 + 1)):
        weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < w and 0 <= yi < h:
            out += weight * value[:, yi, xi].double()
    return out


def _slow_deformable(values, locations, weights, num_points):
    """Loop over batch, query, head, level, point (the textbook definition)."""
    batch, queries, heads, _, _ = locations.shape
    head_dim = values[0].shape[1]
    out = torch.zeros(batch, queries, heads * head_dim, dtype=torch.float64)
    starts = [0] + list(itertools.accumulate(num_points))
    for b, q, m in itertools.product(range(batch), range(queries), range(heads)):
        acc = torch.zeros(head_dim, dtype=torch.float64)
        for level, n in enumerate(num_points):
            value = values[level][b * heads + m]
            for p in range(starts[level], starts[level] + n):
                x, y = locations[b, q, m, p].tolist()
                acc += float(weights[b, q, m, p]) * _bilinear_zero_padded(value, x, y)
        out[b, q, m * head_dim:(m + 1) * head_dim] = acc
    return out


def test_deformable_core_matches_explicit_bilinear_loop():
    torch.manual_seed(0)
    batch, queries, heads, head_dim = 2, 3, 2, 3
    shapes, num_points = [(4, 5), (2, 3), (3, 1)], [2, 3, 1]
    values = [torch.randn(batch * heads, head_dim, h, w) for h, w in shapes]
    # Locations partly outside [0, 1] to exercise the zero padding.
    locations = torch.rand(batch, queries, heads, sum(num_points), 2) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, sum(num_points)).softmax(-1)
    fast = multi_scale_deformable_attention(values, shapes, locations, weights, num_points)
    slow = _slow_deformable(values, locations, weights, num_points)
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=1e-5)


def test_deformable_module_sampling_pattern():
    """Module forward = slow loop at ref_xy + offset * (1 / points_of_level) * ref_wh * 0.5, softmax weights."""
    torch.manual_seed(1)
    dim, heads, num_points = 8, 2, [2, 1]
    shapes = [(4, 4), (2, 2)]
    attn = MSDeformableAttention(dim, heads, num_points)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    query = torch.randn(1, 3, dim)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.3], [0.2, 0.7, 0.2, 0.5], [0.9, 0.1, 0.3, 0.3]]])
    memory = torch.randn(1, sum(h * w for h, w in shapes), dim)
    values = attn.split_values(memory, shapes)
    out = attn(query, boxes, values, shapes)

    total = sum(num_points)
    offsets = attn.sampling_offsets(query).reshape(1, 3, heads, total, 2)
    weights = attn.attention_weights(query).reshape(1, 3, heads, total).softmax(-1)
    per_point = torch.tensor([1 / 2, 1 / 2, 1.0])[None, None, None, :, None]
    locations = boxes[:, :, None, None, :2] + offsets * per_point * boxes[:, :, None, None, 2:] * 0.5
    # Values straight from the memory: head m of token k is memory[k, m*D:(m+1)*D].
    ref_values, start = [], 0
    for h, w in shapes:
        level = memory[0, start:start + h * w].reshape(h, w, heads, dim // heads).permute(2, 3, 0, 1)
        ref_values.append(level)
        start += h * w
    slow = _slow_deformable(ref_values, locations.detach(), weights.detach(), num_points)
    torch.testing.assert_close(out.detach().double(), slow, atol=1e-5, rtol=1e-5)


def test_position_embedding_is_the_official_table():
    """The official ``build_2d_sincos_position_embedding(w, h)``: meshgrid(arange(w), arange(h), 'ij')
    flattened, bands [sin a, cos a, sin b, cos b] with (a, b) = divmod(k, H); [sin y, cos y, sin x, cos x]
    on square maps."""
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)

    def bands(a, b):
        return torch.cat([torch.sin(a * omega), torch.cos(a * omega), torch.sin(b * omega), torch.cos(b * omega)])

    h, w, dim = 3, 5, 8
    pos = sincos_position_embedding_2d(h, w, dim)[0]
    assert pos.shape == (h * w, dim)
    for k in range(h * w):
        a, b = divmod(k, h)
        torch.testing.assert_close(pos[k], bands(a, b))
    square = sincos_position_embedding_2d(4, 4, dim)[0]
    for k in range(16):
        y, x = divmod(k, 4)
        torch.testing.assert_close(square[k], bands(y, x))
    assert not torch.allclose(square[1], bands(0, 1).roll(4))  # y first, not x first


def test_weighting_function_and_edge_distances():
    reg_max, up, reg_scale = 32, 0.5, 4.0
    w = weighting_function(reg_max, up, reg_scale, dtype=torch.float64)
    a = up * reg_scale
    assert w.shape == (reg_max + 1,)
    assert w[0] == -2 * a and w[-1] == 2 * a and w[reg_max // 2] == 0
    torch.testing.assert_close(w[1], torch.tensor(-a, dtype=torch.float64))
    torch.testing.assert_close(w[-2], torch.tensor(a, dtype=torch.float64))
    assert (w[1:] > w[:-1]).all()
    torch.testing.assert_close(w, -w.flip(0))
    # Steps grow away from the centre: fine near 0, coarse at the ends.
    steps = w[reg_max // 2 + 1:] - w[reg_max // 2:-1]
    assert (steps[1:-1] > steps[:-2]).all()

    torch.manual_seed(0)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.4, 0.1]], dtype=torch.float64)
    boxes = torch.tensor([[0.45, 0.4, 0.62, 0.66], [0.05, 0.5, 0.55, 0.7]], dtype=torch.float64)  # xyxy
    dist = box_to_edge_distances(ref, boxes, reg_scale)
    back = box_convert(edge_distances_to_box(ref, dist, reg_scale), "cxcywh", "xyxy")
    torch.testing.assert_close(back, boxes)
    torch.testing.assert_close(edge_distances_to_box(ref, torch.zeros(2, 4, dtype=torch.float64), reg_scale), ref)

    # The two-bin split reproduces every in-range distance: W(l) * wl + W(l + 1) * wr = d.
    left, wr, wl = edge_distance_bins(ref, boxes, reg_max, reg_scale, up)
    flat = dist.reshape(-1)
    inside = (flat > w[0]) & (flat < w[-1])
    assert inside.sum() >= 4
    li = left.long()
    rebuilt = w[li] * wl + w[li + 1] * wr
    torch.testing.assert_close(rebuilt[inside], flat[inside])
    torch.testing.assert_close(wl + wr, torch.ones_like(wl))
    # Out of range: all weight on the end bin.
    far = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    left, wr, wl = edge_distance_bins(ref[:1], far, reg_max, reg_scale, up)
    assert (wr == 1).all() and (wl == 0).all() and (left.long() == reg_max - 1).all()


def test_denoising_queries_structure():
    torch.manual_seed(0)
    targets = _targets()
    targets[1] = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}
    embed = nn.Embedding(81, 16, padding_idx=80)
    dn = build_denoising_queries(targets, 80, num_queries=10, class_embed=embed, num_denoising=7,
                                 label_noise_ratio=0.0, box_noise_scale=1.0)
    groups, m = dn.meta.num_groups, 3
    assert groups == 7 // 3 and dn.meta.num_denoising == 2 * m * groups
    total = dn.meta.num_denoising
    assert tuple(dn.content.shape) == (2, total, 16) and tuple(dn.boxes_logit.shape) == (2, total, 4)
    # Positives: first M of each group of 2M, real objects only.
    assert dn.meta.positive_indices[0].tolist() == [0, 1, 2, 6, 7, 8]
    assert dn.meta.positive_indices[1].tolist() == [0, 6]
    # Padding queries carry the (zero) padding embedding.
    assert torch.equal(dn.content[1, 1], torch.zeros(16))
    # Positives stay within half a box size of the truth (per corner).
    boxes = torch.sigmoid(dn.boxes_logit)
    true = box_convert(targets[0]["boxes"], "cxcywh", "xyxy")
    half = targets[0]["boxes"][:, 2:].repeat(1, 2) * 0.5
    for g in range(groups):
        noisy = box_convert(boxes[0, g * 2 * m: g * 2 * m + m], "cxcywh", "xyxy")
        assert ((noisy - true).abs() <= half + 1e-4).all()
    mask = dn.attn_mask
    assert tuple(mask.shape) == (total + 10, total + 10)
    assert mask[total:, :total].all() and not mask[total:, total:].any()  # matching queries never see DN
    assert not mask[:total, total:].any()  # DN queries see the matching queries
    for i, j in itertools.product(range(total), range(total)):
        assert bool(mask[i, j]) == (i // (2 * m) != j // (2 * m))

    assert build_denoising_queries([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
                                   80, 10, embed) is None
