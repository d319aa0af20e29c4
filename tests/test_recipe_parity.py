"""Recipe and learning-rate parity with the official RT-DETRv4 / DEIMv2 configs (issue 20, item 2).

The fixtures under tests/fixtures/parity/recipes/ are the official configs resolved by the official
YAML loader and the official scheduler's rates (tools/parity/write_recipe_fixtures.py). Here each
official field is mapped onto what our recipe ``configs/<size>.yaml`` resolves to through the job's
config loader (``load_config(DistillConfig, ...)``, as ``jobs/distill.py``), the size's criterion
(``criterion_options`` + ``build_criterion``), GAM (``resolve_gam``) and student spec, and compared
field by field. A difference fails unless it is in :data:`DELIBERATE` with its reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.platform.config.distill import DistillConfig
from distillery.platform.config.sections import load_config
from distillery.students import STUDENT_SPECS, build_criterion, build_student
from distillery.students.deimv2 import DEIMV2_SPECS
from distillery.students.official import convert_official_state_dict
from distillery.students.optim import build_lr_scheduler, build_optimizer, build_param_groups
from distillery.teachers import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "tests" / "fixtures" / "parity" / "recipes"
PARITY = ROOT / "tests" / "fixtures" / "parity"
SIZES = ["rtdetrv4_s", "rtdetrv4_m", "rtdetrv4_l", "rtdetrv4_x", "deimv2_atto", "deimv2_femto", "deimv2_pico",
         "deimv2_n", "deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x"]
COMMITS = {"RT-DETRs/RT-DETRv4": "df4412261c6162f62aa4fb84e90b2df3c1b5f223",
           "Intellindust-AI-Lab/DEIMv2": "0fff8d4dcdc272e6cf2d84be31399db471357941"}

# (size or "*", field) -> why ours differs on purpose (or cannot follow yet). Every entry must
# still be a difference: a stale entry fails too.
DELIBERATE: dict[tuple[str, str], str] = {
    **{(s, "ema_restart_decay"): (
        "the official solver, at collate stop_epoch, reloads its best stage-1 checkpoint and restarts the EMA "
        "(and lowers its decay by 1e-4 on each later epoch that is not a new best); ours keeps one EMA through "
        "the run and never reloads a checkpoint mid-run") for s in SIZES},
}

# size -> (reason, the official parameter names allowed to differ): parameter-group differences.
_BY_INDEX = ("the official regexes see a normalisation layer only by its name; these BatchNorms are named by "
             "index (nn.Sequential(conv, bn)), so their weights keep weight decay there; ours finds norms by "
             "module type and gives them none")
PARAM_GROUP_DELIBERATE: dict[str, tuple[str, str]] = {
    **{s: (_BY_INDEX, r"encoder\.down_sample[12]\.2\.weight") for s in ("deimv2_femto", "deimv2_pico", "deimv2_n")},
    "deimv2_atto": (_BY_INDEX + " (Atto decays biases, so their biases too)", r"encoder\.down_sample[12]\.2\.(weight|bias)"),
    **{s: (_BY_INDEX + "; and the STA fusion BatchNorms (official backbone.norms.*: neither '.dinov3' nor "
              "sta/encoder/decoder in the name) fall to the official rest group, with weight decay",
           r"backbone\.sta\.\w+\.\d+\.weight|backbone\.norms\.\d+\.(weight|bias)")
       for s in ("deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x")},
}

# Fields compared by their own test below, not by the field-by-field one.
OWN_TEST = {"param_groups": "test_param_groups_match_per_parameter"}

# The official code's defaults for fields a config leaves out (absent -> null in the fixture).
OFFICIAL_DEFAULTS = {
    "flip_prob": 0.5,  # torchvision RandomHorizontalFlip(p=0.5)
    "copyblend_prob": 0.0,  # BatchImageCollateFunction(copyblend_prob=0.0)
    "use_uni_set": True,  # RTv4Criterion / DEIMCriterion(use_uni_set=True)
    "change_matcher": False,  # HungarianMatcher(change_matcher=False)
}
LOSS_TERMS = {"mal": ["loss_mal"], "boxes": ["loss_bbox", "loss_giou"], "local": ["loss_fgl", "loss_ddf"],
              "distill": ["loss_distill"]}


def fixture(size: str) -> dict:
    return json.loads((RECIPES / f"{size}.json").read_text())


def our_config(size: str) -> DistillConfig:
    return load_config(DistillConfig, ROOT / "configs" / f"{size}.yaml")


def _spec(name: str):
    return DEIMV2_SPECS[name] if name in DEIMV2_SPECS else STUDENT_SPECS[name]


def moot(field: str, official: dict) -> bool:
    """Fields that the official code ignores given the others (e.g. the window of a probability-0 op)."""
    if field == "mixup_epochs":
        return not official["mixup_prob"]
    if field == "copyblend_epochs":
        return not official["copyblend_prob"]
    if field in ("multiscale_stop_epoch", "multiscale_base_size"):
        return official["multiscale_base_size_repeat"] is None
    if field in ("iou_order_alpha", "matcher_change_epoch"):
        return not official["change_matcher"]
    return False


def ours(size: str) -> dict:
    """Our recipe's values, in the official fields' units."""
    from distillery.platform.distill.driver import resolve_gam  # the job's GAM resolution

    cfg = our_config(size)
    spec = _spec(cfg.student.name)
    overrides = cfg.student.overrides
    crit_options = cfg.criterion_options()
    criterion = build_criterion(num_classes=80, **crit_options)
    matcher = criterion.matcher
    aug = cfg.augment
    distill = cfg.teacher_mode != "none"
    losses = ["mal", "boxes"] + (["local"] if criterion.local_losses else []) + (["distill"] if distill else [])
    gam = resolve_gam(cfg)
    weights = {k: criterion.weight_dict[k] for loss in losses if loss != "distill" for k in LOSS_TERMS[loss]}
    if distill:
        weights["loss_distill"] = gam["lambda0"]
    tiny = torch.nn.Linear(2, 2)
    out = {
        "epochs": cfg.train.epochs,
        "total_batch_size": cfg.train.batch_size * cfg.train.num_workers,
        "optimizer": type(build_optimizer(tiny, lr=cfg.optim.lr, backbone_lr=cfg.optim.backbone_lr,
                                          weight_decay=cfg.optim.weight_decay)).__name__,
        "lr": cfg.optim.lr,
        "betas": list(cfg.optim.betas),
        "weight_decay": cfg.optim.weight_decay,
        "clip_max_norm": cfg.optim.clip_max_norm,
        "lr_scheduler": "flatcosine",  # build_lr_scheduler's FlatCosineSchedule, checked by the lr tests
        "lr_gamma": cfg.optim.min_lr_ratio,
        "warmup_iter": cfg.optim.warmup_steps,
        "flat_epoch": cfg.optim.flat_epochs,
        "no_aug_epoch": cfg.optim.no_aug_epochs,
        "input_size": [cfg.student.input_size] * 2,
        "policy_epochs": list(aug.policy_epochs),
        # the ops AugmentConfig.policy_epochs switches (distillery/data/augment.py)
        "policy_ops": ["Mosaic", "RandomPhotometricDistort", "RandomZoomOut", "RandomIoUCrop"],
        "mosaic_prob": aug.mosaic_prob,
        "photometric_prob": aug.photometric_prob,
        "iou_crop_prob": aug.iou_crop_prob,
        "flip_prob": aug.flip_prob,
        "normalize": bool(getattr(spec, "normalize_input", False)),  # inside the model, ImageNet mean/std
        "mixup_prob": aug.mixup_prob,
        "mixup_epochs": list(aug.mixup_epochs),
        "copyblend_prob": aug.copyblend_prob,
        "copyblend_epochs": list(aug.copyblend_epochs),
        "multiscale_base_size": cfg.student.input_size,
        "multiscale_base_size_repeat": aug.multiscale_repeat if aug.multiscale else None,
        "multiscale_stop_epoch": aug.multiscale_stop_epoch,
        "ema_restart_decay": None,  # see DELIBERATE
        "use_ema": True,  # the job always keeps a ModelEMA
        "ema_decay": cfg.optim.ema_decay,
        "ema_warmups": cfg.optim.ema_warmups,
        "num_queries": overrides.get("num_queries", spec.num_queries),
        "num_denoising": overrides.get("num_denoising", spec.num_denoising),
        "losses": losses,
        "loss_weights": weights,
        "mal_gamma": criterion.mal_gamma,
        "use_uni_set": criterion.use_union_set,
        "matcher_weights": {"cost_class": matcher.cost_class, "cost_bbox": matcher.cost_bbox,
                            "cost_giou": matcher.cost_giou},
        "matcher_alpha": matcher.alpha,
        "matcher_gamma": matcher.gamma,
        "change_matcher": matcher.change_epoch is not None,
        "iou_order_alpha": matcher.iou_order_alpha,
        "matcher_change_epoch": matcher.change_epoch,
    }
    if distill:
        teacher = cfg.teacher
        patch = re.search(r"patch(\d+)", teacher.model_name)
        out["teacher"] = {"type": "DINOv3TeacherModel" if "dinov3" in teacher.model_name else teacher.model_name,
                          "weights": Path(teacher.weights).name if teacher.weights else None,
                          "patch_size": int(patch.group(1)) if patch else None,
                          "mean": [float(v) for v in IMAGENET_MEAN], "std": [float(v) for v in IMAGENET_STD],
                          "input_size": [teacher.input_size] * 2}
        out["distill_weight"] = gam["lambda0"]
        # official rho / delta are percentages (students/gam.py)
        out["distill_adaptive_params"] = {"enabled": gam["enabled"], "rho": gam["rho"] * 100,
                                          "delta": gam["delta"] * 100, "default_weight": gam["default_weight"]}
        out["distill_teacher_dim"] = {"vit_base_patch16_dinov3": 768}.get(teacher.model_name)
    return out


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_fixtures_record_the_official_commit_for_every_size():
    for size in SIZES:
        data = fixture(size)
        assert data["size"] == size
        assert COMMITS[data["official_repo"]] == data["official_commit"], size
        assert (ROOT / "configs" / f"{size}.yaml").is_file(), f"no recipe configs/{size}.yaml"


@pytest.mark.parametrize("size", SIZES)
def test_recipe_fields_match_the_official_config(size):
    official = fixture(size)["fields"]
    mine = ours(size)
    unmapped = sorted(set(official) - set(mine) - set(OWN_TEST))
    assert not unmapped, f"{size}: official fields with no mapping onto ours: {unmapped}"
    differ, stale = [], []
    for field, value in official.items():
        if field in OWN_TEST or moot(field, official):
            continue
        if value is None:
            value = OFFICIAL_DEFAULTS.get(field)
        if field == "loss_weights":  # the official weight_dict also lists terms its losses do not compute
            value = {k: w for k, w in value.items() if any(k in LOSS_TERMS[loss] for loss in official["losses"])}
        deliberate = DELIBERATE.get((size, field)) or DELIBERATE.get(("*", field))
        if same(value, mine[field]):
            if deliberate:
                stale.append(field)
        elif not deliberate:
            differ.append(f"{field}: official {value!r}, ours {mine[field]!r}")
    assert not differ, f"configs/{size}.yaml differs from the official recipe:\n  " + "\n  ".join(differ)
    assert not stale, f"{size}: listed as deliberate differences but equal now: {stale}"


# ------------------------------------------------------------------------------ parameter groups
# The official parameter names come from the reduced parity fixtures of the same family (same
# naming as the full sizes); ours from our student built as tests/test_parity_official.py does.
GROUP_CASES = {"rtdetrv4": "rtdetrv4_s_reduced", "deimv2_vit": "deimv2_s_reduced", "deimv2_hgnet": "deimv2_pico_reduced"}


def _family(size: str) -> str:
    if size.startswith("rtdetrv4"):
        return "rtdetrv4"
    return "deimv2_vit" if size in ("deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x") else "deimv2_hgnet"


def official_group(groups: list[dict], name: str) -> tuple[float, float]:
    """(lr, weight_decay) of ``name`` as the official ``get_optim_params`` assigns it: the group
    whose pattern ``re.findall`` finds in the name, else the rest."""
    hits = [g for g in groups if g["params"] is not None and re.findall(g["params"], name)]
    assert len(hits) <= 1, f"{name}: in {len(hits)} official groups (the official optimizer would refuse it)"
    group = hits[0] if hits else groups[-1]
    return group["lr"], group["weight_decay"]


@pytest.fixture(scope="module")
def family_models():
    """family -> (our reduced student, {our parameter name: official parameter name})."""
    out = {}
    for family, case in GROUP_CASES.items():
        meta = json.loads((PARITY / f"{case}.json").read_text())
        tensors = load_file(str(PARITY / f"{case}.safetensors"))
        official = {k[len("weights/"):]: v.float() for k, v in tensors.items() if k.startswith("weights/")}
        converted = convert_official_state_dict(meta["student"], official)
        by_storage = {v.untyped_storage().data_ptr(): k for k, v in official.items()}
        model = build_student(meta["student"], **meta["student_overrides"])
        names = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                names[name] = by_storage[converted[name].untyped_storage().data_ptr()]
        out[family] = (model, names)
    return out


@pytest.mark.filterwarnings("ignore:DEIMv2 backbone")
@pytest.mark.parametrize("size", SIZES)
def test_param_groups_match_per_parameter(size, family_models):
    """Every trainable parameter's learning rate and weight decay, ours (build_optimizer as the job
    calls it) against the official regex groups of the size's config."""
    cfg = our_config(size)
    groups = fixture(size)["fields"]["param_groups"]
    model, names = family_models[_family(size)]
    o = cfg.optim
    ours_by_name = {}
    for group in build_param_groups(model, o.lr, o.backbone_lr, o.weight_decay, **o.param_group_rules(size)):
        for name in group["param_names"]:
            ours_by_name[name] = (group["lr"], group["weight_decay"])
    differ: dict[str, list[str]] = {}
    for name, official_name in names.items():
        want, got = official_group(groups, official_name), ours_by_name[name]
        if not same(list(want), list(got)):
            differ.setdefault(f"official lr/wd {want}, ours {got}", []).append(official_name)
    if size in PARAM_GROUP_DELIBERATE:
        _, allowed = PARAM_GROUP_DELIBERATE[size]
        assert differ, f"{size}: parameter groups listed as a deliberate difference but equal now"
        differ = {key: [n for n in v if not re.fullmatch(allowed, n)] for key, v in differ.items()}
        differ = {key: v for key, v in differ.items() if v}
    summary = [f"{key}: {len(v)} parameters, e.g. {v[:3]}" for key, v in differ.items()]
    assert not differ, f"{size}: parameter groups differ:\n  " + "\n  ".join(summary)


# ------------------------------------------------------------------------------ learning rates
LR_SIZES = ["rtdetrv4_s", "deimv2_s", "deimv2_pico"]


@pytest.mark.parametrize("size", LR_SIZES)
def test_learning_rates_match_the_official_scheduler(size):
    """build_lr_scheduler (the job's) with our recipe's schedule gives the official
    FlatCosineLRScheduler's rate for every official parameter group, at every sampled iteration
    (the whole warm-up, every epoch boundary and the iteration before it), within 1e-9 relative.

    Indexing: the official loop applies the rate its ``.step(it)`` sets to step ``it + 1`` (and
    runs step 0 at 1/500 of the base rate: students/optim.py); the job's scheduler
    (``indexing="official"``) is compared at the step that uses each rate: official ``.step(it)``
    against our rate of step ``it + 1``. The rates of the official training steps themselves are
    checked by tests/test_training_parity.py.
    """
    data = json.loads((RECIPES / f"lr_{size}.json").read_text())
    cfg = our_config(size)
    o = cfg.optim
    base_lrs = data["group_base_lrs"]
    for lr in base_lrs:  # every official group trains at one of our two rates
        assert same(lr, o.lr) or same(lr, o.backbone_lr), f"{size}: official group rate {lr} not in our recipe"
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    scheduler = build_lr_scheduler(optimizer, steps_per_epoch=data["iters_per_epoch"], epochs=cfg.train.epochs,
                                   flat_epochs=o.flat_epochs, no_aug_epochs=o.no_aug_epochs,
                                   warmup_steps=o.warmup_steps, min_ratio=o.min_lr_ratio, indexing="official")
    assert data["total_iters"] == data["iters_per_epoch"] * cfg.train.epochs
    rows = {row[0]: row[1:] for row in data["rates"]}
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr / 500 for lr in base_lrs], rel=1e-12)
    optimizer.step()
    scheduler.step()  # from here on, our rate of step it + 1
    worst, checked = 0.0, 0
    for it in range(data["total_iters"] + 1):
        if it in rows:
            for want, group in zip(rows[it], optimizer.param_groups):
                err = abs(group["lr"] - want) / max(abs(want), 1e-30)
                assert err <= 1e-9 or (want == 0 and group["lr"] == 0), \
                    f"{size}: iteration {it}: official {want}, ours {group['lr']}"
                worst = max(worst, err if want else 0.0)
                checked += 1
        optimizer.step()
        scheduler.step()
    assert checked == len(data["rates"]) * len(base_lrs)
    assert worst <= 1e-9

