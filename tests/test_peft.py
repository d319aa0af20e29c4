"""AdaRoute / LoRA adapters on tiny timm ViTs (VisionTransformer and DINOv3-style Eva)."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from distillery.students.peft import (
    DEFAULT_SUBLAYERS,
    AdaRouteLinear,
    ExpertCentre,
    LoRALinear,
    apply_peft,
    count_parameters,
    lora_params_per_rank,
    lora_rank_for_budget,
    merge_lora,
)

# Tiny members of the two families the backbones and the teacher come from.
VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)  # timm VisionTransformer
EVA = dict(embed_dim=64, depth=3, num_heads=2, img_size=64)  # vit_small_patch16_dinov3 (Eva, RoPE)


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny ViT that returns pooled features (no classifier), in eval mode."""
    torch.manual_seed(seed)
    if family == "vit":
        model = VisionTransformer(num_classes=0, **VIT)
    else:
        # init_values=1.0: DINOv3's layer scale starts at 1e-5, which would shrink every branch
        # (and so every adapter) by 1e5 in a random-init model; trained DINOv3 gammas are far larger.
        model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0,
                                  init_values=1.0, **EVA)
    return model.eval()


def images(family: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = VIT["img_size"] if family == "vit" else EVA["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise_up_projections(model: nn.Module, std: float = 0.5) -> None:
    """Make the zero-initialised up-projections non-zero, as training would."""
    torch.manual_seed(123)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ExpertCentre):
                module.up.normal_(0.0, std)
            elif isinstance(module, LoRALinear):
                module.lora_up.normal_(0.0, std)


def is_adapter_param(name: str) -> bool:
    return name.startswith("peft_centres.") or ".router." in name or ".lora_" in name


FAMILIES = ["vit", "eva"]
METHODS = ["adaroute", "lora"]


# --------------------------------------------------------------------------------------------
# step 0 equals the frozen model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_zero_initialised_up_projection_reproduces_frozen_model(family, method):
    model = build(family)
    x = images(family)
    with torch.no_grad():
        frozen = model(x)
    report = apply_peft(model, method, rank=4)
    assert len(report.adapted_layers) == 2 * len(model.blocks)
    with torch.no_grad():
        adapted = model(x)
    assert (adapted - frozen).abs().max().item() <= 1e-6
    # ...and not because the adapters are bypassed: with non-zero up-projections the output moves.
    randomise_up_projections(model)
    with torch.no_grad():
        assert (model(x) - frozen).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------
# freezing and gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_only_adapters_train_and_only_they_and_the_head_get_gradients(family, method):
    vit = build(family)
    original_names = {n for n, _ in vit.named_parameters()}
    apply_peft(vit, method, rank=4)

    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    assert not (trainable & original_names)
    assert {n for n, p in vit.named_parameters() if not p.requires_grad} == original_names

    head = nn.Linear(vit.num_features, 3)  # a detector part outside the adapted module stays trainable
    loss = head(vit(images(family))).square().mean()
    loss.backward()
    for name, p in vit.named_parameters():
        if name in original_names:
            assert p.grad is None, f"frozen {name} received a gradient"
        else:
            assert p.grad is not None, f"adapter {name} received no gradient"
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    up_name = "peft_centres.attn_proj.up" if method == "adaroute" else "blocks.0.attn.proj.lora_up"
    assert dict(vit.named_parameters())[up_name].grad.abs().sum() > 0  # zero-init B still learns


@pytest.mark.parametrize("method", METHODS)
def test_zero_init_gradient_reaches_down_projection_and_router_after_first_step(method):
    vit = build("vit")
    apply_peft(vit, method, rank=4)
    params = dict(vit.named_parameters())
    if method == "adaroute":
        late = ["peft_centres.attn_proj.down", "peft_centres.mlp_fc2.down",
                "blocks.0.attn.proj.router.fc1.weight", "blocks.1.mlp.fc2.router.fc2.weight"]
    else:
        late = ["blocks.0.attn.proj.lora_down", "blocks.1.mlp.fc2.lora_down"]
    optimizer = torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=0.1)
    x, target = images("vit", batch=4), torch.randn(4, VIT["embed_dim"])

    F.mse_loss(vit(x), target).backward()
    for name in late:  # up-projection is zero: nothing flows to the parts before it yet
        assert params[name].grad.abs().max().item() == 0.0, name
    optimizer.step()
    optimizer.zero_grad()
    F.mse_loss(vit(x), target).backward()
    for name in late:
        assert params[name].grad.abs().max().item() > 0.0, name


# --------------------------------------------------------------------------------------------
# the shared expert centre
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_centre_is_one_tensor_counted_once(family):
    vit = build(family)
    apply_peft(vit, "adaroute", rank=4)
    layers = [m for m in vit.modules() if isinstance(m, AdaRouteLinear)]
    proj_layers = [blk.attn.proj for blk in vit.blocks]
    assert all(isinstance(m, AdaRouteLinear) for m in proj_layers)
    assert len({m.centre.down.data_ptr() for m in proj_layers}) == 1
    assert len({m.centre.up.data_ptr() for m in proj_layers}) == 1
    assert proj_layers[0].centre is vit.peft_centres["attn_proj"]
    assert len({id(m.centre) for m in layers}) == 2  # one for attn.proj, one for mlp.fc2

    names = [n for n, _ in vit.named_parameters()]
    assert names.count("peft_centres.attn_proj.down") == 1
    assert sum("down" in n.split(".")[-1] for n in names) == 2  # no per-layer alias of a centre
    assert len({p.data_ptr() for p in vit.parameters()}) == len(names)
    state_keys = list(vit.state_dict())
    assert sum(k.endswith(".down") for k in state_keys) == 2
    assert len({v.data_ptr() for v in vit.state_dict().values()}) == len(state_keys)

    # A deep copy (EMA) keeps the sharing inside the copy, apart from the original.
    clone = copy.deepcopy(vit)
    clone_layers = [m for m in clone.modules() if isinstance(m, AdaRouteLinear)]
    assert all(m.centre is clone.peft_centres[k] for m, k in zip(clone_layers, ["attn_proj", "mlp_fc2"] * 8))
    assert clone.peft_centres["attn_proj"].down.data_ptr() != vit.peft_centres["attn_proj"].down.data_ptr()


# --------------------------------------------------------------------------------------------
# routing depends on the input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [None, 2])
def test_router_weights_and_adapter_output_depend_on_input(top_k):
    vit = build("vit")
    apply_peft(vit, "adaroute", rank=4, num_experts=4, top_k=top_k)
    layer = vit.blocks[0].mlp.fc2
    torch.manual_seed(5)
    tokens_a = torch.randn(1, 17, layer.in_features)
    tokens_b = torch.randn(1, 17, layer.in_features) * 3 + 1
    with torch.no_grad():
        down_a, up_a = layer.routing_weights(tokens_a)
        down_b, up_b = layer.routing_weights(tokens_b)
        assert down_a.shape == (1, 4) and up_a.shape == (1, 4)
        for w in (down_a, up_a, down_b, up_b):
            assert torch.allclose(w.sum(-1), torch.ones(1))
            assert int((w > 0).sum()) == (4 if top_k is None else top_k)
        assert (down_a - down_b).abs().max() > 1e-4
        assert (up_a - up_b).abs().max() > 1e-4

        randomise_up_projections(vit)
        # Same tokens, per-sample routing: batch [a, b] gives each sample its own weights ...
        both = layer.adapter(torch.cat([tokens_a, tokens_b]))
        assert torch.allclose(both[0], layer.adapter(tokens_a)[0], atol=1e-6)
        assert torch.allclose(both[1], layer.adapter(tokens_b)[0], atol=1e-6)
        # ... and the same token routed by a different context gets a different adapter output.
        probe = tokens_a[:, :1]
        with_a = layer.adapter(torch.cat([probe, tokens_a[:, 1:]], dim=1))[:, 0]
        with_b = layer.adapter(torch.cat([probe, tokens_b[:, 1:]], dim=1))[:, 0]
        assert (with_a - with_b).abs().max() > 1e-4


def test_adaroute_learns_a_toy_regression():
    vit = build("vit")
    apply_peft(vit, "adaroute", rank=4)
    vit.train()
    x = images("vit", batch=8)
    target = torch.randn(8, VIT["embed_dim"], generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam([p for p in vit.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(vit(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------------------------
# parameter report and LoRA budget
# --------------------------------------------------------------------------------------------
def test_report_counts_by_hand():
    d, hidden, depth = VIT["embed_dim"], 4 * VIT["embed_dim"], VIT["depth"]  # 48, 192, 2
    vit = build("vit")
    original = count_parameters(vit)
    r, experts, router_hidden = 4, depth, 16
    report = apply_peft(vit, "adaroute", rank=r, router_hidden=router_hidden)
    centres = experts * (d * r + r * d) + experts * (hidden * r + r * d)  # attn.proj + mlp.fc2 centres
    router = lambda d_in: d_in * router_hidden + router_hidden + router_hidden * 2 * experts + 2 * experts
    routers = depth * (router(d) + router(hidden))
    assert centres == 768 + 1920 and routers == 2 * (852 + 3156)  # 10704 in all
    assert report.adapter_params == report.trainable_params == centres + routers
    assert report.original_params == original
    assert report.total_params == original + centres + routers == count_parameters(vit)
    assert report.frozen_params == original
    assert report.adapted_layers == ("blocks.0.attn.proj", "blocks.0.mlp.fc2",
                                     "blocks.1.attn.proj", "blocks.1.mlp.fc2")
    assert report.config["num_experts"] == experts and report.target == "backbone"
    json.dumps(report.as_dict())

    lora_vit = build("vit")
    report = apply_peft(lora_vit, "lora", rank=3, target="teacher")
    assert report.trainable_params == depth * 3 * ((d + d) + (hidden + d)) == 2016
    assert report.target == "teacher" and report.config["lora_alpha"] == 3.0

    # A subset of blocks, explicit expert count.
    part = build("vit")
    report = apply_peft(part, "adaroute", blocks=[-1], rank=2, num_experts=3, router_hidden=8,
                        sublayers=("attn.qkv",))
    assert report.adapted_layers == ("blocks.1.attn.qkv",)
    assert report.trainable_params == 3 * (d * 2 + 2 * 3 * d) + (d * 8 + 8 + 8 * 6 + 6)
    assert isinstance(part.blocks[0].attn.qkv, nn.Linear) and not isinstance(part.blocks[0].attn.qkv,
                                                                            AdaRouteLinear)


def test_method_none_leaves_module_untouched():
    vit = build("vit")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    report = apply_peft(vit, "none")
    assert report.trainable_params == report.total_params == count_parameters(vit)
    assert report.adapter_params == 0 and report.adapted_layers == ()
    assert all(p.requires_grad for p in vit.parameters())
    assert set(vit.state_dict()) == set(before)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_rank_matches_adaroute_budget(family):
    adaroute = build(family)
    budget = apply_peft(adaroute, "adaroute", rank=8).trainable_params
    lora = build(family)
    per_rank = lora_params_per_rank(lora)
    rank = lora_rank_for_budget(lora, budget)
    lora_params = apply_peft(lora, "lora", rank=rank).trainable_params
    assert lora_params == rank * per_rank
    # The stated tolerance: within half a rank step of the budget, i.e. the closest rank.
    assert abs(lora_params - budget) <= per_rank / 2
    assert abs(lora_params - budget) / budget < 0.05
    # Works on the adapted model too (same layer widths).
    assert lora_rank_for_budget(adaroute, budget) == rank
    with pytest.raises(ValueError, match="adaroute_trainable_params"):
        lora_rank_for_budget(lora, 0)


# --------------------------------------------------------------------------------------------
# export: ONNX for AdaRoute, merge for LoRA
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,top_k", [("vit", None), ("vit", 2), ("eva", None)])
def test_adaroute_onnx_export_matches_pytorch(family, top_k):
    ort = pytest.importorskip("onnxruntime")
    vit = build(family)
    if family == "eva":
        # timm's fused (SDPA) path in EvaAttention does not trace with the TorchScript exporter
        # ("is_causal must be bool, not Tensor"), with or without adapters; the math path does.
        for block in vit.blocks:
            block.attn.fused_attn = False
    apply_peft(vit, "adaroute", rank=4, top_k=top_k)
    randomise_up_projections(vit)
    buffer = io.BytesIO()
    torch.onnx.export(vit, (images(family, batch=2),), buffer, dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # not the traced batch size
        x = images(family, batch=batch, seed=7)
        with torch.no_grad():
            expected = vit(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_lora_merge_gives_plain_linear_layers_with_same_output():
    vit = build("vit")
    reference_keys = set(vit.state_dict())
    apply_peft(vit, "lora", rank=4)
    randomise_up_projections(vit, std=0.1)
    x = images("vit")
    with torch.no_grad():
        adapted = vit(x)
    assert merge_lora(vit) == 4
    assert not any(isinstance(m, LoRALinear) for m in vit.modules())
    assert type(vit.blocks[0].attn.proj) is nn.Linear
    assert set(vit.state_dict()) == reference_keys  # the exported model has the original keys
    with torch.no_grad():
        merged = vit(x)
    assert (merged - adapted).abs().max().item() < 1e-5
    assert not any(p.requires_grad for p in vit.parameters())


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_into_freshly_adapted_model(family, method):
    vit = build(family, seed=0)
    frozen_keys = set(vit.state_dict())
    apply_peft(vit, method, rank=4)
    assert frozen_keys <= set(vit.state_dict())  # frozen weights keep their pretrained keys
    vit.train()
    optimizer = torch.optim.Adam([p for p in vit.parameters() if p.requires_grad], lr=1e-2)
    x = images(family)
    target = torch.randn(x.shape[0], vit.num_features)
    for _ in range(2):
        optimizer.zero_grad()
        F.mse_loss(vit(x), target).backward()
        optimizer.step()
    vit.eval()

    buffer = io.BytesIO()
    torch.save(vit.state_dict(), buffer)
    buffer.seek(0)
    restored = build(family, seed=99)  # different random init everywhere
    apply_peft(restored, method, rank=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), vit(x))
    if method == "adaroute":
        assert restored.blocks[1].attn.proj.centre is restored.peft_centres["attn_proj"]


# --------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------
def test_bad_arguments_are_named():
    vit = build("vit")
    with pytest.raises(ValueError, match="method='prefix'"):
        apply_peft(vit, "prefix")
    with pytest.raises(ValueError, match="blocks.0.attn.nope does not exist"):
        apply_peft(vit, "lora", sublayers=("attn.nope",))
    with pytest.raises(ValueError, match="blocks.0.mlp.act is a GELU"):
        apply_peft(vit, "adaroute", sublayers=("mlp.act",))
    with pytest.raises(ValueError, match="block index 5"):
        apply_peft(vit, "adaroute", blocks=[5])
    with pytest.raises(ValueError, match="top_k"):
        apply_peft(vit, "adaroute", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="no `.blocks`"):
        apply_peft(nn.Linear(3, 3), "lora")
    assert all(p.requires_grad for p in vit.parameters())  # failed calls froze nothing
    apply_peft(vit, "lora", rank=2)
    with pytest.raises(RuntimeError, match="already has adapters"):
        apply_peft(vit, "adaroute")
    adaroute = build("vit")
    apply_peft(adaroute, "adaroute", rank=2)
    with pytest.raises(ValueError, match=r"tokens shaped \(B, N, 48\)"):
        adaroute.blocks[0].attn.proj(torch.randn(4, 48))  # routing needs a token axis to pool over


# --------------------------------------------------------------------------------------------
# DeepSpeed ZeRO 0-2 (in a subprocess: DeepSpeed keeps global communication state)
# --------------------------------------------------------------------------------------------
DEEPSPEED_SCRIPT = textwrap.dedent("""
    import json, os, socket
    import torch, deepspeed
    from timm.models.vision_transformer import VisionTransformer
    from distillery.platform.engine.worker import init_deepspeed_comm
    from distillery.students.peft import apply_peft

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    init_deepspeed_comm(False)
    results = {}
    for stage in (0, 1, 2):
        torch.manual_seed(0)
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                num_classes=0)
        report = apply_peft(vit, "adaroute", rank=4)
        model = torch.nn.Sequential(vit, torch.nn.Linear(48, 4))
        frozen = {n: p.detach().clone() for n, p in vit.named_parameters() if not p.requires_grad}
        centre_before = vit.peft_centres["attn_proj"].up.detach().clone()
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                  "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
        x, y = torch.randn(4, 3, 32, 32), torch.randn(4, 4)
        losses = []
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        unchanged = all(torch.equal(p, frozen[n]) for n, p in vit.named_parameters() if n in frozen)
        results[stage] = {
            "losses": losses,
            "frozen_unchanged": unchanged,
            "centre_moved": not torch.equal(vit.peft_centres["attn_proj"].up, centre_before),
            "optimizer_numel": sum(p.numel() for p in trainable),
            "expected_numel": report.trainable_params + 48 * 4 + 4,
            "centre_keys": sum(k.endswith("attn_proj.down") for k in engine.module.state_dict()),
        }
    print("RESULT " + json.dumps(results))
""")


def test_trains_under_deepspeed_zero_stages_0_to_2(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds_peft.py"
    script.write_text(DEEPSPEED_SCRIPT)
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=repo, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    assert set(results) == {"0", "1", "2"}
    for stage, r in results.items():
        assert r["losses"][-1] < r["losses"][0], (stage, r)
        assert r["frozen_unchanged"], stage
        assert r["centre_moved"], stage
        assert r["optimizer_numel"] == r["expected_numel"], (stage, r)
        assert r["centre_keys"] == 1, stage


def test_default_sublayers_exist_in_both_families():
    for family in FAMILIES:
        block = build(family).blocks[0]
        for path in DEFAULT_SUBLAYERS:
            assert isinstance(block.get_submodule(path), nn.Linear), (family, path)
