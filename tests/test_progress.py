"""What a training job prints (progress and epoch lines, Ray's noise filtered on the driver) and
the augmentation preview's PCA colouring. No Ray cluster: the pieces are called directly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from distillery.platform.engine.progress import ProgressPrinter, filter_ray_log_noise, loss_terms


def test_loss_terms_sum_auxiliary_copies():
    parts = {"loss_mal": 1.0, "loss_mal_aux_0": 0.5, "loss_bbox_dn_1": 0.25, "loss_bbox": 1.0,
             "loss_giou_pre": 0.5, "loss_giou_enc_0": 0.25, "loss_dsi": 0.1, "num_boxes": 7.0,
             "loss_detection": 3.5}  # the criterion's sum: not a term of its own
    assert loss_terms(parts) == {"mal": 1.5, "bbox": 1.25, "giou": 0.75, "dsi": 0.1}


def test_progress_and_epoch_lines():
    lines: list[str] = []
    printer = ProgressPrinter(epochs=3, steps_per_epoch=20, every_steps=5, every_seconds=1e9, world_size=2,
                              out=lambda text, flush=False: lines.append(text))
    printer.start_epoch_timer()
    due = []
    for step in range(1, 21):
        if printer.due(step):
            due.append(step)
            printer.step(0, step, images_seen=4 * step, total=3.0, parts={"loss_mal": 1.0, "loss_dsi": 0.5}, lam=1.25)
    assert due == [1, 6, 11, 16]  # the first step, then every 5 steps after the last line
    assert lines[0].startswith("[train] epoch 1/3 step 1/20 | loss 3 (mal 1 dsi 0.5) | lambda 1.25 | first step after")
    assert re.fullmatch(r"\[train\] epoch 1/3 step 6/20 \| loss 3 \(mal 1 dsi 0\.5\) \| lambda 1\.25 \| "
                        r"[\d.]+ img/s \| ETA epoch \d+:\d\d, run \d+:\d\d \(\+ evaluation\)", lines[1]), lines[1]
    printer.epoch_end(0, {"epoch_seconds": 63.2, "images_per_second": 12.12, "lambda_before": 1.0, "lambda": 0.93,
                          "aifi_ratio": 0.0041, "AP": 0.123, "AP50": 0.251, "best_AP": 0.13, "best_epoch": 0},
                      loss=4.7)
    assert lines[-1] == ("[train] epoch 1/3 done in 63 s | 12.1 img/s | loss 4.7 | lambda 1 -> 0.93 | "
                         "AIFI share 0.41% | AP 0.123 AP50 0.251 | best AP 0.130 (epoch 1)")


def test_progress_every_seconds():
    printer = ProgressPrinter(epochs=1, steps_per_epoch=100, every_steps=1000, every_seconds=0.0, world_size=1,
                              out=lambda *a, **k: None)
    printer.start_epoch_timer()
    printer.step(0, 1, 2, 1.0, {}, None)
    assert printer.due(2)  # time, not steps, made it due


def test_ray_noise_is_dropped_on_the_driver(monkeypatch):
    from ray._private import worker as ray_worker

    shown: list[list[str]] = []
    monkeypatch.setattr(ray_worker, "print_worker_logs", lambda data, *a, **k: shown.append(data["lines"]))
    filter_ray_log_noise()
    filter_ray_log_noise()  # idempotent: one filter, not two
    assert ray_worker.print_worker_logs.filters_noise
    ray_worker.print_worker_logs({"lines": [
        "[2026-11-30 20:58:36,361 E 30777 30831] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: 'b14f' has constructor arguments in the object store and max_restarts > 0. If the arguments",
        "/x/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
        "  self.exclude_resources = exclude_resources",
        "[train] epoch 1/2 step 1/4 | loss 26.3",
        "RuntimeError: a real error",
        "  File \"train_loop.py\", line 3",
    ], "pid": 1, "is_err": True}, None, False)
    ray_worker.print_worker_logs({"lines": ["WARNING: 8 PYTHON worker processes have been started on node: 81 with "
                                            "address: 192.0.2.2"], "pid": "raylet", "is_err": False}, None, False)
    assert shown == [["[train] epoch 1/2 step 1/4 | loss 26.3", "RuntimeError: a real error",
                      "  File \"train_loop.py\", line 3"]]


def test_pca_colouring_separates_features_and_blacks_out_fill():
    from distillery.platform.distill.preview import pca_rgb

    grid = torch.zeros(8, 4, 6)
    grid[0, :, :3] = 5.0  # left half: one feature vector, right half: another
    grid[1, :, 3:] = 5.0
    grid += 0.01 * torch.randn_like(grid)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 0] = False
    (rgb,) = pca_rgb([grid], [mask])
    assert rgb.shape == (4, 6, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.all(rgb[0, 0] == 0)
    left, right = rgb[1:, :3].reshape(-1, 3).mean(0), rgb[:, 3:].reshape(-1, 3).mean(0)
    assert np.abs(left - right).max() > 0.5


def test_preview_picture_is_drawn(tmp_path):
    from distillery.data.sample import Sample
    from distillery.platform.distill.preview import plot_augment_preview

    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    sample = Sample.create(image, torch.tensor([[8.0, 8.0, 20.0, 30.0]]), torch.tensor([1]),
                           grid=torch.randn(16, 4, 4), image_id=5)
    path = tmp_path / "preview.png"
    plot_augment_preview([sample, sample], ["a", "b"], path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = Sample.create(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no sample has a teacher grid"):
        plot_augment_preview([plain], ["a"], tmp_path / "none.png", title="t")
