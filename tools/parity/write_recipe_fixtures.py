"""Write the recipe and learning-rate parity fixtures (tests/test_recipe_parity.py) from the official code.

Usage (each official checkout at its pinned commit, unmodified; only PyYAML and torch needed)::

    python tools/parity/write_recipe_fixtures.py rtdetrv4 /path/to/RT-DETRv4 [--out tests/fixtures/parity/recipes]
    python tools/parity/write_recipe_fixtures.py deimv2 /path/to/DEIMv2 [--out tests/fixtures/parity/recipes]

Recipes. Each official size's YAML file is resolved by the official loader,
``engine/core/yaml_utils.py`` ``load_config`` (``__include__`` resolution and merging). That
module is loaded from the checkout on its own (as the package ``official_core``, whose only
other module it needs is ``workspace.py``): importing ``engine`` would pull the official data,
model and logging dependencies, none of which a config needs. From the resolved dict the
training-relevant fields are written into ``<size>.json`` (see :func:`recipe_fields`), with the
official repository, commit and config path.

Learning rates (``lr_<size>.json``, for RT-DETRv4-S, DEIMv2-S and DEIMv2-Pico). The official
``engine/optim/lr_scheduler.py`` (loaded on its own: it imports only ``math`` and ``functools``)
drives a ``torch.optim.AdamW`` whose parameter groups are the official recipe's (one group per
``optimizer.params`` entry plus the rest, each with its resolved ``lr``), as the official
solver builds it: ``FlatCosineLRScheduler(optimizer, lr_gamma, iter_per_epoch, epoches,
warmup_iter, flat_epoch, no_aug_epoch)``, then ``.step(it, optimizer)``. ``ITERS_PER_EPOCH``
iterations per epoch (a small number, so that the fixture stays small and every phase boundary
falls on an iteration); ``warmup_iter`` stays the recipe's (2000 / 4000 iterations, i.e. the
warm-up spans 40 / 80 of these short epochs). Recorded: every group's rate after ``.step(it)``
for the first ``WARMUP_EVERY`` iterations, every ``WARMUP_EVERY``-th iteration of the warm-up and
its last iterations, and every epoch boundary of the whole schedule (and the iteration before
each).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from write_fixtures import OFFICIAL_REPOS, official_commit  # noqa: E402  (tools/parity/write_fixtures.py)

ITERS_PER_EPOCH = 50
WARMUP_EVERY = 25  # warm-up: its first WARMUP_EVERY iterations, then every WARMUP_EVERY-th, and its end

# our recipe name -> official config, per official repository
SIZES = {
    "rtdetrv4": {
        "rtdetrv4_s": "configs/rtv4/rtv4_hgnetv2_s_coco.yml",
        "rtdetrv4_m": "configs/rtv4/rtv4_hgnetv2_m_coco.yml",
        "rtdetrv4_l": "configs/rtv4/rtv4_hgnetv2_l_coco.yml",
        "rtdetrv4_x": "configs/rtv4/rtv4_hgnetv2_x_coco.yml",
    },
    "deimv2": {
        "deimv2_atto": "configs/deimv2/deimv2_hgnetv2_atto_coco.yml",
        "deimv2_femto": "configs/deimv2/deimv2_hgnetv2_femto_coco.yml",
        "deimv2_pico": "configs/deimv2/deimv2_hgnetv2_pico_coco.yml",
        "deimv2_n": "configs/deimv2/deimv2_hgnetv2_n_coco.yml",
        "deimv2_s": "configs/deimv2/deimv2_dinov3_s_coco.yml",
        "deimv2_m": "configs/deimv2/deimv2_dinov3_m_coco.yml",
        "deimv2_l": "configs/deimv2/deimv2_dinov3_l_coco.yml",
        "deimv2_x": "configs/deimv2/deimv2_dinov3_x_coco.yml",
    },
}
LR_SIZES = ("rtdetrv4_s", "deimv2_s", "deimv2_pico")


def official_module(repo: Path, package: str, directory: str, module: str) -> types.ModuleType:
    """``<repo>/<directory>/<module>.py`` imported as ``<package>.<module>`` (relative imports
    resolve inside ``directory``), without running the official ``engine/__init__.py``."""
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(repo / directory)]
        sys.modules[package] = pkg
    return importlib.import_module(f"{package}.{module}")


def _op(ops: list[dict], name: str) -> dict | None:
    found = [op for op in ops if op.get("type") == name]
    return found[0] if found else None


def recipe_fields(cfg: dict) -> dict:
    """The training-relevant fields of a resolved official config (absent -> null: the official
    code's default applies, noted per field in tests/test_recipe_parity.py)."""
    model = cfg[cfg["model"]] if isinstance(cfg.get(cfg.get("model")), dict) else {}
    decoder = cfg[model.get("decoder", "DFINETransformer")]
    criterion = cfg[cfg["criterion"]]
    matcher = criterion.get("matcher", {})
    loader = cfg["train_dataloader"]
    transforms = loader["dataset"]["transforms"]
    ops = transforms["ops"]
    collate = loader["collate_fn"]
    optimizer = cfg["optimizer"]
    groups = [{"params": pg["params"], "lr": pg.get("lr", optimizer["lr"]),
               "weight_decay": pg.get("weight_decay", optimizer["weight_decay"])} for pg in optimizer.get("params", [])]
    groups.append({"params": None, "lr": optimizer["lr"], "weight_decay": optimizer["weight_decay"]})  # the rest
    resize = _op(ops, "Resize")
    out = {
        "epochs": cfg["epoches"],
        "total_batch_size": loader["total_batch_size"],
        "optimizer": optimizer["type"],
        "lr": optimizer["lr"],
        "betas": optimizer["betas"],
        "weight_decay": optimizer["weight_decay"],
        "param_groups": groups,
        "clip_max_norm": cfg["clip_max_norm"],
        "lr_scheduler": cfg.get("lrsheduler"),
        "lr_gamma": cfg["lr_gamma"],
        "warmup_iter": cfg["warmup_iter"],
        "flat_epoch": cfg["flat_epoch"],
        "no_aug_epoch": cfg["no_aug_epoch"],
        "input_size": resize["size"] if resize else None,
        "policy_epochs": transforms["policy"]["epoch"],
        "policy_ops": transforms["policy"]["ops"],
        "mosaic_prob": transforms.get("mosaic_prob"),
        "photometric_prob": (_op(ops, "RandomPhotometricDistort") or {}).get("p"),
        "iou_crop_prob": (_op(ops, "RandomIoUCrop") or {}).get("p"),
        "flip_prob": (_op(ops, "RandomHorizontalFlip") or {}).get("p"),
        "normalize": bool(_op(ops, "Normalize")),
        "mixup_prob": collate.get("mixup_prob"),
        "mixup_epochs": collate.get("mixup_epochs"),
        "copyblend_prob": collate.get("copyblend_prob"),
        "copyblend_epochs": collate.get("copyblend_epochs"),
        "multiscale_base_size": collate.get("base_size"),
        "multiscale_base_size_repeat": collate.get("base_size_repeat"),
        "multiscale_stop_epoch": collate.get("stop_epoch"),
        "ema_restart_decay": collate.get("ema_restart_decay"),
        "use_ema": cfg.get("use_ema"),
        "ema_decay": cfg["ema"]["decay"],
        "ema_warmups": cfg["ema"]["warmups"],
        "num_queries": decoder.get("num_queries"),
        "num_denoising": decoder.get("num_denoising"),
        "losses": criterion["losses"],
        "loss_weights": criterion["weight_dict"],
        "mal_gamma": criterion.get("gamma"),
        "use_uni_set": criterion.get("use_uni_set"),
        "matcher_weights": matcher.get("weight_dict"),
        "matcher_alpha": matcher.get("alpha"),
        "matcher_gamma": matcher.get("gamma"),
        "change_matcher": matcher.get("change_matcher"),
        "iou_order_alpha": matcher.get("iou_order_alpha"),
        "matcher_change_epoch": matcher.get("matcher_change_epoch"),
    }
    if "teacher_model" in cfg:  # RT-DETRv4: DSI + GAM
        teacher = cfg["teacher_model"]
        out["teacher"] = {"type": teacher["type"], "weights": os.path.basename(teacher["dinov3_weights_path"]),
                          "patch_size": teacher["patch_size"], "mean": teacher["mean"], "std": teacher["std"],
                          # the teacher sees the student's training images as they are (no resize)
                          "input_size": resize["size"] if resize else None}
        out["distill_weight"] = criterion["weight_dict"].get("loss_distill")
        out["distill_adaptive_params"] = criterion.get("distill_adaptive_params")
        out["distill_teacher_dim"] = cfg["HybridEncoder"].get("distill_teacher_dim")
    return out


def learning_rates(repo: Path, fields: dict) -> dict:
    """Every group's rate from the official FlatCosineLRScheduler (see the module docstring)."""
    scheduler_module = official_module(repo, "official_optim", "engine/optim", "lr_scheduler")
    groups = fields["param_groups"]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in groups]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                                   for p, g in zip(params, groups)],
                                  lr=fields["lr"], betas=tuple(fields["betas"]), weight_decay=fields["weight_decay"])
    for group in optimizer.param_groups:  # what the official solver's (unused) LR scheduler leaves there
        group.setdefault("initial_lr", group["lr"])
    scheduler = scheduler_module.FlatCosineLRScheduler(
        optimizer, fields["lr_gamma"], ITERS_PER_EPOCH, total_epochs=fields["epochs"],
        warmup_iter=fields["warmup_iter"], flat_epochs=fields["flat_epoch"], no_aug_epochs=fields["no_aug_epoch"])
    total = ITERS_PER_EPOCH * fields["epochs"]
    warmup = fields["warmup_iter"]
    sampled = set(range(WARMUP_EVERY)) | set(range(0, warmup + 1, WARMUP_EVERY)) | {warmup - 1, warmup, warmup + 1}
    for epoch in range(fields["epochs"] + 1):
        sampled.update({epoch * ITERS_PER_EPOCH - 1, epoch * ITERS_PER_EPOCH})
    rows = []
    for it in sorted(i for i in sampled if 0 <= i <= total):
        scheduler.step(it, optimizer)
        rows.append([it] + [group["lr"] for group in optimizer.param_groups])
    return {"iters_per_epoch": ITERS_PER_EPOCH, "total_iters": total,
            "group_base_lrs": [g["lr"] for g in groups], "rates": rows}


def write_json(path: Path, data: dict) -> None:
    """Atomic; the ``rates`` rows (if any) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = data.get("rates")
    head = {k: v for k, v in data.items() if k != "rates"}
    text = json.dumps(head, indent=1)
    if rows is not None:
        text = text[:-2] + ',\n "rates": [\n' + ",\n".join(json.dumps(r) for r in rows) + "\n ]\n}"
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text + "\n")
        tmp = handle.name
    try:
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(OFFICIAL_REPOS))
    parser.add_argument("repo", type=Path, help="official checkout (RT-DETRv4 or DEIMv2) at its pinned commit")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/parity/recipes"))
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    if not (repo / "engine" / "core" / "yaml_utils.py").is_file():
        raise SystemExit(f"{repo}: not an official RT-DETRv4 / DEIMv2 checkout (no engine/core/yaml_utils.py)")
    commit = official_commit(repo)
    yaml_utils = official_module(repo, "official_core", "engine/core", "yaml_utils")
    for size, config in SIZES[args.kind].items():
        resolved = yaml_utils.load_config(str(repo / config), dict())  # a fresh dict: the default one is shared
        fields = recipe_fields(resolved)
        head = {"size": size, "official_repo": OFFICIAL_REPOS[args.kind], "official_commit": commit,
                "official_config": config}
        write_json(args.out.resolve() / f"{size}.json", {**head, "fields": fields})
        if size in LR_SIZES:
            write_json(args.out.resolve() / f"lr_{size}.json", {**head, **learning_rates(repo, fields)})
        print(json.dumps({"size": size, "commit": commit, "fields": len(fields)}))


if __name__ == "__main__":
    main()
