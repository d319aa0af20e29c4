"""DEIMv2 students: paper sizes, the Spatial Tuning Adapter, the decoder options, training, PEFT, export.

Sizes. Parameters and FLOPs are counted as in ``test_student_sizes.py`` (models on the ``meta``
device, ``FlopCounterMode`` over one eval forward, 2 FLOPs per multiply-add, attention on the
math backend so that every matmul is seen), at each model's own input size (640; Femto 416,
Atto 320: the sizes the paper's GFLOPs are quoted at). Two conventions are printed for each:

* params: ``total`` (every parameter) and ``deployed`` (without what the official
  ``convert_to_deploy`` drops, the score heads and LQE heads of the layers before ``eval_idx``,
  and without the training-only denoising embedding). The paper's numbers are the deployed ones
  (S: 9.71 M, Atto 0.49 M); ``deployed`` must be within 5 % of the paper. ``total`` must equal
  the official code's count (measured once from Intellindust-AI-Lab/DEIMv2 with its recipes)
  minus the documented differences: the frozen scalars ``up`` / ``reg_scale`` (2), and for
  DINOv3 ViT-S / S+ (L / X) the parameters timm leaves out: the key bias of every block (masked
  to zero there by the official ``mask_k_bias``), the query / value biases (zero in the released
  weights; timm's ``_qkvb`` variants keep them) and the pretraining-only mask token. The
  distilled ViT of S / M keeps its key bias as a parameter, as the official code: with RoPE
  rotating the biased keys, the softmax does not cancel it.
* GFLOPs: ``all`` (every matmul) and ``paper`` (without the ViT's attention matmuls, QK^T and
  AV: the paper's counter does not see ``scaled_dot_product_attention``; subtracting them gives
  its numbers, e.g. S 26.0 vs 25.6). ``paper`` must be within 15 %.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from distillery.students import WeightsError, build_criterion, build_student
from distillery.students.decoder import DFINEDecoder, RMSNorm, SwiGLUFFN
from distillery.students.deimv2 import (
    DEIMV2_SPECS,
    DEIMv2,
    DINOv3ViTBackbone,
    PrunedHGNetv2,
    apply_backbone_peft,
    build_deimv2,
)
from distillery.students.peft import AdaRouteLinear, ExpertCentre
from distillery.students.sta import SpatialTuningAdapter, ViTPyramid
from distillery.students.training import compute_losses

# Every build without backbone weights warns (random init); the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:DEIMv2 backbone")

PAPER = {  # name: (M params, GFLOPs), arXiv 2509.20787 / official model zoo
    "deimv2_x": (50.3, 151.6),
    "deimv2_l": (32.2, 96.7),
    "deimv2_m": (18.1, 52.2),
    "deimv2_s": (9.71, 25.6),
    "deimv2_n": (3.6, 6.8),
    "deimv2_pico": (1.5, 5.2),
    "deimv2_femto": (1.0, 1.7),
    "deimv2_atto": (0.49, 0.8),
}
OFFICIAL_PARAMS = {  # sum(p.numel()) of the official model built from its recipe
    "deimv2_x": 51_211_736,
    "deimv2_l": 32_551_214,
    "deimv2_m": 18_357_750,
    "deimv2_s": 9_779_838,
    "deimv2_n": 3_600_421,
    "deimv2_pico": 1_539_539,
    "deimv2_femto": 983_945,
    "deimv2_atto": 508_985,
}
# up + reg_scale (2); ViT-S/S+: per-block k bias (masked to zero there, a fixed zero here) + mask token.
EXPECTED_DIFFERENCE = {
    "deimv2_x": 2 + 12 * 384 + 384,
    "deimv2_l": 2 + 12 * 384 + 384,
    "deimv2_m": 2,
    "deimv2_s": 2,
    "deimv2_n": 2, "deimv2_pico": 2, "deimv2_femto": 2, "deimv2_atto": 2,
}
SIZE = 128


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"labels": torch.tensor([1, 5, 7]),
         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.2]])},
    ]


def _tiny(seed: int = 0, **overrides) -> DEIMv2:
    torch.manual_seed(seed)
    return build_deimv2("deimv2_tiny", **overrides)


def _vit_attention_flops(model: DEIMv2, height: int, width: int) -> int:
    """QK^T and AV of every ViT block: 2 matmuls x 2 FLOPs x N^2 x D per block (N incl. prefix tokens)."""
    vit = model.backbone.vit
    tokens = (height // 16) * (width // 16) + vit.num_prefix_tokens
    return len(vit.blocks) * 2 * 2 * tokens * tokens * vit.embed_dim


def _count(model: DEIMv2, device: str) -> tuple[int, int]:
    """(total params, FLOPs of one eval forward at the model's input size)."""
    model.eval()
    height, width = model.eval_spatial_size
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.rand(1, 3, height, width, device=device))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def _deployed_params(model: DEIMv2) -> int:
    decoder = model.decoder
    dropped = sum(p.numel() for p in decoder.denoising_class_embed.parameters())
    for i in range(decoder.num_layers):
        if i != decoder.eval_idx:
            dropped += sum(p.numel() for p in decoder.dec_score_head[i].parameters())
            dropped += sum(p.numel() for p in decoder.lqe_layers[i].parameters())
    return sum(p.numel() for p in model.parameters()) - dropped


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("name", list(PAPER))
def test_paper_sizes(name):
    with torch.device("meta"):
        model = build_deimv2(name)
    total, flops = _count(model, "meta")
    height, width = model.eval_spatial_size
    attention = _vit_attention_flops(model, height, width) if model.sta is not None else 0
    deployed = _deployed_params(model)
    paper_m, paper_gflops = PAPER[name]
    gflops_paper = (flops - attention) / 1e9
    print(f"\n{name} @{height}x{width}: params {total / 1e6:.3f} M total / {deployed / 1e6:.3f} M deployed "
          f"(paper {paper_m} M, official code {OFFICIAL_PARAMS[name] / 1e6:.3f} M); GFLOPs {flops / 1e9:.2f} all "
          f"matmuls / {gflops_paper:.2f} without ViT attention (paper {paper_gflops})")
    assert abs(deployed / 1e6 - paper_m) <= 0.05 * paper_m
    assert abs(gflops_paper - paper_gflops) <= 0.15 * paper_gflops
    assert OFFICIAL_PARAMS[name] - total == EXPECTED_DIFFERENCE[name]


def test_meta_count_equals_real_count_and_attention_term():
    """The meta-device count is the real one; the ViT attention term is exactly the backbone's bmm FLOPs."""
    torch.manual_seed(0)
    with torch.device("meta"):
        meta_model = build_deimv2("deimv2_tiny")
    meta = _count(meta_model, "meta")
    real_model = _tiny()
    real = _count(real_model, "cpu")
    assert meta == real
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        real_model.backbone(torch.rand(1, 3, 256, 256))
    bmm = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(op))
    assert bmm == _vit_attention_flops(real_model, 256, 256)


# ------------------------------------------------------------------------------------------ STA
def test_sta_pyramid_is_parameter_free_interpolation():
    pyramid = ViTPyramid()
    assert list(pyramid.parameters()) == [] and list(pyramid.buffers()) == []
    maps = [torch.randn(2, 8, 6, 10) for _ in range(3)]
    up, same, down = pyramid(maps)
    assert [tuple(t.shape) for t in (up, same, down)] == [(2, 8, 12, 20), (2, 8, 6, 10), (2, 8, 3, 5)]
    torch.testing.assert_close(up, F.interpolate(maps[0], scale_factor=2.0, mode="bilinear", align_corners=False))
    assert same is maps[1]
    torch.testing.assert_close(down, F.avg_pool2d(maps[2], 2))  # bilinear x0.5 = 2x2 mean
    single = pyramid(maps[:1])
    torch.testing.assert_close(single[2], F.avg_pool2d(maps[0], 2))
    with pytest.raises(ValueError, match="1 or 3"):
        pyramid(maps[:2])


def test_sta_shapes_and_detail_branch():
    torch.manual_seed(0)
    sta = SpatialTuningAdapter(vit_dim=48, out_dim=40, detail_channels=8)
    images = torch.rand(2, 3, 96, 160)
    vit_maps = [torch.randn(2, 48, 6, 10) for _ in range(3)]
    detail = sta.detail(images)
    assert [tuple(d.shape) for d in detail] == [(2, 16, 12, 20), (2, 32, 6, 10), (2, 32, 3, 5)]
    out = sta(images, vit_maps)
    assert [tuple(o.shape) for o in out] == [(2, 40, 12, 20), (2, 40, 6, 10), (2, 40, 3, 5)]
    # The fusion convs see ViT + detail channels; all STA parameters are outside the pyramid.
    assert [f[0].in_channels for f in sta.fuse] == [48 + 16, 48 + 32, 48 + 32]
    assert sum(p.numel() for p in sta.parameters()) == (sum(p.numel() for p in sta.detail.parameters())
                                                        + sum(p.numel() for p in sta.fuse.parameters()))
    no_detail = SpatialTuningAdapter(vit_dim=48, detail_channels=0)
    assert no_detail.detail is None
    assert [tuple(o.shape) for o in no_detail(images, vit_maps)] == [(2, 48, 12, 20), (2, 48, 6, 10), (2, 48, 3, 5)]


# ------------------------------------------------------------------------------------------ decoder options
def _decoder(seed: int = 0, **options) -> DFINEDecoder:
    torch.manual_seed(seed)
    return DFINEDecoder(num_classes=5, hidden_dim=32, num_queries=10, feat_channels=(32, 32), feat_strides=(16, 32),
                        num_layers=3, num_heads=4, ffn_dim=64, num_points=(2, 2), num_denoising=0, **options)


def _memory(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 32, 4, 4, generator=g)]


def test_rmsnorm_option_changes_only_the_norms():
    base, rms = _decoder(), _decoder(norm="rmsnorm")
    sb, sr = base.state_dict(), rms.state_dict()
    norm_keys = {k for k in sb if k.startswith("layers.") and ".norm" in k}
    assert norm_keys and all(k.endswith((".weight", ".bias")) for k in norm_keys)
    # Same seed, norms have no random init: every other tensor is identical.
    assert set(sb) - norm_keys == set(sr) - {k for k in sr if k.startswith("layers.") and ".norm" in k}
    assert all(torch.equal(sb[k], sr[k]) for k in set(sb) - norm_keys)
    for layer in rms.layers:
        assert isinstance(layer.norm1, RMSNorm) and isinstance(layer.norm3, RMSNorm)
        assert isinstance(layer.gateway.norm, RMSNorm)
    assert isinstance(rms.enc_output.norm, nn.LayerNorm)  # not a decoder-layer norm
    x = torch.randn(3, 7, 32)
    norm = rms.layers[0].norm1
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)
    base.eval()
    rms.eval()
    with torch.no_grad():
        assert not torch.allclose(base(_memory())["pred_logits"], rms(_memory())["pred_logits"])


def test_swiglu_option_changes_only_the_ffn():
    base, swiglu = _decoder(), _decoder(ffn="swiglu")
    shapes_b = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    shapes_s = {k: tuple(v.shape) for k, v in swiglu.state_dict().items()}
    ffn_b = {k for k in shapes_b if ".linear1." in k or ".linear2." in k}
    ffn_s = {k for k in shapes_s if ".swiglu." in k}
    assert len(ffn_b) == len(ffn_s) == 4 * 3
    assert {k: v for k, v in shapes_b.items() if k not in ffn_b} == {k: v for k, v in shapes_s.items()
                                                                      if k not in ffn_s}
    layer = swiglu.layers[0]
    assert isinstance(layer.swiglu, SwiGLUFFN) and not hasattr(layer, "linear1")
    assert tuple(layer.swiglu.w12.weight.shape) == (64, 32) and tuple(layer.swiglu.w3.weight.shape) == (32, 32)
    x = torch.randn(2, 5, 32)
    a, b = layer.swiglu.w12(x).chunk(2, dim=-1)
    torch.testing.assert_close(layer.swiglu(x), layer.swiglu.w3(F.silu(a) * b))


def test_shared_query_pos_and_other_deimv2_options():
    calls = {}

    def count(decoder: DFINEDecoder) -> int:
        calls["n"] = 0
        handle = decoder.query_pos_head.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        decoder.train()
        decoder(_memory())
        handle.remove()
        return calls["n"]

    assert count(_decoder()) == 3  # D-FINE: one position embedding per layer
    shared = _decoder(share_query_pos=True, query_pos_layers=3, query_pos_hidden=32, enc_output=False,
                      use_gateway=False, share_bbox_head=True)
    assert count(shared) == 1
    assert [tuple(layer.weight.shape) for layer in shared.query_pos_head.layers] == [(32, 4), (32, 32), (32, 32)]
    assert shared.enc_output is None
    assert not hasattr(shared.layers[0], "gateway") and hasattr(shared.layers[0], "norm2")
    assert shared.dec_bbox_head[0] is shared.dec_bbox_head[2]
    unshared = _decoder()
    per_head = sum(p.numel() for p in unshared.dec_bbox_head[0].parameters())
    assert sum(p.numel() for p in shared.dec_bbox_head.parameters()) == per_head
    assert "layers.0.gateway.gate.weight" in unshared.state_dict() and unshared.enc_output is not None


# ------------------------------------------------------------------------------------------ model
def test_tiny_shapes_train_step_and_gradients_reach_every_component():
    model = _tiny(num_classes=9, dsi=True, teacher_dim=24)
    spec = model.spec
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, SIZE, 96))
    assert set(out) == {"pred_logits", "pred_boxes"}
    assert tuple(out["pred_logits"].shape) == (2, spec.num_queries, 9)

    model.train()
    criterion = build_criterion(num_classes=9)
    torch.manual_seed(1)
    grid = torch.randn(2, 24, SIZE // 32, SIZE // 32)
    result = compute_losses(model, criterion, torch.rand(2, 3, SIZE, SIZE), _targets(), teacher_grid=grid,
                            dsi_weight=1.0)
    assert torch.isfinite(result.total) and "loss_dsi" in result.parts
    result.total.backward()
    components = {model.component_of(n) for n, _ in model.named_parameters()}
    assert components == {"backbone", "sta", "aifi", "ccff", "decoder", "dsi"}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    reached = {c: 0.0 for c in components}
    for name, p in model.named_parameters():
        reached[model.component_of(name)] += float(p.grad.abs().sum())
    assert all(v > 0 for v in reached.values()), reached

    train_keys = set(model(torch.rand(2, 3, SIZE, SIZE), _targets()))
    rt = build_student("rtdetrv4_tiny", num_classes=9).train()
    assert train_keys == set(rt(torch.rand(2, 3, SIZE, SIZE), _targets()))


def test_ultralight_sizes_run_and_train():
    """Atto (pruned HGNetv2 + lite encoder + shared box head, no gate) trains; N keeps strides 16 / 32."""
    torch.manual_seed(0)
    atto = build_deimv2("deimv2_atto", num_classes=4, num_queries=40)
    assert atto.sta is None and atto.backbone.strides == [16] and atto.decoder.feat_strides == [16, 32]
    atto.train()
    criterion = build_criterion(num_classes=4)
    targets = [{"labels": t["labels"] % 4, "boxes": t["boxes"]} for t in _targets()]
    losses = criterion(atto(torch.rand(2, 3, 160, 160), targets), targets)
    total = torch.stack(list(losses.values())).sum()
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in atto.parameters())
    assert {atto.component_of(n) for n, _ in atto.named_parameters()} == {"backbone", "ccff", "decoder"}

    nano = build_deimv2("deimv2_n", num_queries=20).eval()
    assert nano.backbone.strides == [16, 32] and nano.backbone.out_channels == [512, 1024]
    with torch.no_grad():
        out = nano(torch.rand(1, 3, SIZE, SIZE))
    assert tuple(out["pred_boxes"].shape) == (1, 20, 4)


def test_build_student_dispatch_and_errors():
    model = build_student("deimv2_tiny", num_classes=3, eval_spatial_size=320, dsi=True, teacher_dim=384)
    assert isinstance(model, DEIMv2) and model.eval_spatial_size == (320, 320)
    assert isinstance(model.dsi, nn.Linear) and (model.dsi.in_features, model.dsi.out_features) == (64, 384)
    assert build_deimv2("deimv2_tiny").dsi is None  # DEIMv2 has no DSI unless asked
    with pytest.raises(TypeError, match="num_querys"):
        build_student("deimv2_tiny", num_querys=10)
    with pytest.raises(KeyError, match="deimv2_q"):
        build_student("deimv2_q")
    with pytest.raises(ValueError, match="multiples of 32"):
        build_deimv2("deimv2_tiny", eval_spatial_size=(100, 100))
    with pytest.raises(ValueError, match="vit_layers"):
        build_deimv2("deimv2_tiny", vit_layers=(0, 5))
    with pytest.raises(ValueError, match="multiple of 32"):
        model.eval()(torch.rand(1, 3, 100, 128))
    with pytest.raises(KeyError, match="head.fc"):
        model.component_of("head.fc.weight")


# ------------------------------------------------------------------------------------------ weights
def test_vit_weights_timm_and_official_distilled_layouts(tmp_path):
    source = _tiny(seed=3).backbone
    with pytest.warns(UserWarning, match="randomly initialised"):
        DINOv3ViTBackbone(embed_dim=64, depth=3, num_heads=2, layers=(0, 1, 2))
    images = torch.rand(1, 3, 64, 64)

    with torch.no_grad():  # a learnt key bias, as in the released S/M weights
        for block in source.vit.blocks:
            block.attn.k_bias.normal_()
    torch.save(source.vit.state_dict(), tmp_path / "timm.pth")
    loaded = build_deimv2("deimv2_tiny", backbone_weights=tmp_path / "timm.pth").backbone
    for a, b in zip(loaded(images), source(images)):
        torch.testing.assert_close(a, b)

    # The official distilled-ViT layout: fused qkv bias (with the key bias), RoPE periods, '_model.' prefix.
    state = source.vit.state_dict()
    official = {}
    for key, value in state.items():
        if key.endswith("attn.q_bias"):
            official["_model." + key.replace("q_bias", "qkv.bias")] = torch.cat(
                [value, state[key.replace("q_bias", "k_bias")], state[key.replace("q_bias", "v_bias")]])
        elif not key.endswith(("attn.k_bias", "attn.v_bias")):
            official["_model." + key] = value
    official["_model.rope_embed.periods"] = torch.ones(8)
    torch.save(official, tmp_path / "vitt_distill.pt")
    loaded = build_deimv2("deimv2_tiny", backbone_weights=tmp_path / "vitt_distill.pt").backbone
    for a, b in zip(loaded(images), source(images)):
        torch.testing.assert_close(a, b)

    # A timm-layout file from before the key bias was a parameter (no k_bias): a zero key bias.
    old_layout = {k: v for k, v in state.items() if not k.endswith("attn.k_bias")}
    torch.save(old_layout, tmp_path / "old.pth")
    loaded = build_deimv2("deimv2_tiny", backbone_weights=tmp_path / "old.pth").backbone
    assert all(not block.attn.k_bias.any() for block in loaded.vit.blocks)

    broken = {k: v for k, v in source.vit.state_dict().items() if "blocks.1.mlp.fc1" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as info:
        build_deimv2("deimv2_tiny", backbone_weights=tmp_path / "broken.pth")
    assert "blocks.1.mlp.fc1.weight" in str(info.value) and "broken.pth" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_deimv2("deimv2_tiny", backbone_weights=tmp_path / "nowhere.pth")


def test_distilled_vit_key_bias_is_a_trainable_parameter_that_matters():
    """With RoPE rotating the biased keys, the key bias changes the output (the softmax does not cancel it)."""
    backbone = _tiny(seed=0).backbone
    names = [n for n, _ in backbone.vit.named_parameters() if n.endswith("attn.k_bias")]
    assert len(names) == len(backbone.vit.blocks)
    images = torch.rand(1, 3, 64, 64)
    before = backbone(images)[-1]
    with torch.no_grad():
        backbone.vit.blocks[0].attn.k_bias.normal_()
    after = backbone(images)[-1]
    assert (after - before).abs().max() > 1e-3
    after.sum().backward()
    assert backbone.vit.blocks[0].attn.k_bias.grad is not None
    assert backbone.vit.blocks[0].attn.k_bias.grad.abs().sum() > 0


def test_rope_coordinate_rescaling_in_training_only():
    """L / X: the official pos_embed_rope_rescale_coords = 2; S / M (distilled ViT): none."""
    assert DEIMV2_SPECS["deimv2_l"].vit_rope_rescale_coords == 2.0
    assert DEIMV2_SPECS["deimv2_x"].vit_rope_rescale_coords == 2.0
    assert DEIMV2_SPECS["deimv2_s"].vit_rope_rescale_coords is None
    torch.manual_seed(0)
    backbone = DINOv3ViTBackbone(embed_dim=64, depth=2, num_heads=2, layers=(0, 1), rope_rescale_coords=2.0)
    images = torch.rand(1, 3, 64, 64)
    backbone.eval()
    torch.testing.assert_close(backbone(images)[-1], backbone(images)[-1])
    backbone.train()
    assert (backbone(images)[-1] - backbone(images)[-1]).abs().max() > 1e-4


def test_vit_weights_official_dinov3_layout(tmp_path):
    """An official DINOv3 ViT-S checkpoint (storage tokens, ls1/ls2.gamma, fused qkv bias) loads into timm's model."""
    torch.manual_seed(0)
    source = DINOv3ViTBackbone("vit_small_patch16_dinov3", layers=(5, 8, 11), norm_outputs=True)
    with torch.no_grad():
        for name, p in source.vit.named_parameters():
            if "gamma" in name:
                p.uniform_(0.5, 1.0)  # make the blocks matter
    official = {"mask_token": torch.zeros(1, 384), "rope_embed.periods": torch.ones(16)}
    for key, value in source.vit.state_dict().items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        official[key] = value
        if key.endswith("attn.qkv.weight"):
            official[key.replace("weight", "bias")] = torch.zeros(3 * 384)
    torch.save({"model": official}, tmp_path / "dinov3_vits16.pth")
    target = DINOv3ViTBackbone("vit_small_patch16_dinov3", layers=(5, 8, 11), norm_outputs=True,
                               weights=tmp_path / "dinov3_vits16.pth")
    images = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        for a, b in zip(target(images), source(images)):
            torch.testing.assert_close(a, b)
    # Non-zero query/value biases cannot be dropped: the error names the variant that keeps them.
    official["blocks.3.attn.qkv.bias"] = torch.ones(3 * 384)
    torch.save(official, tmp_path / "biased.pth")
    with pytest.raises(ValueError, match="_qkvb"):
        target.load_weights(tmp_path / "biased.pth")


def test_pruned_hgnetv2_loads_the_b0_tensors_that_fit(tmp_path):
    torch.manual_seed(0)
    b0 = timm.create_model("hgnetv2_b0", pretrained=False)
    torch.save(b0.state_dict(), tmp_path / "b0.pth")
    for variant, pruned_stage_fits in (("hgnetv2_pico", True), ("hgnetv2_atto", False)):
        net = PrunedHGNetv2(variant)
        report = net.load_weights(tmp_path / "b0.pth")
        own = net.state_dict()
        torch.testing.assert_close(own["stem.stem1.conv.weight"], b0.state_dict()["stem.stem1.conv.weight"])
        torch.testing.assert_close(own["stages.1.blocks.0.layers.0.conv.weight"],
                                   b0.state_dict()["stages.1.blocks.0.layers.0.conv.weight"])
        assert any(k.startswith("stages.3.") for k in report["skipped_from_file"])  # B0's stage 4
        assert (not any(k.startswith("stages.2.") for k in report["not_in_file"])) == pruned_stage_fits
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="wrong.pth"):
        PrunedHGNetv2("hgnetv2_femto", weights=tmp_path / "wrong.pth")


# ------------------------------------------------------------------------------------------ PEFT + export
def _adapted_tiny(method: str = "adaroute"):
    model = _tiny(seed=4, num_classes=6)
    model.eval()
    with torch.no_grad():  # DINOv3-style ViT weights are never all tiny: give the frozen ViT some scale
        for p in model.backbone.vit.parameters():
            p.mul_(3.0)
    frozen = copy.deepcopy(model)
    report = apply_backbone_peft(model, method, rank=4)
    return model, frozen, report


def test_adaroute_on_the_deimv2_vit_starts_frozen_and_trains_only_adapters_and_head():
    model, frozen, report = _adapted_tiny()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model(images), frozen(images)
    for key in ("pred_logits", "pred_boxes"):
        assert (a[key] - b[key]).abs().max() <= 1e-6
    assert report.trainable_params == report.adapter_params > 0

    model.train()
    criterion = build_criterion(num_classes=6)
    targets = [{"labels": t["labels"] % 6, "boxes": t["boxes"]} for t in _targets()]
    losses = criterion(model(images, targets), targets)
    torch.stack(list(losses.values())).sum().backward()
    adapter_names = {n for n, _ in model.named_parameters()
                     if n.startswith("backbone.vit.peft_centres.") or ".router." in n}
    assert adapter_names
    for name, p in model.named_parameters():
        if name.startswith("backbone.") and name not in adapter_names:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    up = [m for m in model.modules() if isinstance(m, ExpertCentre)]
    assert up and all(float(c.up.grad.abs().sum()) > 0 for c in up)  # zero-init up experts learn first
    with pytest.raises(ValueError, match="ViT backbone"):
        apply_backbone_peft(build_deimv2("deimv2_atto"), "adaroute")


def test_onnx_export_of_tiny_deimv2_with_adaroute(tmp_path):
    pytest.importorskip("onnxruntime")
    from distillery.students.export import export_onnx, onnx_parity

    model, _, _ = _adapted_tiny()
    torch.manual_seed(5)
    with torch.no_grad():  # trained adapters: the exported graph must carry them
        for module in model.modules():
            if isinstance(module, ExpertCentre):
                module.up.normal_(0.0, 0.2)
    assert any(isinstance(m, AdaRouteLinear) for m in model.modules())
    meta = export_onnx(model, tmp_path / "deimv2_tiny.onnx", SIZE, num_top=20)
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    diffs = onnx_parity(model, tmp_path / "deimv2_tiny.onnx", torch.rand(3, 3, SIZE, SIZE), SIZE, 20)
    assert max(diffs.values()) < 1e-3, diffs
