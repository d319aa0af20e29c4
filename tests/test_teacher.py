"""The frozen DINOv3 teacher: shapes, freezing, prefix-token dropping, fingerprints, weights loading.

Plumbing tests use a tiny DINOv3 (same timm code, 64 wide, 2 blocks); the real ViT-B/16 is built
once, randomly initialised, at a 64-px input to check its size and width.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from distillery.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoV3Teacher,
    TeacherWeightsError,
    detect_checkpoint_layout,
    fingerprint_diff,
    fingerprint_digest,
    read_state_dict,
    sha256_file,
)

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
SIZE = 128  # -> pool 2 -> 64 px -> 4x4 grid


def tiny_teacher(**kw) -> DinoV3Teacher:
    args = dict(allow_random_init=True, input_size=SIZE, pool=2, model_kwargs=TINY)
    args.update(kw)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        return DinoV3Teacher(**args)


@pytest.fixture(scope="module")
def teacher() -> DinoV3Teacher:
    t = tiny_teacher(seed=1)
    randomise_(t.model, seed=11)  # layer scale 1e-5 would make every block nearly the identity
    return t


def images(b: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise_(model: nn.Module, seed: int) -> None:
    """Give every parameter a non-trivial value (layer scales near 1, norms near 1, the rest ~0.1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        is_norm_weight = (".norm" in name or name.startswith("norm")) and name.endswith(".weight")
        if name.endswith(("gamma_1", "gamma_2")) or is_norm_weight:
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.1 * noise)


def reference_grid(model: nn.Module, x: torch.Tensor, pool: int, n_prefix: int) -> torch.Tensor:
    """RT-DETRv4's teacher written out with timm: normalise, pool, forward_features, drop prefix."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    z = F.avg_pool2d((x - mean) / std, pool)
    with torch.no_grad():
        tokens = model.forward_features(z)
    b, _, h, w = z.shape
    ps = model.patch_embed.patch_size[0]
    patches = tokens[:, n_prefix:]
    return patches.reshape(b, h // ps, w // ps, -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- forward

# (640, 2) is RT-DETRv4's setting: a 20x20 grid, the size of the student's F5.
@pytest.mark.parametrize("size,pool", [(128, 2), (64, 1), (96, 2), (640, 2)])
def test_output_shape(size, pool):
    t = tiny_teacher(input_size=size, pool=pool)
    out = t(images(2, size))
    g = size // (16 * pool)
    assert out.shape == (2, 64, g, g) and out.dtype == torch.float32
    assert t.grid_size == (g, g) and t.embed_dim == 64 and t.patch_size == 16


def test_prefix_tokens_dropped_and_grid_is_row_major(teacher):
    # timm's DINOv3 puts CLS then 4 registers before the patches.
    assert teacher.num_prefix_tokens == 5 == teacher.model.num_prefix_tokens
    x = images(2)
    out = teacher(x)
    ref = reference_grid(teacher.model, x, pool=2, n_prefix=5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # Keeping a prefix token instead would shift every position: make sure that differs.
    with torch.no_grad():
        tokens = teacher.model.forward_features(F.avg_pool2d((x - teacher.mean) / teacher.std, 2))
    assert tokens.shape[1] == 5 + 16
    shifted = tokens[:, 4:-1].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    assert not torch.allclose(out, shifted, atol=1e-3)


def test_output_independent_of_batch_composition(teacher):
    x = images(3, seed=5)
    together = teacher(x)
    for i in range(3):
        alone = teacher(x[i:i + 1])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    # Reordering the batch reorders the outputs and nothing else.
    torch.testing.assert_close(teacher(x.flip(0)), together.flip(0), rtol=1e-5, atol=1e-5)


def test_frozen_and_stays_in_eval(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    student = nn.Conv2d(3, 64, kernel_size=32, stride=32)
    parent = nn.ModuleDict({"teacher": teacher, "student": student})
    parent.train()
    assert student.training
    assert not teacher.training and all(not m.training for m in teacher.modules())
    # The output carries no graph and can still be an operand of the student's loss
    # (an inference_mode tensor could not be saved for backward here).
    x = images(2)
    target = teacher(x)
    assert not target.requires_grad and target.grad_fn is None
    loss = (1 - F.cosine_similarity(student(x), target, dim=1)).mean()
    loss.backward()
    assert student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_inputs_raise_clear_errors(teacher):
    with pytest.raises(ValueError, match="128x128"):
        teacher(images(1, 96))
    with pytest.raises(ValueError, match="3 channels"):
        teacher(torch.rand(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        teacher(torch.rand(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="float"):
        teacher((images(1) * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        teacher(images(1) * 255)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DinoV3Teacher(allow_random_init=True, model_kwargs=TINY, input_size=100, pool=2)
    with pytest.raises(ValueError, match="dtype"):
        DinoV3Teacher(allow_random_init=True, model_kwargs=TINY, dtype=torch.int8)
    with pytest.raises(ValueError, match="not a DINOv3"):
        DinoV3Teacher(model_name="vit_tiny_patch16_224", allow_random_init=True)
    with pytest.raises(ValueError, match="JSON"):
        DinoV3Teacher(allow_random_init=True, model_kwargs={**TINY, "norm_layer": nn.LayerNorm})


def test_bfloat16_autocast_returns_float32_close_to_float32(teacher):
    bf = tiny_teacher(seed=1, dtype="bfloat16")
    bf.model.load_state_dict(teacher.model.state_dict())
    assert bf.fingerprint["dtype"] == "bfloat16"
    x = images(2)
    out_bf, out_32 = bf(x), teacher(x)
    assert out_bf.dtype == torch.float32
    assert not torch.equal(out_bf, out_32)  # it really computed in bf16
    cos = F.cosine_similarity(out_bf, out_32, dim=1)
    assert cos.min() > 0.98


# --------------------------------------------------------------------------- random init

def test_random_init_must_be_asked_for():
    with pytest.raises(ValueError, match="allow_random_init=True"):
        DinoV3Teacher(model_kwargs=TINY, input_size=SIZE)


def test_random_init_warns_logs_and_is_marked(caplog):
    rng_before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="distillery.teachers.dinov3"):
        t = tiny_teacher(seed=3)
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)
    assert t.fingerprint["weights_sha256"] == "random-init:seed=3"
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    # Same seed, same weights; another seed, other weights.
    same, other = tiny_teacher(seed=3), tiny_teacher(seed=4)
    x = images(1)
    assert torch.equal(t(x), same(x))
    assert not torch.allclose(t(x), other(x))


# --------------------------------------------------------------------------- fingerprint

def test_fingerprint_fields_and_determinism():
    a, b = tiny_teacher(), tiny_teacher()
    fp = a.fingerprint
    assert fp == b.fingerprint and fingerprint_digest(fp) == fingerprint_digest(b.fingerprint)
    assert json.loads(json.dumps(fp)) == fp
    assert fp == {
        "model_name": "vit_base_patch16_dinov3",
        "model_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2},
        "weights_sha256": "random-init:seed=0",
        "input_size": SIZE,
        "pool": 2,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "layer": "final_norm_patch_tokens",
        "rope_periods": "computed",
        "dtype": "float32",
        "num_prefix_tokens": 5,
        "patch_size": 16,
        "embed_dim": 64,
    }


@pytest.mark.parametrize("change,field", [
    ({"input_size": 64}, "input_size"),
    ({"pool": 1}, "pool"),
    ({"dtype": torch.bfloat16}, "dtype"),
    ({"seed": 1}, "weights_sha256"),
    ({"model_kwargs": {**TINY, "depth": 1}}, "model_kwargs.depth"),
    ({"mean": (0.5, 0.5, 0.5)}, "mean"),
])
def test_fingerprint_changes_with_each_setting(change, field):
    base, changed = tiny_teacher().fingerprint, tiny_teacher(**change).fingerprint
    assert fingerprint_digest(base) != fingerprint_digest(changed)
    assert field in fingerprint_diff(base, changed)
    assert fingerprint_diff(base, base) == []


def test_fingerprint_changes_with_weights_file(tmp_path, teacher):
    p1, p2 = tmp_path / "a.pth", tmp_path / "b.pth"
    sd = teacher.model.state_dict()
    torch.save(sd, p1)
    torch.save({k: v + 1e-3 for k, v in sd.items()}, p2)
    f1 = DinoV3Teacher(weights=p1, input_size=SIZE, model_kwargs=TINY).fingerprint
    f2 = DinoV3Teacher(weights=p2, input_size=SIZE, model_kwargs=TINY).fingerprint
    assert fingerprint_diff(f1, f2) == ["weights_sha256"]


def test_fingerprint_digest_is_canonical_and_stable():
    fp = {"b": [1, 2.5], "a": "x", "c": {"z": 1, "y": True}}
    canonical = b'{"a":"x","b":[1,2.5],"c":{"y":true,"z":1}}'
    assert fingerprint_digest(fp) == hashlib.sha256(canonical).hexdigest()
    assert fingerprint_digest(fp) == "ea63456d97aded960d6344fe8b0a8c0ed4b0fe76654ff059fde2461ab836d888"
    assert fingerprint_digest(dict(reversed(list(fp.items())))) == fingerprint_digest(fp)


def test_fingerprint_diff_names_fields():
    a = {"pool": 2, "dtype": "float32", "model_kwargs": {"depth": 2, "embed_dim": 64}, "only_a": 1}
    b = {"pool": 1, "dtype": "float32", "model_kwargs": {"depth": 1, "embed_dim": 64}, "only_b": 1}
    assert fingerprint_diff(a, b) == ["model_kwargs.depth", "only_a", "only_b", "pool"]


def test_dtype_given_as_string_or_torch_dtype_is_the_same_teacher():
    assert tiny_teacher(dtype="bfloat16").fingerprint == tiny_teacher(dtype=torch.bfloat16).fingerprint


# --------------------------------------------------------------------------- timm-layout files

@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_timm_layout_round_trip(tmp_path, teacher, fmt):
    sd = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    path = tmp_path / f"teacher.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "wrapped":
        torch.save({"model": sd, "epoch": torch.tensor(3)}, path)
    else:
        torch.save(sd, path)
    assert detect_checkpoint_layout(read_state_dict(path)) == "timm"
    loaded = DinoV3Teacher(weights=path, input_size=SIZE, model_kwargs=TINY)
    x = images(2, seed=9)
    assert torch.equal(loaded(x), teacher(x))
    assert loaded.fingerprint["weights_sha256"] == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_file_streams_in_chunks(tmp_path):
    p = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    p.write_bytes(data)
    assert sha256_file(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- Meta's official layout

def to_meta_layout(model: nn.Module, k_bias_seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state dict written in Meta's official key layout (dinov3's DinoVisionTransformer).

    Meta                              timm
    cls_token                         cls_token
    storage_tokens                    reg_token
    mask_token (1, D)                 - (pretraining only)
    rope_embed.periods (bf16)         - (recomputed: rope.periods, non-persistent)
    blocks.N.ls1.gamma / ls2.gamma    blocks.N.gamma_1 / gamma_2
    blocks.N.attn.qkv.bias (3D)       blocks.N.attn.q_bias, v_bias (qkvb models), - otherwise
    blocks.N.attn.qkv.bias_mask       - (ones on q and v, zeros on k)
    everything else                   same name
    """
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    g = torch.Generator().manual_seed(k_bias_seed)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k == "reg_token":
            out["storage_tokens"] = v
        elif k.endswith(".gamma_1"):
            out[k.removesuffix("gamma_1") + "ls1.gamma"] = v
        elif k.endswith(".gamma_2"):
            out[k.removesuffix("gamma_2") + "ls2.gamma"] = v
        elif k.endswith((".attn.q_bias", ".attn.v_bias")):
            continue  # packed into qkv.bias below
        else:
            out[k] = v
    for i, blk in enumerate(model.blocks):
        q = getattr(blk.attn, "q_bias", None)
        v = getattr(blk.attn, "v_bias", None)
        q = torch.zeros(dim) if q is None else q.detach()
        v = torch.zeros(dim) if v is None else v.detach()
        k = torch.randn(dim, generator=g)  # Meta masks the k bias out: any value must give the same model
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, k, v])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    head_dim = dim // heads
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    out["rope_embed.periods"] = periods.to(torch.bfloat16)  # Meta's files store them in bf16
    out["mask_token"] = torch.zeros(1, dim)
    return out


@pytest.fixture(scope="module", params=["vit_base_patch16_dinov3", "vit_base_patch16_dinov3_qkvb"])
def meta_source(request):
    """(timm model with non-trivial weights, its name)."""
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, num_classes=0, **TINY).eval()
    randomise_(model, seed=21)
    return model, request.param


def with_periods(model: nn.Module, periods: torch.Tensor) -> nn.Module:
    """A copy of a (dynamic-size) timm DINOv3 whose RoPE uses the given periods, as Meta's model does
    after loading its file (there ``rope_embed.periods`` is a persistent buffer, stored in bf16)."""
    out = copy.deepcopy(model)
    out.rope.periods.copy_(periods.float())
    return out


def test_meta_layout_converts_to_the_same_model(tmp_path, meta_source):
    source, name = meta_source
    meta = to_meta_layout(source)
    assert "blocks.0.ls1.gamma" in meta and "storage_tokens" in meta and "reg_token" not in meta
    path = tmp_path / "dinov3_vitb16_pretrain_lvd1689m-tiny.pth"
    torch.save(meta, path)
    assert detect_checkpoint_layout(read_state_dict(path)) == "meta"
    t = DinoV3Teacher(model_name=name, weights=path, input_size=SIZE, model_kwargs=TINY)
    x = images(2, seed=4)
    meta_model = with_periods(source, meta["rope_embed.periods"])
    torch.testing.assert_close(t(x), reference_grid(meta_model, x, pool=2, n_prefix=5), rtol=0, atol=0)
    # The file's bf16 periods were really used (timm's own float32 ones give other features).
    assert not torch.equal(t(x), reference_grid(source, x, pool=2, n_prefix=5))
    assert t.fingerprint["rope_periods"] == "checkpoint"
    assert t.fingerprint["weights_sha256"] == sha256_file(path)
    if name.endswith("_qkvb"):  # the q and v biases really came through
        assert torch.equal(t.model.blocks[1].attn.q_bias, source.blocks[1].attn.q_bias)
        assert torch.equal(t.model.blocks[1].attn.v_bias, source.blocks[1].attn.v_bias)


def test_meta_layout_periods_reach_a_fixed_size_model(tmp_path, meta_source):
    """dynamic_img_size=False models cache the RoPE sin/cos at build time; it must be rebuilt."""
    source, name = meta_source
    meta = to_meta_layout(source)
    path = tmp_path / "meta.pth"
    torch.save(meta, path)
    fixed = {**TINY, "dynamic_img_size": False, "img_size": SIZE // 2}
    t = DinoV3Teacher(model_name=name, weights=path, input_size=SIZE, model_kwargs=fixed)
    assert t.model.rope.pos_embed_cached is not None
    x = images(2, seed=4)
    meta_model = with_periods(source, meta["rope_embed.periods"])
    torch.testing.assert_close(t(x), reference_grid(meta_model, x, pool=2, n_prefix=5), rtol=0, atol=0)


def test_meta_layout_nonzero_qv_bias_needs_the_qkvb_model(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_base_patch16_dinov3_qkvb", pretrained=False, num_classes=0, **TINY)
    randomise_(source, seed=3)
    path = tmp_path / "meta.pth"
    torch.save(to_meta_layout(source), path)
    with pytest.raises(TeacherWeightsError, match=r"_qkvb.*") as err:
        DinoV3Teacher(weights=path, input_size=SIZE, model_kwargs=TINY)
    assert str(path) in str(err.value) and "blocks.0.attn.qkv.bias" in str(err.value)


def test_meta_layout_wrong_rope_periods_refused(tmp_path, meta_source):
    source, name = meta_source
    meta = to_meta_layout(source)
    meta["rope_embed.periods"] = meta["rope_embed.periods"].float() * 2  # another RoPE base
    path = tmp_path / "meta.pth"
    torch.save(meta, path)
    with pytest.raises(TeacherWeightsError, match="rope_embed.periods") as err:
        DinoV3Teacher(model_name=name, weights=path, input_size=SIZE, model_kwargs=TINY)
    assert str(path) in str(err.value)


def test_half_meta_layout_refused(tmp_path, meta_source):
    source, name = meta_source
    meta = to_meta_layout(source)
    del meta["storage_tokens"]
    path = tmp_path / "meta.pth"
    torch.save(meta, path)
    with pytest.raises(TeacherWeightsError, match="storage_tokens") as err:
        DinoV3Teacher(model_name=name, weights=path, input_size=SIZE, model_kwargs=TINY)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- bad files

def _load(path, name="vit_base_patch16_dinov3"):
    return DinoV3Teacher(model_name=name, weights=path, input_size=SIZE, model_kwargs=TINY)


def test_timm_layout_missing_and_unexpected_keys_named(tmp_path, teacher):
    sd = teacher.model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    p = tmp_path / "missing.pth"
    torch.save(missing, p)
    with pytest.raises(TeacherWeightsError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]") as err:
        _load(p)
    assert str(p) in str(err.value) and "unexpected keys" not in str(err.value)

    extra = {**sd, "blocks.0.attn.extra.weight": torch.zeros(3)}
    p = tmp_path / "extra.safetensors"
    save_file(extra, str(p))
    with pytest.raises(TeacherWeightsError, match=r"unexpected keys \['blocks.0.attn.extra.weight'\]") as err:
        _load(p)
    assert str(p) in str(err.value) and "missing keys" not in str(err.value)


def test_meta_layout_missing_and_unexpected_keys_named(tmp_path, meta_source):
    source, name = meta_source
    meta = to_meta_layout(source)
    del meta["blocks.1.ls2.gamma"]
    meta["cls_norm.weight"] = torch.ones(64)  # Meta's untied CLS norm: not in this architecture
    p = tmp_path / "meta-bad.pth"
    torch.save(meta, p)
    with pytest.raises(TeacherWeightsError) as err:
        _load(p, name)
    msg = str(err.value)
    assert str(p) in msg and "meta layout" in msg
    assert "missing keys ['blocks.1.gamma_2']" in msg and "unexpected keys ['cls_norm.weight']" in msg


def test_shape_mismatch_named(tmp_path, teacher):
    sd = dict(teacher.model.state_dict())
    sd["norm.weight"] = torch.ones(65)
    p = tmp_path / "shape.pth"
    torch.save(sd, p)
    with pytest.raises(TeacherWeightsError, match=r"norm.weight: file \(65,\) vs model \(64,\)") as err:
        _load(p)
    assert str(p) in str(err.value)


def test_unreadable_or_absent_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        _load(tmp_path / "nope.pth")
    p = tmp_path / "garbage.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherWeightsError, match="garbage.pth"):
        _load(p)
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(TeacherWeightsError, match="not a state dict"):
        _load(p)


# --------------------------------------------------------------------------- the real ViT-B/16

def test_real_vit_b16_size_width_and_shapes():
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        t = DinoV3Teacher(allow_random_init=True, input_size=64, pool=2)
    n_params = sum(p.numel() for p in t.parameters())
    assert n_params == 85_641_216  # DINOv3 ViT-B/16: 85.6 M
    assert t.embed_dim == 768 and t.patch_size == 16 and t.num_prefix_tokens == 5
    assert len(t.model.blocks) == 12 and t.grid_size == (2, 2)
    x = images(2, 64)
    out = t(x)
    assert out.shape == (2, 768, 2, 2)
    torch.testing.assert_close(out, reference_grid(t.model, x, pool=2, n_prefix=5), rtol=0, atol=0)
    assert t.fingerprint["embed_dim"] == 768
