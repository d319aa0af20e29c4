"""EMA (ramp, convergence, wrappers, state) and the optimizer groups / flat-cosine schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from distillery.students.ema import ModelEMA, ema_decay, unwrap_model
from distillery.students.optim import (
    OPTIM_DEFAULTS,
    FlatCosineSchedule,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
)


class Wrapper(nn.Module):
    """Stands for DDP / a DeepSpeed engine: the model as ``.module``, nothing of its own."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


# -------------------------------------------------------------------------------------- EMA
def test_decay_ramp_formula():
    assert ema_decay(1, 0.9999, 1000) == pytest.approx(0.9999 * (1 - math.exp(-1 / 1000)))
    assert ema_decay(1000, 0.9999, 1000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema_decay(10**6, 0.9999, 1000) == pytest.approx(0.9999)
    assert ema_decay(5, 0.99, 0) == 0.99
    ema = ModelEMA(Net(), decay=0.999, warmups=10)
    assert ema.current_decay == 0.0
    ema.update(Net())
    assert ema.current_decay == pytest.approx(0.999 * (1 - math.exp(-0.1)))


def test_first_update_follows_the_model_and_exact_average():
    torch.manual_seed(0)
    model = Net()
    ema = ModelEMA(model, decay=0.9, warmups=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2))
    want = d * before["lin.weight"] + (1 - d) * model.lin.weight
    assert torch.allclose(ema.module.lin.weight, want)


def test_ema_converges_to_a_fixed_model_and_tracks_buffers():
    torch.manual_seed(0)
    model = Net()
    ema = ModelEMA(model, decay=0.9, warmups=5)
    with torch.no_grad():
        model.lin.weight.fill_(2.0)
        model.bn.running_mean.fill_(3.0)
    model.bn.num_batches_tracked.fill_(7)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.module.lin.weight, torch.full((2, 3), 2.0), atol=1e-6)
    assert torch.allclose(ema.module.bn.running_mean, torch.full((2,), 3.0), atol=1e-6)
    assert ema.module.bn.num_batches_tracked.item() == 7  # integer buffers are copied
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert model.lin.weight.requires_grad  # the live model is untouched


def test_wrapped_models_are_unwrapped():
    model = Net()
    wrapped = Wrapper(Wrapper(model))
    assert unwrap_model(wrapped) is model
    ema = ModelEMA(wrapped, decay=0.5, warmups=0)
    assert set(ema.module.state_dict()) == set(model.state_dict())  # no "module." prefix
    with torch.no_grad():
        model.lin.bias.fill_(4.0)
    ema.update(wrapped)
    ema.update(model)  # wrapped or not, the same keys
    assert ema.updates == 2

    class HasModuleChild(nn.Module):  # a real model with a child named "module" is not a wrapper
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    real = HasModuleChild()
    assert unwrap_model(real) is real


def test_start_skips_updates():
    model = Net()
    ema = ModelEMA(model, decay=0.5, warmups=0, start=3)
    for _ in range(5):
        ema.update(model)
    assert ema.updates == 2 and ema.skipped == 3


def test_ema_state_round_trip():
    torch.manual_seed(0)
    model = Net()
    ema = ModelEMA(model, decay=0.99, warmups=10)
    for step in range(5):
        with torch.no_grad():
            model.lin.weight.add_(0.1 * step)
        ema.update(model)
    ema.decay = 0.9998  # the refresh at stop_epoch changes it; it must survive
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = ModelEMA(Net(), decay=0.99, warmups=10)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.updates == 5 and restored.decay == 0.9998
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, restored.module.state_dict()[k]), k
    ema.update(model)
    restored.update(model)
    assert torch.equal(ema.module.lin.weight, restored.module.lin.weight)


# ------------------------------------------------------------------------------- param groups
class ConvBN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)


class Affine(nn.Module):  # like HGNetv2's learnable affine block: not a norm
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))


class CustomNorm(nn.Module):  # a norm class of its own, recognised by its attribute name
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = ConvBN(4)
        self.backbone.lab = Affine()
        self.encoder = nn.Module()
        self.encoder.aifi = nn.Module()
        self.encoder.aifi.linear1 = nn.Linear(4, 4)
        self.encoder.aifi.norm1 = nn.LayerNorm(4)
        self.encoder.fpn = ConvBN(4)
        self.decoder = nn.Module()
        self.decoder.proj = nn.Linear(4, 4)
        self.decoder.layer_norm = CustomNorm(4)
        self.decoder.frozen = nn.Linear(4, 4)
        self.decoder.frozen.requires_grad_(False)
        self.dsi = nn.Linear(4, 8)


def membership(groups):
    return {g["name"]: set(g["param_names"]) for g in groups}, {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}


def test_param_groups_all_norms_rule_rtdetrv4_s_m():
    names, settings = membership(build_param_groups(Toy(), 4e-4, 2e-4, 1e-4, norm_rule="all"))
    assert names["backbone"] == {"backbone.stem.conv.weight", "backbone.lab.scale", "backbone.lab.bias"}
    assert names["no_decay"] == {
        "backbone.stem.bn.weight", "backbone.stem.bn.bias",
        "encoder.aifi.norm1.weight", "encoder.aifi.norm1.bias",
        "encoder.fpn.bn.weight", "encoder.fpn.bn.bias",
        "decoder.layer_norm.weight",
    }
    assert names["default"] == {
        "encoder.aifi.linear1.weight", "encoder.aifi.linear1.bias", "encoder.fpn.conv.weight",
        "decoder.proj.weight", "decoder.proj.bias", "dsi.weight", "dsi.bias",
    }
    assert settings == {"backbone": (2e-4, 1e-4), "no_decay": (4e-4, 0.0), "default": (4e-4, 1e-4)}
    all_names = set().union(*names.values())
    assert not any("frozen" in n for n in all_names)
    assert sum(len(v) for v in names.values()) == len(all_names)  # no parameter twice


def test_param_groups_head_norms_rule_rtdetrv4_l_x_and_bias_option():
    names, _ = membership(build_param_groups(Toy(), 5e-4, 2.5e-5, 1.25e-4, norm_rule="head"))
    # The backbone's BatchNorms stay with the backbone (backbone lr, with decay), as the L/X regex.
    assert {"backbone.stem.bn.weight", "backbone.stem.bn.bias"} <= names["backbone"]
    assert names["no_decay"] == {
        "encoder.aifi.norm1.weight", "encoder.aifi.norm1.bias",
        "encoder.fpn.bn.weight", "encoder.fpn.bn.bias", "decoder.layer_norm.weight",
    }
    names, _ = membership(build_param_groups(Toy(), 4e-4, 2e-4, 1e-4, decay_biases=False))
    assert {"encoder.aifi.linear1.bias", "decoder.proj.bias"} <= names["no_decay"]
    assert "dsi.bias" in names["default"] and "backbone.lab.bias" in names["backbone"]


def test_param_groups_ignore_wrapper_prefix_and_reject_bad_input():
    names, _ = membership(build_param_groups(Wrapper(Toy()), 4e-4, 2e-4, 1e-4))
    assert "backbone.stem.conv.weight" in names["backbone"]
    with pytest.raises(ValueError, match="norm_rule"):
        build_param_groups(Toy(), 4e-4, 2e-4, 1e-4, norm_rule="bn")
    with pytest.raises(ValueError, match="backbone_lr"):
        build_param_groups(Toy(), 4e-4, -1.0, 1e-4)


def test_build_optimizer_from_a_recipe():
    recipe = OPTIM_DEFAULTS["rtdetrv4_s"]
    opt = build_optimizer(Toy(), **recipe)
    assert isinstance(opt, torch.optim.AdamW)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone"]["lr"] == 2e-4 and by_name["backbone"]["weight_decay"] == 1e-4
    assert by_name["no_decay"]["lr"] == 4e-4 and by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["default"]["betas"] == (0.9, 0.999)
    assert OPTIM_DEFAULTS["rtdetrv4_x"]["backbone_lr"] == 5e-6
    assert OPTIM_DEFAULTS["rtdetrv4_l"]["norm_rule"] == "head"


# ----------------------------------------------------------------------------------- schedule
# Small numbers: 10 steps/epoch, 20 epochs, flat until epoch 8, 4 no-aug epochs, 30 warm-up steps.
SPE, EPOCHS, FLAT, NO_AUG, WARM = 10, 20, 8, 4, 30
TOTAL, FLAT_STEPS, NO_AUG_STEPS = SPE * EPOCHS, SPE * FLAT, SPE * NO_AUG


def f(step, **kw):
    return FlatCosineSchedule(TOTAL, WARM, FLAT_STEPS, NO_AUG_STEPS, 0.5, **kw)(step)


def test_lr_factor_at_key_steps():
    assert f(0) == 0.0
    assert f(15) == pytest.approx(0.25)  # quadratic warm-up, as the reference
    assert f(15, warmup="linear") == pytest.approx(0.5)
    assert f(WARM) == 1.0
    assert f(WARM + 1) == 1.0 and f(FLAT_STEPS) == 1.0
    mid = (FLAT_STEPS + TOTAL - NO_AUG_STEPS) // 2  # 120: half-way down the cosine
    assert f(mid) == pytest.approx(0.75)
    assert f(FLAT_STEPS + 1) < 1.0 and f(FLAT_STEPS + 1) > 0.99
    assert f(TOTAL - NO_AUG_STEPS - 1) == pytest.approx(0.5, abs=1e-3)
    assert f(TOTAL - NO_AUG_STEPS) == 0.5 and f(TOTAL + 50) == 0.5
    values = [f(s) for s in range(FLAT_STEPS, TOTAL)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after the flat phase
    # No warm-up at all: flat from the first step.
    assert FlatCosineSchedule(TOTAL, 0, FLAT_STEPS, NO_AUG_STEPS)(0) == 1.0


def test_lambda_lr_scheduler_sets_group_rates():
    opt = build_optimizer(Toy(), lr=4e-4, backbone_lr=2e-4, weight_decay=1e-4)
    sched = build_lr_scheduler(opt, SPE, EPOCHS, FLAT, NO_AUG, warmup_steps=WARM, min_ratio=0.5)
    lrs = {0: None, 15: None, 50: None, 120: None, 199: None}
    for step in range(TOTAL):
        if step in lrs:
            lrs[step] = {g["name"]: g["lr"] for g in opt.param_groups}
        opt.step()
        sched.step()
    assert lrs[0] == {"backbone": 0.0, "no_decay": 0.0, "default": 0.0}
    assert lrs[15]["backbone"] == pytest.approx(2e-4 * 0.25) and lrs[15]["default"] == pytest.approx(1e-4)
    assert lrs[50] == pytest.approx({"backbone": 2e-4, "no_decay": 4e-4, "default": 4e-4})
    assert lrs[120]["default"] == pytest.approx(3e-4) and lrs[120]["backbone"] == pytest.approx(1.5e-4)
    assert lrs[199] == pytest.approx({"backbone": 1e-4, "no_decay": 2e-4, "default": 2e-4})


def test_scheduler_state_round_trip_and_validation():
    opt = build_optimizer(Toy(), lr=4e-4, backbone_lr=2e-4, weight_decay=1e-4)
    sched = build_lr_scheduler(opt, SPE, EPOCHS, FLAT, NO_AUG, warmup_steps=WARM)
    for _ in range(95):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    opt2 = build_optimizer(Toy(), lr=4e-4, backbone_lr=2e-4, weight_decay=1e-4)
    sched2 = build_lr_scheduler(opt2, SPE, EPOCHS, FLAT, NO_AUG, warmup_steps=WARM)
    sched2.load_state_dict(torch.load(buffer, weights_only=True))
    assert sched2.last_epoch == 95
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    with pytest.raises(ValueError, match="no_aug_steps"):
        FlatCosineSchedule(total_steps=10, warmup_steps=0, flat_steps=5, no_aug_steps=11)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_lr_scheduler(opt, 0, EPOCHS, FLAT, NO_AUG)
