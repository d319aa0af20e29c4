"""Cached vs online teacher, through the distillation job's own path: the cache job wrote the
teacher's features (the ``tiny_cache`` fixture runs it), the training ingest reads, joins and
decodes them (``build_train_dataset`` on Ray Data, then ``rows_to_samples``), the worker's
augmenter, collate and renderer shape them (``Augmenter.batch``, ``collate``, ``render_teacher_grid``)
and the step's loss code scores them (``compute_losses``). On an unaugmented batch the DSI loss
from the cache equals the DSI loss of running the teacher online on the training batch, as the
``teacher_mode: online`` worker does (up to fp16 storage)."""

from pathlib import Path

import torch

from distillery.platform.io import storage
from distillery.data.augment import AugmentConfig, Augmenter
from distillery.data.sample import collate
from distillery.platform.cache.job import build_teacher, resolve_teacher_dtype
from distillery.platform.config.sections import load_config
from distillery.platform.engine.launch import load_train_val
from distillery.platform.config.distill import DistillConfig
from distillery.platform.cache.feature_cache import FeatureCache
from distillery.platform.engine.ingest import build_train_dataset, rows_to_samples
from distillery.platform.distill.teacher_signal import render_teacher_grid
from distillery.students import build_criterion, build_student
from distillery.students.training import compute_losses

REPO = Path(__file__).resolve().parent.parent


def test_cached_and_online_dsi_loss_agree(tiny_cache, synthetic_data, tmp_path):
    cfg = load_config(DistillConfig, REPO / "configs" / "distill_tiny.yaml",
                      [f"data.root={synthetic_data}", f"cache.uri={tiny_cache}"])
    size = cfg.student.input_size
    teacher = build_teacher(cfg.teacher.model_dump(), resolve_teacher_dtype(cfg.teacher, on_gpu=False))
    train, _ = load_train_val(cfg.data, report_dir=str(tmp_path / "reports"))
    cache = FeatureCache(storage.join(cfg.cache.uri, "train"), expected_fingerprint=teacher.fingerprint)
    cache_meta = {"dtype": cache.dtype, "grid": list(cache.grid), "views": cache.views, "uri": cache.uri}

    # The worker's side: a Ray Data batch -> samples with their cached grids -> epoch 0 of a
    # schedule whose strong ops start later, with no flip and no multi-scale: only the resize.
    rows = next(iter(build_train_dataset(train, cache).iter_batches(batch_size=4, batch_format="numpy")))
    augmenter = Augmenter(AugmentConfig(size=size, policy_epochs=(1, 2, 3), mixup_epochs=(1, 2), flip_prob=0.0,
                                        multiscale_stop_epoch=0), seed=0)
    samples = augmenter.batch(rows_to_samples(rows, cache_meta), epoch=0)
    batch = collate(samples, f5_hw=None)
    images, targets = batch["images"], [{k: v for k, v in t.items() if k != "image_id"} for t in batch["targets"]]
    f5_hw = (images.shape[-2] // 32, images.shape[-1] // 32)
    cached = render_teacher_grid(samples, f5_hw, torch.device("cpu"))
    assert cached["teacher_mask"].all()  # no canvas fill: every F5 position has a teacher feature
    with torch.no_grad():
        online = teacher(images)  # the online worker's teacher input: the collated batch at teacher size

    student = build_student(cfg.student.name, num_classes=train.categories.num_classes, eval_spatial_size=size,
                            teacher_dim=teacher.embed_dim).train()
    criterion = build_criterion(num_classes=train.categories.num_classes)
    losses = {}
    for name, teacher_batch in (("cached", cached), ("online", {"teacher_grid": online})):
        torch.manual_seed(0)  # the same train-mode forward for both
        losses[name] = compute_losses(student, criterion, images, targets, **teacher_batch,
                                      dsi_weight=1.0).parts["loss_dsi"].item()
    assert 0.1 < losses["online"] < 2.0  # a real, untrained DSI loss, not a degenerate zero
    assert abs(losses["cached"] - losses["online"]) < 1e-3, losses
    # The cached grid, rendered to F5, is the online grid resized to F5.
    resized = torch.nn.functional.interpolate(online, size=f5_hw, mode="bilinear", align_corners=False)
    cos = torch.nn.functional.cosine_similarity(cached["teacher_grid"], resized, dim=1)
    assert cos.min() > 0.999, cos.min()
