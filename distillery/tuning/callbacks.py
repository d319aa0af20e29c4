"""The sweep's Ray callbacks, in a module of their own: Ray Train's controller unpickles
:class:`BestSoFarReport` and so imports its module, and this one loads nothing beyond Ray Tune
(not the job drivers, torch or MLflow that the sweep driver imports)."""

from __future__ import annotations

import logging
import os
import signal

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

__all__ = ["BestSoFarReport", "InterruptAfter", "best_metric_name"]

log = logging.getLogger(__name__)


def best_metric_name(metric: str) -> str:
    """What Tune ranks trials by: a metric's best value over the epochs so far (``best_AP``), so
    that Tune, the results table and the registry all judge a trial by its best epoch (the
    checkpoint it exports), never by its last one."""
    return f"best_{metric}"


class BestSoFarReport(TuneReportCallback):
    """Ray Train callback forwarding every epoch's report to Tune (``TuneReportCallback``) with
    ``best_<metric>`` added: the best value of the metric reported so far in this trial."""

    def __init__(self, metric: str, mode: str):
        super().__init__()
        self.metric, self.mode = metric, mode
        self.best: float | None = None

    def after_report(self, run_context, metrics, checkpoint):
        value = metrics[0].get(self.metric) if metrics else None
        if isinstance(value, (int, float)) and value == value and (
                self.best is None or (value > self.best if self.mode == "max" else value < self.best)):
            self.best = float(value)
        if self.best is not None:
            metrics = [{**metrics[0], best_metric_name(self.metric): self.best}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


class InterruptAfter(Callback):
    """Tune callback for ``debug.interrupt_after_trials``: a Ctrl+C once N trials ran to their end."""

    def __init__(self, n: int):
        self.n = n
        self.done = 0
        # Tune pickles callbacks with the experiment and Tuner.restore brings them back:
        # the simulated Ctrl+C belongs to the driver that asked for it, not to a --resume.
        self.pid = os.getpid()

    def on_trial_complete(self, iteration, trials, trial, **info):
        if os.getpid() != self.pid or not trial.last_result.get("done"):  # (ASHA-stopped: not done)
            return
        self.done += 1
        if self.done == self.n:
            log.warning("debug.interrupt_after_trials=%d: interrupting the sweep", self.n)
            os.kill(os.getpid(), signal.SIGINT)
