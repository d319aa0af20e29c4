"""The single-process fit loop: a tiny RT-DETRv4 learns, GAM runs inside it, the schedule is applied.

The "Learning" test is the issue's: ``rtdetrv4_tiny`` (the S model's classes with small numbers)
overfits 8 synthetic 128 px images and is scored by pycocotools on those same images.
"""

from __future__ import annotations

import math

import pytest
import torch

from distillery.platform.datasets.coco import load_coco, load_image_resized, training_target
from distillery.evaluation.loop import evaluate_detector
from distillery.platform.datasets.synthetic import generate_synthetic_coco
from distillery.students import build_criterion, build_student
from distillery.students.fit import fit, make_step, predict
from distillery.students.gam import GAM_DEFAULTS, GAMController
from distillery.students.optim import FlatCosineSchedule, build_optimizer

SIZE = 128


def _load_images_and_targets(root, count: int):
    """(images (N, 3, S, S) in [0, 1], targets with normalised cxcywh boxes, dataset) of the train split."""
    uris = generate_synthetic_coco(root, train=count, val=1, size=SIZE, seed=0)
    dataset = load_coco(uris["train"], str(root / "images" / "train"))
    images = torch.stack([torch.from_numpy(load_image_resized(r.uri, SIZE)) for r in dataset.records])
    targets = [training_target(r) for r in dataset.records]
    return images.float() / 255.0, targets, dataset


def _flipped_batches(images: torch.Tensor, targets: list[dict], seed: int):
    """Endless batches of all images, each flipped horizontally with probability 1/2 (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        flip = torch.rand(len(images), generator=generator) < 0.5
        batch_images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        batch_targets = []
        for flipped, t in zip(flip.tolist(), targets):
            boxes = t["boxes"].clone()
            if flipped:
                boxes[:, 0] = 1.0 - boxes[:, 0]
            batch_targets.append({"labels": t["labels"], "boxes": boxes})
        yield {"images": batch_images, "targets": batch_targets}


def _ap(model, images, dataset) -> dict[str, float]:
    return evaluate_detector(model, dataset.records, images, list(dataset.categories.category_ids),
                             dataset.coco_gt_dict())


def test_tiny_student_overfits_synthetic_images(tmp_path):
    """8 images (23 objects, 6 classes), flip-only, batch 8, AdamW lr 1e-3, 100 steps, EMA as in
    the recipe (decay 0.9999, 1000 warm-ups).

    Measured (CPU, torch 2.x, 2 threads): AP50 0.001 for the untrained model, the chance level of
    random boxes here; after 100 steps AP50 0.95 (AP 0.66) for the weights and 0.95 for the EMA.
    The threshold 0.5 is far above chance and leaves room for numerical drift across machines.
    About 40 CPU-seconds (20 s on 2 idle cores).
    """
    images, targets, dataset = _load_images_and_targets(tmp_path / "data", count=8)
    num_classes = dataset.categories.num_classes
    torch.manual_seed(0)
    model = build_student("rtdetrv4_tiny", num_classes=num_classes, eval_spatial_size=SIZE, dsi=False)
    criterion = build_criterion(num_classes=num_classes)

    chance = _ap(model, images, dataset)["AP50"]
    result = fit(model, criterion, _flipped_batches(images, targets, seed=0), steps=100, lr=1e-3)

    losses = [h["loss"] for h in result.history]
    assert len(losses) == 100 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10]), (losses[:10], losses[-10:])
    trained, averaged = _ap(model, images, dataset), _ap(result.ema.module, images, dataset)
    print(f"AP50 untrained {chance:.3f}, trained {trained['AP50']:.3f} (AP {trained['AP']:.3f}), "
          f"EMA {averaged['AP50']:.3f}; {result.seconds:.1f} s")
    assert chance < 0.05
    assert trained["AP50"] >= 0.5, trained
    assert averaged["AP50"] >= 0.5, averaged
    assert model.training  # predict() evaluated in eval mode and restored the mode it found


def _tiny_batches(teacher_dim: int, seed: int = 0):
    """Endless random 64 px batches of 2 with one or two boxes each and a fixed teacher grid."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(2, teacher_dim, 2, 2, generator=generator)
    while True:
        boxes = torch.rand(2, 2, 4, generator=generator) * 0.3 + torch.tensor([0.35, 0.35, 0.1, 0.1])
        yield {"images": torch.rand(2, 3, 64, 64, generator=generator),
               "targets": [{"labels": torch.tensor([0, 2]), "boxes": boxes[0]},
                           {"labels": torch.tensor([1]), "boxes": boxes[1, :1]}],
               "teacher_grid": grid}


def _small_student(**overrides):
    torch.manual_seed(1)
    return build_student("rtdetrv4_tiny", num_classes=3, num_queries=10, num_decoder_layers=1,
                         eval_spatial_size=64, **overrides)


def test_fit_runs_gam_each_epoch_and_weights_the_dsi_loss():
    model = _small_student(teacher_dim=16)
    gam = GAMController(**GAM_DEFAULTS["rtdetrv4_tiny"])
    # The epoch hook sees each epoch once, after GAM's update, with the steps taken so far.
    seen = []
    result = fit(model, build_criterion(num_classes=3), _tiny_batches(16), steps=7, steps_per_epoch=3,
                 lr=1e-4, gam=gam, on_epoch_end=lambda epoch, r: seen.append(
                     (epoch, len(gam.history), r.history[-1]["step"], r.ema is not None)))

    assert seen == [(0, 1, 3, True), (1, 2, 6, True)]  # step 7 opens an epoch it does not finish
    assert [h["epoch"] for h in gam.history] == [0, 1]
    assert [h["steps"] for h in gam.history] == [3, 3]
    for record in gam.history:
        assert 0.0 < record["ratio"] < 1.0  # AIFI gets a gradient share
        assert record["shares"]["dsi"] > 0.0  # the projector is trained
        assert sum(record["shares"].values()) == pytest.approx(1.0)
    # The weight used in epoch e is the one GAM set at the end of epoch e - 1.
    lambdas = [h["lambda"] for h in result.history]
    assert lambdas[:3] == [GAM_DEFAULTS["rtdetrv4_tiny"]["lambda0"]] * 3
    assert lambdas[3:6] == [gam.history[0]["lambda_after"]] * 3
    assert lambdas[6] == gam.current_lambda == gam.history[1]["lambda_after"]
    assert gam.steps_accumulated == 1  # the unfinished epoch's step stays in the controller
    for h in result.history:
        assert math.isfinite(h["loss_dsi"]) and 0.0 <= h["loss_dsi"] <= 2.0
        terms = sum(v for k, v in h.items() if k.startswith("loss_") and k not in ("loss_dsi", "loss_detection"))
        assert h["loss_detection"] == pytest.approx(terms, rel=1e-4)
        assert h["loss"] == pytest.approx(h["loss_detection"] + h["lambda"] * h["loss_dsi"], rel=1e-4)


def test_fit_schedule_clipping_and_errors():
    model = _small_student(dsi=False)
    criterion = build_criterion(num_classes=3)
    result = fit(model, criterion, _tiny_batches(16), steps=5, lr=2e-3, backbone_lr=1e-3, warmup_steps=2,
                 flat_steps=3, min_lr_ratio=0.25, ema_decay=None)
    # LambdaLR: step k (0-based) runs with lr * f(k) (quadratic warm-up, flat, cosine to 0.25 at the end).
    expected = [2e-3 * FlatCosineSchedule(5, 2, 3, 0, 0.25)(k) for k in range(5)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)
    assert expected[0] == 0.0 and expected[2] == 2e-3 and expected[4] < 2e-3
    assert result.ema is None and "loss_dsi" not in result.history[0]
    groups = {g["name"]: g["lr"] for g in result.optimizer.param_groups}
    assert groups["backbone"] == pytest.approx(1e-3 * FlatCosineSchedule(5, 2, 3, 0, 0.25)(5))

    # make_step clips the global gradient norm before the optimizer sees the gradients.
    model = _small_student(dsi=False)
    optimizer = build_optimizer(model, lr=1e-3, backbone_lr=1e-3, weight_decay=0.0)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]
                                              if p.grad is not None]))))
    make_step(model, criterion, optimizer, clip_max_norm=0.5)(next(_tiny_batches(16)))
    assert float(seen[0]) <= 0.5 + 1e-5
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step

    # A job's extra loss (the MoE load-balancing loss, in the MoE ablation) is part of the step.
    model = _small_student(dsi=False)
    weight = next(model.decoder.parameters())
    result = fit(model, criterion, _tiny_batches(16), steps=2, ema_decay=None,
                 aux_loss=lambda m: 0.5 * weight.square().sum())
    for h in result.history:
        assert h["loss_aux"] > 0 and h["loss"] == pytest.approx(h["loss_detection"] + h["loss_aux"], rel=1e-5)

    with pytest.raises(ValueError, match="ran out after 1 of 3"):
        fit(model, criterion, [next(_tiny_batches(16))], steps=3, ema_decay=None)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit(model, criterion, _tiny_batches(16), steps=0)
    with pytest.raises(ValueError, match="orig_sizes"):
        predict(model, torch.rand(2, 3, 64, 64), [[64, 64]])


def test_fit_under_bf16_autocast_keeps_float32_weights():
    """The benchmark's GPU path (bf16 autocast for forward + losses), here on CPU."""
    model = _small_student(teacher_dim=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(model, build_criterion(num_classes=3), _tiny_batches(16), steps=2, lr=1e-3,
                 gam=GAMController(**GAM_DEFAULTS["rtdetrv4_tiny"]), autocast_dtype=torch.bfloat16)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["loss_dsi"]) for h in result.history)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in result.ema.module.parameters()} == {torch.float32}
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert {model.component_of(n) for n in changed} == {"backbone", "aifi", "ccff", "decoder", "dsi"}


def test_fit_with_a_fixed_dsi_weight_trains_on_the_dsi_loss():
    """``dsi_weight=w`` (no GAM): every step's loss is detection + w * DSI, and the DSI gradient
    reaches the student (the projector and AIFI move differently than at weight 0)."""
    criterion = build_criterion(num_classes=3)
    runs = {}
    for weight in (0.0, 5.0):
        model = _small_student(teacher_dim=16)
        with pytest.warns(UserWarning, match="NOT being distilled") if weight == 0.0 else _no_warning():
            result = fit(model, criterion, _tiny_batches(16), steps=3, lr=1e-3, ema_decay=None,
                         dsi_weight=weight)
        runs[weight] = (model, result)
        for h in result.history:
            assert h["lambda"] == weight and h["dsi_trained"] is (weight > 0)
            assert h["loss"] == pytest.approx(h["loss_detection"] + weight * h["loss_dsi"], rel=1e-4)
    # Same start, same batches: at weight 0 the projector gets no gradient (weight decay alone
    # moves it), at weight 5 it learns.
    start = _small_student(teacher_dim=16).dsi.weight
    still = (runs[0.0][0].dsi.weight - start).abs().max()
    moved = (runs[5.0][0].dsi.weight - start).abs().max()
    assert moved > 100 * still, (float(moved), float(still))


class _no_warning:
    """Fails the test if a 'not being distilled' warning is raised inside the block."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self._seen if "NOT being distilled" in str(w.message)]
        return False


def test_weight_zero_with_a_teacher_grid_says_so_once_and_in_the_history():
    import warnings

    model = _small_student(teacher_dim=16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fit(model, build_criterion(num_classes=3), _tiny_batches(16), steps=3, ema_decay=None)
    said = [w for w in seen if "NOT being distilled" in str(w.message)]
    assert len(said) == 1 and "dsi_weight is None" in str(said[0].message)
    assert [h["dsi_trained"] for h in result.history] == [False] * 3
    assert all(h["lambda"] == 0.0 and h["loss"] == pytest.approx(h["loss_detection"], rel=1e-6)
               for h in result.history)

    # GAM's lambda at 0 is the same situation, named as such; no teacher grid, no warning, no field.
    gam = GAMController(**{**GAM_DEFAULTS["rtdetrv4_tiny"], "lambda0": 0.0})
    with pytest.warns(UserWarning, match="GAM's lambda is 0"):
        fit(_small_student(teacher_dim=16), build_criterion(num_classes=3), _tiny_batches(16), steps=1,
            ema_decay=None, gam=gam)
    no_teacher = ({k: v for k, v in b.items() if k != "teacher_grid"} for b in _tiny_batches(16))
    with _no_warning():
        result = fit(_small_student(dsi=False), build_criterion(num_classes=3), no_teacher, steps=1, ema_decay=None)
    assert "dsi_trained" not in result.history[0]

    criterion = build_criterion(num_classes=3)
    with pytest.raises(ValueError, match="not both"):
        fit(model, criterion, _tiny_batches(16), steps=1, gam=GAMController(**GAM_DEFAULTS["rtdetrv4_tiny"]),
            dsi_weight=1.0)
    optimizer = build_optimizer(model, lr=1e-3, backbone_lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="finite weight >= 0"):
        make_step(model, criterion, optimizer, dsi_weight=-1.0)
