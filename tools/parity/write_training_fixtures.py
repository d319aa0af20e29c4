"""Write the 10-step training parity fixtures (tests/test_training_parity.py) from the official code.

Usage (each official checkout at its pinned commit, unmodified; its own dependencies installed,
e.g. ``pip install --target /tmp/offdeps tensorboard absl-py calflops accelerate`` and that
folder on ``PYTHONPATH`` for this script only)::

    python tools/parity/write_training_fixtures.py rtdetrv4 /path/to/RT-DETRv4 [--out tests/fixtures/parity/training]
    python tools/parity/write_training_fixtures.py deimv2 /path/to/DEIMv2 [--out tests/fixtures/parity/training]

Each case starts from the seeded weights of a reduced output fixture written by
``write_fixtures.py`` (``tests/fixtures/parity/<reduced case>.safetensors``: the same reduced
official config; the fixture records that file's sha256 instead of a second copy of the
weights) and trains it for ``STEPS`` official steps:

* built by the official config system (``YAMLConfig``) in the order of the official solver
  (``_solver.py``: ``_setup`` loads the weights into ``cfg.model``, then builds ``cfg.criterion``
  and ``cfg.ema``; ``train`` builds ``cfg.optimizer`` (its regex parameter groups),
  ``cfg.lr_scheduler`` and ``cfg.lr_warmup_scheduler``; ``det_solver.py`` ``fit`` builds
  ``FlatCosineLRScheduler`` with ``iter_per_epoch = len(train_dataloader)`` and calls the official
  ``train_one_epoch`` once per epoch). Reproduced by hand: only that order of calls (the official
  ``train`` also builds the COCO data loaders, which need the data set), and ``scaler=None``
  (the float32 path: ``use_amp`` is a CUDA setting; ours runs float32 on CPU too).
* the recipe's optimizer, parameter groups, gradient clipping, ``lr_gamma`` and EMA decay; the
  schedule's lengths shrunk so that 10 steps cross every phase (``SCHEDULE``: 2 iterations per
  epoch, 5 epochs, warm-up 3 iterations, flat until epoch 2, the last epoch at the minimum, EMA
  warm-up 4 updates) and, for DEIMv2, the matcher change at epoch 3 (the recipe's
  ``change_matcher`` and ``iou_order_alpha``).
* on ``STEPS`` seeded batches of 2 images (uint8, stored; 64 x 64, 96 x 96 for Pico, whose two
  levels at strides 16 and 32 must give at least its 30 queries) with seeded boxes. The denoising queries draw from torch's global generator: the batch iterator seeds it
  with ``SEED + 100 + step`` before it hands batch ``step`` to ``train_one_epoch``, and the test
  seeds it the same before each of our steps.

Saved (``<case>.safetensors`` + ``<case>.json``): the batches; for every floating-point entry of
the official model's state dict (parameters and BatchNorm statistics) and of the EMA's, after the
10 steps, the values at ``SAMPLES`` seeded positions (every position of a smaller tensor): the
full final weights of an HGNetv2-B0 model would be 20 MB; the positions are drawn uniformly, so
an error confined to part of a tensor still shows. Also the rate of every parameter group and the
total loss at every step (recorded around the official loop: the rate when the batch is handed
over, the loss by a forward hook on the official criterion).

The official code's own float spread: in float32 the official 10 steps do not reproduce themselves
when only the float reduction order changes (measured: RT-DETRv4-S re-run with 1 thread instead
of 2 ends 2.9e-2 apart in the step-10 loss, DEIMv2-Pico 2.3e-3 at step 7): Adam turns the
float-noise gradients of mathematically (near-)zero-gradient elements, e.g. the HGNetv2 LAB biases
in front of a convolution + BatchNorm, into full-size steps of either sign, and once a top-k query
selection or a matching flips, every gradient changes. So each case is also run with the
``ALTERNATIVE_FLOAT_ORDERS`` (1 intra-op thread; oneDNN convolutions off), the same computation in
another rounding order, and the fixture keeps, per sampled value, the largest distance of those
re-runs from the official run (``spread/final``, ``spread/ema``) and per step the largest loss
distance (``loss_spread``); ``tests/test_training_parity.py`` allows a stated multiple of it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from write_fixtures import CASES as OUTPUT_CASES  # noqa: E402  (tools/parity/write_fixtures.py)
from write_fixtures import IMAGENET_MEAN, IMAGENET_STD, NORMALISED_INPUT, OFFICIAL_REPOS  # noqa: E402
from write_fixtures import official_commit, official_config, write_case  # noqa: E402

STEPS = 10
ITERS_PER_EPOCH = 2
BATCH = 2
SEED = 20270
SAMPLES = 128
SCHEDULE = {"epoches": STEPS // ITERS_PER_EPOCH, "warmup_iter": 3, "flat_epoch": 2, "no_aug_epoch": 1,
            "ema": {"warmups": 4}}
MATCHER_CHANGE_EPOCH = 3
# The official run's float reduction order (intra-op threads, oneDNN convolutions), and the other
# orders the same official steps are re-run with: in float32 the official code does not reproduce
# itself over 10 steps (Adam turns float-noise gradients into full-size steps, a flipped top-k or
# matching then changes every gradient), so the fixture records how far its own re-runs land
# (``spread/*``, ``loss_spread``) and the test allows a stated multiple of that.
FLOAT_ORDER = {"threads": 2, "mkldnn": True}
ALTERNATIVE_FLOAT_ORDERS = ({"threads": 1, "mkldnn": True}, {"threads": 2, "mkldnn": False})

# case -> (the reduced output case whose config and seeded weights it starts from, image side)
CASES = {
    "rtdetrv4_s_train": ("rtdetrv4_s_reduced", 64),
    "deimv2_s_train": ("deimv2_s_reduced", 64),
    "deimv2_pico_train": ("deimv2_pico_reduced", 96),
}
CRITERION = {"rtdetrv4": "RTv4Criterion", "deimv2": "DEIMCriterion"}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seeded_batches(seed: int, size: int) -> tuple[torch.Tensor, list[list[dict[str, torch.Tensor]]]]:
    """(STEPS, BATCH, 3, size, size) uint8 images and per step, per image, 1-4 boxes (cxcywh, normalised)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (STEPS, BATCH, 3, size, size), generator=generator, dtype=torch.uint8)
    targets = []
    for _ in range(STEPS):
        step = []
        for _ in range(BATCH):
            n = int(torch.randint(1, 5, (1,), generator=generator))
            wh = 0.1 + 0.5 * torch.rand(n, 2, generator=generator)
            centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=generator)
            step.append({"labels": torch.randint(0, 80, (n,), generator=generator),
                         "boxes": torch.cat([centre, wh], dim=1)})
        targets.append(step)
    return images, targets


class SeededBatches:
    """One epoch's batches as the official ``train_one_epoch`` iterates them (``len`` and
    ``(samples, targets)``); seeds the global generator before each and notes each step's rates."""

    def __init__(self, epoch: int, images, targets, normalise: bool, optimizer, lrs: list):
        self.epoch, self.images, self.targets, self.normalise = epoch, images, targets, normalise
        self.optimizer, self.lrs = optimizer, lrs

    def __len__(self) -> int:
        return ITERS_PER_EPOCH

    def __iter__(self):
        for i in range(ITERS_PER_EPOCH):
            step = self.epoch * ITERS_PER_EPOCH + i
            samples = self.images[step].float() / 255.0
            if self.normalise:  # the official DINOv3 recipes normalise in the data pipeline
                samples = (samples - IMAGENET_MEAN) / IMAGENET_STD
            self.lrs.append([group["lr"] for group in self.optimizer.param_groups])
            torch.manual_seed(SEED + 100 + step)
            yield samples, [dict(t) for t in self.targets[step]]


def sample_positions(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Per floating-point entry, SAMPLES sorted flat positions drawn without replacement (all of a smaller one)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        n = value.numel()
        out[key] = torch.arange(n) if n <= SAMPLES else torch.randperm(n, generator=generator)[:SAMPLES].sort().values
    return out


def official_sections(case: str) -> dict:
    """The reduced output case's official overrides, plus DEIMv2's matcher change epoch."""
    kind, _config, overrides, _student, _ours = OUTPUT_CASES[CASES[case][0]]
    sections = {k: dict(v) for k, v in overrides.items()}
    if kind == "deimv2":
        sections.setdefault(CRITERION[kind], {})["matcher"] = {"matcher_change_epoch": MATCHER_CHANGE_EPOCH}
    return sections


def official_run(case: str, repo: Path, initial: dict, float_order: dict):
    """The official 10 steps of ``case`` from ``initial`` under ``float_order`` (``threads``, ``mkldnn``:
    the same computation, only its float reduction order depends on them); returns
    (config, model, EMA, criterion's matcher, warm-up scheduler, rates per step, loss per step)."""
    reduced, size = CASES[case]
    _kind, config, _overrides, _student, _ours = OUTPUT_CASES[reduced]
    sections = official_sections(case)
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(float_order["threads"])
    torch.backends.mkldnn.enabled = float_order["mkldnn"]
    try:
        torch.manual_seed(SEED)
        cfg = official_config(repo, config, sections, **SCHEDULE)
        from engine.optim.lr_scheduler import FlatCosineLRScheduler  # the official modules, from the checkout
        from engine.solver.det_engine import train_one_epoch

        # _solver.py _setup
        model = cfg.model
        model.load_state_dict(initial, strict=True)
        criterion = cfg.criterion
        ema = cfg.ema
        # _solver.py train
        optimizer = cfg.optimizer
        lr_scheduler = cfg.lr_scheduler  # noqa: F841  (sets each group's initial_lr, as in the official solver)
        lr_warmup_scheduler = cfg.lr_warmup_scheduler
        # det_solver.py fit
        y = cfg.yaml_cfg
        scheduler = FlatCosineLRScheduler(optimizer, y["lr_gamma"], ITERS_PER_EPOCH, total_epochs=y["epoches"],
                                          warmup_iter=y["warmup_iter"], flat_epochs=y["flat_epoch"],
                                          no_aug_epochs=y["no_aug_epoch"])
        images, targets = seeded_batches(SEED + 1, size)
        losses: list[float] = []
        criterion.register_forward_hook(
            lambda _m, _a, out: losses.append(float(sum(v.detach() for v in out.values()))))
        lrs: list[list[float]] = []
        for epoch in range(y["epoches"]):
            batches = SeededBatches(epoch, images, targets, reduced in NORMALISED_INPUT, optimizer, lrs)
            train_one_epoch(True, scheduler, model, criterion, batches, optimizer, torch.device("cpu"), epoch,
                            max_norm=y["clip_max_norm"], print_freq=100, ema=ema, scaler=None,
                            lr_warmup_scheduler=lr_warmup_scheduler, writer=None)
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
    assert len(losses) == STEPS and len(lrs) == STEPS, (len(losses), len(lrs))
    return cfg, model, ema, criterion.matcher, lr_warmup_scheduler, lrs, losses


def run_case(case: str, repo: Path, out_dir: Path, reduced_dir: Path) -> None:
    reduced, size = CASES[case]
    kind, config, _overrides, student, our_overrides = OUTPUT_CASES[reduced]
    commit = official_commit(repo)
    weights_file = reduced_dir / f"{reduced}.safetensors"
    initial = {k[len("weights/"):]: (v.float() if v.is_floating_point() else v)
               for k, v in load_file(str(weights_file)).items() if k.startswith("weights/")}
    cfg, model, ema, matcher, lr_warmup_scheduler, lrs, losses = official_run(case, repo, initial, FLOAT_ORDER)
    y = cfg.yaml_cfg
    images, targets = seeded_batches(SEED + 1, size)
    final, averaged = model.state_dict(), ema.module.state_dict()
    positions = sample_positions(final, SEED + 2)
    keys = sorted(positions)

    def sampled(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[k].detach().flatten()[positions[k]].float() for k in keys])

    tensors = {
        "images": images.contiguous(),
        "sample_index": torch.cat([positions[k] for k in keys]).to(torch.int32),
        "final": sampled(final),
        "ema": sampled(averaged),
    }
    # The official code's own float spread: the same 10 steps with another float reduction order.
    alternatives = []
    spread = {"final": torch.zeros_like(tensors["final"]), "ema": torch.zeros_like(tensors["ema"])}
    loss_spread = [0.0] * STEPS
    for order in ALTERNATIVE_FLOAT_ORDERS:
        _, alt_model, alt_ema, _, _, alt_lrs, alt_losses = official_run(case, repo, initial, order)
        assert alt_lrs == lrs, f"{case} {order}: the rates depend on the float order"
        for name, state in (("final", alt_model.state_dict()), ("ema", alt_ema.module.state_dict())):
            torch.maximum(spread[name], (sampled(state) - tensors[name]).abs(), out=spread[name])
        loss_spread = [max(d, abs(a - b)) for d, a, b in zip(loss_spread, alt_losses, losses)]
        alternatives.append({**order, "losses": alt_losses})
    tensors["spread/final"], tensors["spread/ema"] = spread["final"], spread["ema"]
    for step, step_targets in enumerate(targets):
        for i, target in enumerate(step_targets):
            tensors[f"targets/{step}/{i}/labels"] = target["labels"]
            tensors[f"targets/{step}/{i}/boxes"] = target["boxes"]
    meta = {
        "case": case,
        "official_repo": OFFICIAL_REPOS[kind],
        "official_commit": commit,
        "official_config": config,
        "official_overrides": official_sections(case),
        "official_schedule_overrides": SCHEDULE,
        "initial_weights": {"file": f"{reduced}.safetensors", "sha256": sha256_of(weights_file)},
        "student": student,
        "student_overrides": {**our_overrides, "num_classes": 80, "eval_spatial_size": 128},
        "official_input": "ImageNet-normalised images / 255" if reduced in NORMALISED_INPUT else "images / 255",
        "steps": STEPS,
        "iters_per_epoch": ITERS_PER_EPOCH,
        "step_seed": "torch.manual_seed(step_seed + step) before each step",
        "step_seed_base": SEED + 100,
        "schedule": {"epochs": y["epoches"], "warmup_iter": y["warmup_iter"], "flat_epoch": y["flat_epoch"],
                     "no_aug_epoch": y["no_aug_epoch"], "lr_gamma": y["lr_gamma"],
                     "clip_max_norm": y["clip_max_norm"], "ema_decay": ema.decay, "ema_warmups": ema.warmups,
                     "lr_warmup_duration": lr_warmup_scheduler.warmup_duration if lr_warmup_scheduler else None,
                     "matcher_change_epoch": (matcher.matcher_change_epoch
                                              if getattr(matcher, "change_matcher", False) else None)},
        "group_lrs": lrs,
        "losses": losses,
        "float_order": FLOAT_ORDER,
        "alternative_float_orders": alternatives,
        "loss_spread": loss_spread,
        "sampled": [[k, int(positions[k].numel()), list(final[k].shape)] for k in keys],
    }
    write_case(out_dir, case, tensors, meta)
    print(json.dumps({"case": case, "commit": commit, "loss_first": losses[0], "loss_last": losses[-1],
                      "loss_spread_last": loss_spread[-1],
                      "bytes": (out_dir / f"{case}.safetensors").stat().st_size}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(OFFICIAL_REPOS))
    parser.add_argument("repo", type=Path, help="official checkout (RT-DETRv4 or DEIMv2) at its pinned commit")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/parity/training"))
    parser.add_argument("--reduced", type=Path, default=Path("tests/fixtures/parity"),
                        help="where write_fixtures.py wrote the reduced cases (the initial weights)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    if not (repo / "engine" / "solver" / "det_engine.py").is_file():
        raise SystemExit(f"{repo}: not an official RT-DETRv4 / DEIMv2 checkout (no engine/solver/det_engine.py)")
    for case, (reduced, _) in CASES.items():
        if OUTPUT_CASES[reduced][0] == args.kind:
            run_case(case, repo, args.out.resolve(), args.reduced.resolve())


if __name__ == "__main__":
    main()
