"""10-step training parity with the official RT-DETRv4 / DEIMv2 code (issue 20, item 3).

Each fixture (``tests/fixtures/parity/training/<case>.{safetensors,json}``, written by
``tools/parity/write_training_fixtures.py`` from the official repositories at the recorded commit)
holds what 10 official training steps did to a reduced official model: the seeded batches, the
rate of every parameter group and the total loss at every step, and sampled values of the model's
and the EMA's state dict after the 10 steps. The initial weights are those of the reduced output
fixture named in the json (its sha256 checked).

Here the same weights go through ``build_student(name, weights=file)`` and train for 10 steps the
way the distillation job trains (in a subprocess: DeepSpeed keeps global state): the recipe
``configs/<size>.yaml`` through the job's config loader, with the fixture's shortened schedule
(epochs, warm-up, flat and no-augmentation epochs, EMA warm-up, matcher change epoch: the recipe's
other settings as they are); the job's optimizer and scheduler (``DistillJob._optimizer_and_scheduler``)
inside the job's DeepSpeed engine (``deepspeed_engine``: the recipe's ZeRO stage and gradient
clipping, float32 on CPU); the size's criterion (``criterion_options``, ``set_epoch`` at each epoch
start); each step as ``Trainer.step`` takes it (``engine_step``, then the EMA update). The denoising
queries draw from torch's global generator, seeded before each step exactly as the official run was.

Compared: each step's group rates (as sets: the official regex groups and ours are ordered
differently; their membership is tests/test_recipe_parity.py's) within 1e-12 relative, each step's
total loss within 1e-5 relative plus SPREAD_FACTOR x the official spread (below), and every
sampled value of every parameter and BatchNorm statistic of the model and of the EMA after the
10 steps: per official tensor, max |ours - official| /
max |official| <= 1e-5 (a relative error per tensor: the elements of one tensor share a scale, and
an element near zero must not need an absolute floor), except parameter elements whose gradient
never exceeds NOISE_GRADIENT x the largest one in our run (mathematically zero: a normalisation
bias in front of a convolution + train-mode BatchNorm, the key third of an attention in_proj_bias;
Adam turns their float-noise gradients into noise-sized steps, in the official code too; at most
3 % of the samples) and BatchNorm statistics, which see those biases' noise upstream (1e-4).

The official spread: in float32 the official code does not reproduce itself over 10 steps when only
its float reduction order changes (RT-DETRv4-S re-run with 1 thread instead of 2: the step-10 loss
2.9e-2 apart, most tensors 1e-3 apart; DEIMv2-Pico 2.3e-3 at step 7): Adam turns float-noise
gradients (the HGNetv2 LAB biases in front of a convolution + BatchNorm) into full-size steps of
either sign, and a flipped top-k query selection or matching then changes every gradient. The fixture
holds, per sampled value and per step's loss, the largest distance of the official re-runs in other
float orders from the official run; a loss or a tensor's error may exceed its tolerance by at most
SPREAD_FACTOR x that spread (per tensor, relative to the same scale). Through the warm-up the re-runs
agree within the tolerance (checked), so the first steps are compared at 1e-5 whatever the spread
later. The official (key, position) of each sample
is found in our layout by converting an official-layout state dict of element ids with the same
converter as the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.students.official import convert_official_state_dict

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests" / "fixtures" / "parity"
TRAINING = PARITY / "training"
# Fixtures not compared yet, with the reason (README, parity section); none at present.
OPEN: dict[str, str] = {}
CASES = sorted(p.stem for p in TRAINING.glob("*.json") if p.stem not in OPEN)
TOLERANCE = 1e-5
BUFFER_TOLERANCE = 1e-4  # BatchNorm statistics (module docstring)
NOISE_GRADIENT = 1e-8  # an element whose gradient never exceeds this x the largest one only sees float noise
# Ours may differ from the official run by this many times the official code's own spread (its
# re-runs in another float reduction order, recorded in the fixture) beyond the tolerances above.
SPREAD_FACTOR = 4
COMMITS = {"RT-DETRs/RT-DETRv4": "df4412261c6162f62aa4fb84e90b2df3c1b5f223",
           "Intellindust-AI-Lab/DEIMv2": "0fff8d4dcdc272e6cf2d84be31399db471357941"}
# Official state-dict entries our model recomputes instead of storing (students/official.py).
RECOMPUTED = ("anchors", "valid_mask", ".up", ".reg_scale", "num_points_scale", "rope_embed.periods")

OURS = textwrap.dedent('''
    """Our side: 10 steps as the distillation job takes them, for each case given; writes
    <out>/<case>.safetensors (our model's and EMA's state dicts) and <out>/<case>.json (rates, losses)."""
    import json, os, socket, sys
    from pathlib import Path
    from types import SimpleNamespace

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    import torch
    from safetensors.torch import load_file, save_file

    from distillery.platform.config.distill import DistillConfig
    from distillery.platform.config.sections import load_config
    from distillery.platform.distill.job import DistillJob
    from distillery.platform.engine.trainer import engine_step
    from distillery.platform.engine.worker import deepspeed_engine, init_deepspeed_comm
    from distillery.students import build_criterion, build_student
    from distillery.students.ema import ModelEMA

    torch.set_num_threads(2)
    init_deepspeed_comm(False, auto_mpi_discovery=False)  # the engine's start: no C++ kernel built on CPU
    root, training, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    for case in sys.argv[4:]:
        meta = json.loads((training / f"{case}.json").read_text())
        tensors = load_file(str(training / f"{case}.safetensors"))
        s = meta["schedule"]
        overrides = [f"train.epochs={s['epochs']}", f"optim.warmup_steps={s['warmup_iter']}",
                     f"optim.flat_epochs={s['flat_epoch']}", f"optim.no_aug_epochs={s['no_aug_epoch']}",
                     f"optim.ema_warmups={s['ema_warmups']}", f"train.batch_size={tensors['images'].shape[1]}",
                     "train.num_workers=1"]
        if s["matcher_change_epoch"] is not None:
            overrides.append(f"criterion.matcher_change_epoch={s['matcher_change_epoch']}")
        cfg = load_config(DistillConfig, root / "configs" / f"{meta['student']}.yaml", overrides)
        model = build_student(meta["student"], weights=out / f"{case}.initial.pth", **meta["student_overrides"])
        run = SimpleNamespace(steps_per_epoch=meta["iters_per_epoch"])
        engine = deepspeed_engine(model, cfg, False,
                                  lambda m: DistillJob._optimizer_and_scheduler(SimpleNamespace(cfg=cfg, run=run), m))
        ema = ModelEMA(engine.module, decay=cfg.optim.ema_decay, warmups=cfg.optim.ema_warmups)
        criterion = build_criterion(num_classes=meta["student_overrides"]["num_classes"], **cfg.criterion_options())
        engine.train()
        lrs, losses = [], []
        # Each element's largest gradient over the steps (before clipping): which ones only ever see
        # float noise (see the module docstring).
        grad_max = {}

        def note(name, grad):  # returns None: the gradient itself is left as it is
            torch.maximum(grad_max[name], grad.detach().abs(), out=grad_max[name])

        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                grad_max[name] = torch.zeros_like(p)
                p.register_hook(lambda g, name=name: note(name, g))
        for epoch in range(cfg.train.epochs):
            criterion.set_epoch(epoch)
            for i in range(meta["iters_per_epoch"]):
                step = epoch * meta["iters_per_epoch"] + i
                targets = [{"labels": tensors[f"targets/{step}/{j}/labels"],
                            "boxes": tensors[f"targets/{step}/{j}/boxes"]} for j in range(tensors["images"].shape[1])]
                batch = {"images": tensors["images"][step].float() / 255.0, "targets": targets}
                lrs.append([float(lr) for lr in engine.get_lr()])
                torch.manual_seed(meta["step_seed_base"] + step)
                result = engine_step(engine, criterion, batch)  # Trainer.step: the step, then the EMA
                ema.update(engine.module)
                losses.append(float(result.parts["loss_detection"]))
        state = {f"model/{k}": v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()
                 if v.is_floating_point()}
        state.update({f"ema/{k}": v.detach().clone().contiguous() for k, v in ema.module.state_dict().items()
                      if v.is_floating_point()})
        state.update({f"grad/{k}": v.contiguous() for k, v in grad_max.items()})
        save_file(state, str(out / f"{case}.safetensors"))
        (out / f"{case}.json").write_text(json.dumps({"lrs": lrs, "losses": losses,
                                                      "zero_stage": cfg.deepspeed.zero_stage,
                                                      "clip_max_norm": cfg.optim.clip_max_norm,
                                                      "lr_gamma": cfg.optim.min_lr_ratio,
                                                      "ema_decay": cfg.optim.ema_decay}))
''')


def load_case(case: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(meta, fixture tensors, the official initial weights as float32)."""
    meta = json.loads((TRAINING / f"{case}.json").read_text())
    source = PARITY / meta["initial_weights"]["file"]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert digest == meta["initial_weights"]["sha256"], (
        f"{source} changed since {case} was written: rerun tools/parity/write_training_fixtures.py")
    initial = {k[len("weights/"):]: (v.float() if v.is_floating_point() else v)
               for k, v in load_file(str(source)).items() if k.startswith("weights/")}
    return meta, load_file(str(TRAINING / f"{case}.safetensors")), initial


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """case -> (our state after 10 steps, our rates and losses): one subprocess for every case."""
    out = tmp_path_factory.mktemp("training_parity")
    for case in CASES:
        meta, _, initial = load_case(case)
        torch.save({"model": initial}, out / f"{case}.initial.pth")  # as the official solver saves a model
    script = out / "ours.py"
    script.write_text(OURS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(TRAINING), str(out), *CASES],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {case: (load_file(str(out / f"{case}.safetensors")), json.loads((out / f"{case}.json").read_text()))
            for case in CASES}


def test_fixtures_record_the_official_commit():
    assert "deimv2_s_train" in CASES and all((TRAINING / f"{case}.json").is_file() for case in OPEN)
    for case in CASES + sorted(OPEN):
        meta, tensors, _ = load_case(case)
        assert COMMITS[meta["official_repo"]] == meta["official_commit"]
        assert len(meta["losses"]) == len(meta["group_lrs"]) == meta["steps"] == tensors["images"].shape[0] == 10
        assert tensors["sample_index"].numel() == tensors["final"].numel() == sum(n for _, n, _ in meta["sampled"])
        assert tensors["spread/final"].shape == tensors["final"].shape and len(meta["loss_spread"]) == 10
        assert len(meta["alternative_float_orders"]) >= 2
        # The spread only widens the comparison where the official code disagrees with itself: through
        # the warm-up (the first steps, before the full rate) its re-runs agree within the tolerance.
        warmup = meta["schedule"]["warmup_iter"]
        assert all(spread <= TOLERANCE * abs(loss) for spread, loss in
                   zip(meta["loss_spread"][:warmup + 1], meta["losses"][:warmup + 1])), meta["loss_spread"]


def sampled_pairs(meta: dict, tensors: dict, initial: dict, ours: dict, prefix: str, official: str
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Per official tensor: (official values, ours, our largest gradient, the official re-runs'
    spread) at its sampled positions (the gradient None for buffers). Official tensors our model
    recomputes are left out."""
    offsets, ids, total = {}, {}, 0
    for key, value in initial.items():
        if value.is_floating_point():
            offsets[key] = total
            ids[key] = torch.arange(total + 1, total + 1 + value.numel(), dtype=torch.float64).reshape(value.shape)
            total += value.numel()
    located = convert_official_state_dict(meta["student"], ids)
    names = sorted(located)
    all_ids = torch.cat([located[k].flatten() for k in names])
    order = torch.argsort(all_ids)
    all_ids = all_ids[order]
    all_ours = torch.cat([ours[f"{prefix}/{k}"].double().flatten() for k in names])[order]
    nan = lambda k: torch.full((located[k].numel(),), float("nan"), dtype=torch.float64)  # noqa: E731
    all_grads = torch.cat([ours[f"grad/{k}"].double().flatten() if f"grad/{k}" in ours else nan(k)
                           for k in names])[order]
    out, skipped, start = {}, [], 0
    index, values, spread = tensors["sample_index"].long(), tensors[official].double(), tensors[f"spread/{official}"]
    for key, count, _shape in meta["sampled"]:
        positions, want, spreads = index[start:start + count], values[start:start + count], spread[start:start + count]
        start += count
        wanted = offsets[key] + 1 + positions.double()
        where = torch.searchsorted(all_ids, wanted).clamp(max=len(all_ids) - 1)
        if not torch.equal(all_ids[where], wanted):
            skipped.append(key)
            continue
        grads = all_grads[where]
        out[key] = (want, all_ours[where], None if grads.isnan().all() else grads, spreads.double())
    unexpected = [k for k in skipped if not k.endswith(RECOMPUTED)]
    assert not unexpected, f"official tensors with no place in our model: {unexpected}"
    return out


@pytest.mark.filterwarnings("ignore:DEIMv2 backbone")
@pytest.mark.parametrize("case", CASES)
def test_ten_training_steps_match_the_official_code(case, ours):
    meta, tensors, initial = load_case(case)
    state, log = ours[case]
    # The recipe's settings the fixture kept as they are.
    s = meta["schedule"]
    assert (log["clip_max_norm"], log["lr_gamma"], log["ema_decay"]) == (
        s["clip_max_norm"], s["lr_gamma"], s["ema_decay"])
    for step, (want, got) in enumerate(zip(meta["group_lrs"], log["lrs"])):
        assert sorted(set(got)) == pytest.approx(sorted(set(want)), rel=1e-12, abs=0), f"step {step}: rates"
    for step, (want, got, spread) in enumerate(zip(meta["losses"], log["losses"], meta["loss_spread"])):
        allowed = TOLERANCE * abs(want) + SPREAD_FACTOR * spread
        assert abs(got - want) <= allowed, f"step {step}: loss {got} vs official {want} (allowed {allowed:.3g})"
    largest_grad = max(float(v.max()) for k, v in state.items() if k.startswith("grad/"))
    for prefix, official in (("model", "final"), ("ema", "ema")):
        pairs = sampled_pairs(meta, tensors, initial, state, prefix, official)
        assert len(pairs) >= 0.95 * len(meta["sampled"])
        errors, noise = {}, 0
        for key, (want, got, grads, spread) in pairs.items():
            keep = torch.ones_like(want, dtype=torch.bool)
            if grads is not None:  # a parameter: leave out the elements whose gradient is only float noise
                keep = grads > NOISE_GRADIENT * largest_grad
                noise += int((~keep).sum())
            if keep.any():
                scale = want.abs().max().clamp_min(1e-30)
                errors[key] = (float((got - want)[keep].abs().max() / scale), float(spread[keep].max() / scale),
                               grads is None)
        assert noise <= 0.03 * sum(len(v[0]) for v in pairs.values()), f"{noise} noise-gradient elements"
        for buffers, tolerance in ((False, TOLERANCE), (True, BUFFER_TOLERANCE)):
            over = sorted(((e - SPREAD_FACTOR * sp, e, sp, k) for k, (e, sp, buffer) in errors.items()
                           if buffer == buffers), reverse=True)[:5]
            assert over[0][0] <= tolerance, (
                f"{case} {prefix} {'BatchNorm statistics' if buffers else 'parameters'} after 10 steps, worst "
                f"tensors (error - {SPREAD_FACTOR} x official spread, error, spread, name): {over}")
