"""What a training job prints: a progress line on rank 0 every N steps or S seconds, one summary
line per epoch, and the library noise filtered out of the workers' output.

Lines are printed to stdout (Ray forwards a worker's stdout to the driver and to ``ray job
logs``), e.g.::

    [train] epoch 3/12 step 40/50 | loss 4.81 (mal 0.91 bbox 0.42 giou 1.07 fgl 1.3 ddf 0.2 dsi 0.62) | lambda 1 | 12.3 img/s | ETA epoch 0:08, run 4:12 (+ evaluation)
    [train] epoch 3/12 done in 63 s | 12.1 img/s | loss 4.7 | lambda 1 -> 0.93 | AIFI share 0.41% | AP 0.123 AP50 0.251 | best AP 0.130 (epoch 2)
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from typing import Any

from distillery.students.training import TOTAL_PARTS

__all__ = ["ProgressPrinter", "filter_ray_log_noise", "loss_terms", "quiet_driver_noise", "quiet_worker_noise",
           "WORKER_ENV"]

# Environment of the training workers: Ray Train's print patch off. It turns every print into a
# root-logger record *and* tees it to stdout (each line shown twice), and it leaks what a library
# prints inside contextlib.redirect_stdout (pycocotools' 30-line summary after every evaluation).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# Lines Ray prints on the driver that look like errors but are not: the core worker's notice
# about actors (Ray Data pools, Train's preemption watcher) whose constructor arguments live in
# the object store, the raylet's count of worker processes started, Ray's own deprecations.
_RAY_NOISE = re.compile(
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
    r"|PYTHON worker processes have been started on node"
    r"|RayDeprecationWarning: ")

# Auxiliary copies of a loss (decoder layers, denoising groups, encoder/pre outputs) are summed
# into their term for the progress line: "loss_bbox_aux_3" counts as "bbox".
_AUX_SUFFIX = re.compile(r"_(aux|dn|pre|enc)(_\d+)?.*$")


def loss_terms(parts: dict[str, float]) -> dict[str, float]:
    """Loss parts grouped by term ("loss_giou_dn_2" -> "giou"), in first-seen order."""
    terms: dict[str, float] = {}
    for name, value in parts.items():
        if not name.startswith("loss_") or name in TOTAL_PARTS:
            continue
        base = _AUX_SUFFIX.sub("", name[len("loss_"):])
        terms[base] = terms.get(base, 0.0) + float(value)
    return terms


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


class ProgressPrinter:
    """Rank 0's progress and epoch-summary lines. ``every_steps``/``every_seconds``: a line when
    either many steps or that much time passed since the last one (the first step always
    prints, so a user sees at once that training runs)."""

    def __init__(self, epochs: int, steps_per_epoch: int, *, every_steps: int, every_seconds: float,
                 world_size: int, label: str = "train", out=print, metric: str = "AP"):
        self.epochs, self.steps_per_epoch = epochs, max(1, steps_per_epoch)
        self.label = label   # the phase: "[train] epoch 3/12 ...", "[dense] epoch 1/3 ..."
        self.metric = metric   # the job's best metric (its spec's), shown with its best so far
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.world_size = world_size
        self.out = out
        self._epoch_start = self._last_line = time.perf_counter()
        self._last_step = 0

    def start_epoch_timer(self) -> None:
        self._epoch_start = self._last_line = time.perf_counter()
        self._last_step = 0
        self._first_step_end: float | None = None
        self._first_step_images = 0

    def step(self, epoch: int, step: int, images_seen: int, total: float, parts: dict[str, float],
             lam: float | None) -> None:
        """The progress line after step ``step`` (1-based) of ``epoch`` (0-based), ``images_seen``
        by this rank in the epoch so far; call it when :meth:`due`."""
        now = time.perf_counter()
        detail = " ".join(f"{k} {_fmt(v)}" for k, v in loss_terms(parts).items())
        lam_text = f" | lambda {lam:.3g}" if lam is not None else ""
        head = f"[{self.label}] epoch {epoch + 1}/{self.epochs} step {step}/{self.steps_per_epoch}"
        if self._first_step_end is None or step == 1:
            # The first step waits for the data pipeline to start: its time says nothing about speed.
            self._first_step_end, self._first_step_images = now, images_seen
            pace = f"first step after {now - self._epoch_start:.0f} s"
        else:
            elapsed = now - self._first_step_end
            rate = (images_seen - self._first_step_images) * self.world_size / max(elapsed, 1e-9)
            per_step = elapsed / max(step - 1, 1)
            left_epoch = max(self.steps_per_epoch - step, 0)
            left_run = left_epoch + (self.epochs - epoch - 1) * self.steps_per_epoch
            pace = (f"{rate:.1f} img/s | ETA epoch {_clock(left_epoch * per_step)}, "
                    f"run {_clock(left_run * per_step)} (+ evaluation)")
        self.out(f"{head} | loss {_fmt(total)} ({detail}){lam_text} | {pace}", flush=True)
        self._last_line, self._last_step = now, step

    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) of the current epoch gets a progress line."""
        return (step == 1 or step - self._last_step >= self.every_steps
                or time.perf_counter() - self._last_line >= self.every_seconds)

    def epoch_end(self, epoch: int, metrics: dict[str, Any], loss: float | None) -> None:
        """The epoch's summary line (metrics as reported: images_per_second, lambda_before,
        lambda, aifi_ratio, AP, AP50, best_AP, best_epoch, epoch_seconds)."""
        key = self.metric
        value = metrics.get(key)
        parts = [f"[{self.label}] epoch {epoch + 1}/{self.epochs} done in {metrics.get('epoch_seconds', 0):.0f} s",
                 f"{metrics.get('images_per_second', 0.0):.1f} img/s"]
        if loss is not None:
            parts.append(f"loss {_fmt(loss)}")
        if "lambda_before" in metrics and metrics.get("lambda") is not None:
            parts.append(f"lambda {metrics['lambda_before']:.3g} -> {metrics['lambda']:.3g}")
        if "aifi_ratio" in metrics:
            parts.append(f"AIFI share {100 * metrics['aifi_ratio']:.2f}%")
        if value is not None:
            parts.append(f"{key} {value:.3f}" + (f" AP50 {metrics.get('AP50', float('nan')):.3f}" if key == "AP" else ""))
        if f"best_{key}" in metrics:
            parts.append(f"best {key} {metrics[f'best_{key}']:.3f} (epoch {int(metrics['best_epoch']) + 1})")
        self.out(" | ".join(parts), flush=True)


def quiet_worker_noise() -> None:
    """Filter what only looks like trouble out of a training worker's output: deprecation
    notices of the libraries (DeepSpeed, torch, timm, pydantic), and their INFO chatter; real
    warnings (our own, numerical ones, Ray's failures) still show."""
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    try:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    except ImportError:  # pragma: no cover - older Ray
        pass
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "timm", "distillery.evaluation.coco_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # each rank's whole metrics dict per report, logged at INFO by a logger named after its file
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # pragma: no cover - another Ray layout
        pass


def quiet_driver_noise() -> None:
    """The driver's share of :func:`quiet_worker_noise`: Ray's deprecation notices and Ray
    Data's hint to write filters as expressions (ours filter by image id set: no expression)."""
    try:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    except ImportError:  # pragma: no cover - older Ray
        pass
    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn' when possible")


def filter_ray_log_noise() -> None:
    """Drop :data:`_RAY_NOISE` lines (and a dropped warning's source line) from what Ray prints
    on this driver: the workers' output and the raylet's notices both go through Ray's
    ``print_worker_logs``, which is wrapped in place, once per process (Ray has no public
    filter for it)."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # pragma: no cover - another Ray layout: nothing filtered
        return
    original = ray_worker.print_worker_logs
    if getattr(original, "filters_noise", False):
        return

    def print_worker_logs(data, *args, **kwargs):
        kept, dropped_previous = [], False
        for line in data.get("lines", []):
            # A warning's second line is its source line, indented: it goes with its warning.
            drop = bool(_RAY_NOISE.search(line)) or (dropped_previous and line.startswith("  "))
            if not drop:
                kept.append(line)
            dropped_previous = drop
        if kept:
            original({**data, "lines": kept}, *args, **kwargs)

    print_worker_logs.filters_noise = True
    ray_worker.print_worker_logs = print_worker_logs
