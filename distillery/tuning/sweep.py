"""The sweep driver: Ray Tune over the distillation (or MoE-tuning) job, one MLflow child run per trial.

Ray 2.60's pattern for Train V2: each Tune trial runs a *driver function* that launches the job's
``TorchTrainer``; ``TuneReportCallback`` forwards every epoch's report (with val AP) to Tune, so
ASHA can stop a poor trial after any epoch. The trial function calls the very same ``run_*``
function the job's CLI calls, so a trial is exactly a job run with some keys changed.

State that must survive a restart lives in ``<storage>/<name>/distillery_sweep.json`` (parent run
id, calibration result); ``--resume`` restores Tune's experiment (finished trials are kept, the
interrupted ones run again) and continues the same MLflow parent run.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from typing import Any, Callable

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from distillery.platform.cluster.runtime import ray_session
from distillery.platform.config.sections import absolute_uri, flatten_config, load_config, with_absolute_paths
from distillery.platform.distill.driver import prepare_inputs, resolve_gam
from distillery.platform.distill.teacher_signal import teacher_signal
from distillery.platform.io import storage
from distillery.platform.jobs import job_spec
from distillery.platform.tracking.runs import create_run, finish_sweep_runs, resolve_tracking_uri, tracking_reachable
from distillery.tuning.callbacks import BestSoFarReport, InterruptAfter, best_metric_name
from distillery.tuning.report import finish_sweep
from distillery.tuning.space import ParamSpec, check_space, to_tune_space, trial_overrides
from distillery.tuning.sweep_config import SweepConfig

__all__ = ["SWEEP_STATE", "calibrate_gam", "job_entry", "run_sweep"]

log = logging.getLogger(__name__)

SWEEP_STATE = "distillery_sweep.json"
_DELTA_FRACTION = "gam.delta_fraction"  # a sweep-only key: gam.delta = fraction * gam.rho


def job_entry(job: str) -> tuple[type, Callable[..., dict[str, Any]]]:
    """(config model, run function) of a registered job (``distillery.platform.jobs``)."""
    try:
        spec = job_spec(job)
    except ValueError as exc:
        raise ValueError(f"trial.job: {exc}") from None
    return spec.config_class, spec.run_function()


def _absolute_path_overrides(job_cfg) -> list[str]:
    """Overrides pinning the job config's relative local paths to the driver's directory (Tune
    runs each trial in a directory of its own)."""
    before, after = flatten_config(job_cfg), flatten_config(with_absolute_paths(job_cfg))
    return [f"{k}={v}" for k, v in after.items() if before.get(k) != v]


# ----------------------------------------------------------------------------- gam: auto
def calibrate_gam(cfg: SweepConfig, tracking_uri: str, parent_run_id: str, run_storage: str) -> dict[str, float]:
    """Train once at a fixed DSI weight and measure the AIFI share of the gradient L1 norm.

    The maintainers' manual recipe, automated: with ``stop_epoch=0`` and ``lambda0 =
    default_weight`` GAM never moves lambda but still measures the share every epoch; the mean
    over the calibration epochs becomes the centre of the sweep's rho range.
    """
    model, run = job_entry(cfg.trial.job)
    base = load_config(model, cfg.trial.config, cfg.trial.overrides)
    weight = cfg.sweep.gam_auto.fixed_lambda or resolve_gam(base)["default_weight"]
    epochs = cfg.sweep.gam_auto.calibration_epochs
    overrides = [*cfg.trial.overrides, f"train.epochs={epochs}", f"gam.lambda0={weight}",
                 f"gam.default_weight={weight}", "gam.stop_epoch=0", "gam.enabled=true",
                 f"optim.no_aug_epochs={min(base.optim.no_aug_epochs, epochs)}",
                 *_tracking_overrides(cfg, tracking_uri), "output.name=calibration",
                 f"output.storage_path={run_storage}", "tracking.log_model=false"]
    job_cfg = load_config(model, cfg.trial.config, overrides)
    summary = run(job_cfg, parent_run_id=parent_run_id, extra_tags={"distillery.sweep_role": "calibration"})
    history = summary.get("gam_history") or []
    shares = [h["ratio"] for h in history if isinstance(h.get("ratio"), float) and math.isfinite(h["ratio"])
              and h["ratio"] > 0]
    if not shares:
        raise RuntimeError(f"gam auto: the calibration run {summary['run_id']} measured no AIFI share "
                           "(is the teacher on? teacher_mode must not be 'none')")
    share = sum(shares) / len(shares)
    log.info("gam auto: AIFI share %.5f at fixed lambda %.3g over %d epochs", share, weight, len(shares))
    return {"aifi_share": share, "fixed_lambda": weight, "calibration_run_id": summary["run_id"]}


def _auto_space(cfg: SweepConfig, share: float) -> dict[str, ParamSpec]:
    spread = cfg.sweep.gam_auto.rho_spread
    lo, hi = cfg.sweep.gam_auto.delta_fraction
    return {"gam.rho": ParamSpec(type="uniform", low=share * (1 - spread), high=min(share * (1 + spread), 0.999)),
            _DELTA_FRACTION: ParamSpec(type="uniform", low=lo, high=hi)}


# ----------------------------------------------------------------------------- one trial
def _tracking_overrides(cfg: SweepConfig, tracking_uri: str) -> list[str]:
    return [f"tracking.tracking_uri={tracking_uri}", f"tracking.experiment={cfg.tracking.experiment}"]


def _trial_params(params: dict[str, Any]) -> dict[str, Any]:
    """Tune's sampled values as job-config keys (the delta fraction becomes gam.delta)."""
    params = dict(params)
    if _DELTA_FRACTION in params:
        params["gam.delta"] = params.pop(_DELTA_FRACTION) * params["gam.rho"]
    return params


def _run_trial(params: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """Tune's trainable: one job run with this trial's values, reporting every epoch to Tune."""
    cfg = SweepConfig.model_validate(sweep["config"])
    trial_id = tune.get_context().get_trial_id()
    finished = _finished_trial_run(sweep, trial_id)
    if finished is not None:
        # The trial's job ran to its end before an interruption reached Tune: report that run's
        # final epoch instead of training again (and opening a second MLflow run for the trial).
        log.info("trial %s already finished as MLflow run %s: not run again", trial_id, finished["run_id"])
        tune.report({**finished["metrics"], **_best_of_run(sweep["tracking_uri"], finished["run_id"],
                                                           cfg.sweep.metric, cfg.sweep.mode)})
        return
    model, run = job_entry(cfg.trial.job)
    overrides = [*cfg.trial.overrides, *trial_overrides(_trial_params(params)),
                 *_tracking_overrides(cfg, sweep["tracking_uri"]),
                 # A re-run after an interruption gets a new name (its old Train run stays as it was).
                 f"output.name=trial-{trial_id}-{uuid.uuid4().hex[:6]}",
                 f"output.storage_path={sweep['trials_storage']}"]
    job_cfg = load_config(model, cfg.trial.config, overrides)
    run(job_cfg, callbacks=[BestSoFarReport(cfg.sweep.metric, cfg.sweep.mode)], parent_run_id=sweep["parent_run_id"],
        extra_tags={"distillery.sweep_id": sweep["sweep_id"], "distillery.trial_id": trial_id,
                    "distillery.sweep_role": "trial"})


def _best_of_run(tracking_uri: str, run_id: str, metric: str, mode: str) -> dict[str, float]:
    values = [m.value for m in MlflowClient(tracking_uri).get_metric_history(run_id, f"epoch/{metric}")
              if m.value == m.value]
    return {best_metric_name(metric): (max if mode == "max" else min)(values)} if values else {}


def _finished_trial_run(sweep: dict[str, Any], trial_id: str) -> dict[str, Any] | None:
    """The FINISHED MLflow child run of this trial, if an earlier attempt completed it: its run id
    and the last epoch's metrics under the names the job reports to Tune."""
    client = MlflowClient(sweep["tracking_uri"])
    experiment = client.get_run(sweep["parent_run_id"]).info.experiment_id
    runs = client.search_runs([experiment], filter_string=(
        f"tags.`mlflow.parentRunId` = '{sweep['parent_run_id']}' and tags.`distillery.trial_id` = '{trial_id}' "
        "and attributes.status = 'FINISHED'"), max_results=1)
    if not runs:
        return None
    run = runs[0]
    metrics = {k[len("epoch/"):]: v for k, v in run.data.metrics.items() if k.startswith("epoch/")}
    if "epoch" in run.data.metrics:
        metrics["epoch"] = run.data.metrics["epoch"]
    return {"run_id": run.info.run_id, "metrics": metrics}


# ----------------------------------------------------------------------------- the sweep
def _trial_cpus(job_cfg) -> float:
    """Logical CPUs one trial holds: its training workers, plus three for its Ray Data ingest (file
    listing, parquet read, decode actor). Concurrent trials that share fewer CPUs than this can
    deadlock, each holding part of what the other's ingest waits for."""
    return job_cfg.train.num_workers * job_cfg.train.cpus_per_worker + 3


def run_sweep(cfg: SweepConfig | None = None, resume: str | None = None) -> dict[str, Any]:
    """Run (or, with ``resume``=the sweep's path, continue) a sweep; return its summary."""
    t0 = time.time()
    if cfg is not None:
        storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)  # before the first storage access
    if resume:
        state_uri = storage.join(absolute_uri(resume), SWEEP_STATE)
        if not storage.exists(state_uri):
            raise FileNotFoundError(f"--resume {resume}: no sweep there ({SWEEP_STATE} not found)")
        state = json.loads(storage.read_bytes(state_uri))
        cfg = SweepConfig.model_validate(state["config"])
        cfg.debug.interrupt_after_trials = None  # a test's simulated Ctrl+C is not part of the sweep
    else:
        if cfg is None:
            raise ValueError("run_sweep: give a config or resume=<sweep path>")
        cfg = with_absolute_paths(cfg)
        model, _ = job_entry(cfg.trial.job)
        cfg.trial.overrides += _absolute_path_overrides(load_config(model, cfg.trial.config, cfg.trial.overrides))
        state = None

    model, _ = job_entry(cfg.trial.job)
    base = load_config(model, cfg.trial.config, cfg.trial.overrides)
    if cfg.sweep.gam == "space" or cfg.sweep.space:
        check_space(cfg.sweep.space, model, cfg.trial.config, cfg.trial.overrides)
    if cfg.sweep.gam == "auto" and not teacher_signal(base).needs_teacher:
        raise ValueError("sweep.gam=auto needs a teacher: the trial job has teacher_mode=none")
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output.local_dir)
    tracking_reachable(tracking_uri)

    name = (state or {}).get("name") or cfg.sweep.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    sweep_path = storage.join(cfg.sweep.storage_path, name)
    trials_storage = storage.join(sweep_path, "trials")
    per_trial = _trial_cpus(base)
    # A local instance gets room for the configured concurrency (2 trials by default).
    with ray_session(cfg.ray, cfg.storage, min_local_cpus=(cfg.sweep.max_concurrent_trials or 2) * per_trial):
        # Inputs once, before trials start (concurrent trials must not race to build the cache).
        prepare_inputs(base)
        if state is None:
            sweep_id = uuid.uuid4().hex[:12]
            params = flatten_config(cfg)
            parent = create_run(tracking_uri, cfg.tracking.experiment, name, params,
                                tags={"distillery.sweep_id": sweep_id, "distillery.sweep_path": sweep_path,
                                      "distillery.sweep_role": "parent", "distillery.trial_job": cfg.trial.job})
            state = {"name": name, "sweep_id": sweep_id, "parent_run_id": parent, "tracking_uri": tracking_uri,
                     "config": cfg.model_dump(mode="json"), "calibration": None}
            storage.write_bytes(storage.join(sweep_path, SWEEP_STATE), json.dumps(state, indent=1).encode())
        else:
            MlflowClient(tracking_uri).update_run(state["parent_run_id"], status="RUNNING")
        parent = state["parent_run_id"]
        # Runs left RUNNING by an interrupted earlier attempt are closed before new ones start.
        finish_sweep_runs(tracking_uri, parent, "KILLED", reason="sweep was interrupted")

        space = dict(cfg.sweep.space)
        if cfg.sweep.gam == "auto":
            if state.get("calibration") is None:
                state["calibration"] = calibrate_gam(cfg, tracking_uri, parent, trials_storage)
                storage.write_bytes(storage.join(sweep_path, SWEEP_STATE),
                                           json.dumps(state, indent=1).encode())
            space.update(_auto_space(cfg, state["calibration"]["aifi_share"]))

        sweep_info = {"config": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "parent_run_id": parent,
                      "sweep_id": state["sweep_id"], "trials_storage": trials_storage}
        trainable = tune.with_resources(tune.with_parameters(_run_trial, sweep=sweep_info), {"CPU": 0.01})
        tuner = _make_tuner(cfg, trainable, space, sweep_path, per_trial, resume=bool(resume))
        interrupted = False
        try:
            results = tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
            results = None
        if results is None or _was_interrupted(results, _expected_trials(cfg, space)):
            interrupted = True
        if interrupted:
            finish_sweep_runs(tracking_uri, parent, "KILLED", reason="sweep was interrupted")
            MlflowClient(tracking_uri).set_terminated(parent, "KILLED")
            return {"interrupted": True, "sweep_path": sweep_path, "parent_run_id": parent,
                    "resume": f"python jobs/sweep.py --resume {sweep_path}"}

        summary = finish_sweep(cfg, results, state, tracking_uri, sweep_path, base.train.epochs)
    summary["wall_seconds"] = round(time.time() - t0, 1)
    return summary


def _expected_trials(cfg: SweepConfig, space: dict[str, ParamSpec]) -> int:
    grid = math.prod(len(p.values) for p in space.values() if p.type == "grid")
    return cfg.sweep.num_samples * grid


def _was_interrupted(results, expected: int) -> bool:
    """Tune returns normally after a graceful Ctrl+C: some trials are then unfinished or unborn."""
    return results.num_terminated + results.num_errors < len(results) or len(results) < expected


def _make_tuner(cfg: SweepConfig, trainable, space: dict[str, ParamSpec], sweep_path: str, per_trial: float,
                resume: bool):
    s = cfg.sweep
    if s.scheduler.type == "asha":
        model, _ = job_entry(cfg.trial.job)
        epochs = load_config(model, cfg.trial.config, cfg.trial.overrides).train.epochs
        # max_t one past the last epoch: ASHA stops a trial that reaches max_t as soon as it
        # reports, which would cut off the job's own ending (best-model export to MLflow).
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1,
                                  grace_period=min(s.scheduler.grace_period, epochs),
                                  reduction_factor=s.scheduler.reduction_factor)
    else:
        scheduler = None
    search_alg = None
    if s.search == "optuna":
        search_alg = OptunaSearch(seed=s.seed)
    concurrent = s.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    callbacks = [InterruptAfter(cfg.debug.interrupt_after_trials)] if cfg.debug.interrupt_after_trials else []
    parent_dir, name = sweep_path.rstrip("/").rsplit("/", 1)
    run_config = tune.RunConfig(name=name, storage_path=None if storage.has_protocol(parent_dir) else parent_dir,
                                callbacks=callbacks, verbose=1)
    if storage.has_protocol(parent_dir):
        run_config.storage_path = storage.filesystem(parent_dir)[1]
        run_config.storage_filesystem = storage.pyarrow_filesystem(parent_dir)
    restorable = resume and tune.Tuner.can_restore(
        storage.filesystem(sweep_path)[1] if storage.has_protocol(sweep_path) else sweep_path,
        storage_filesystem=run_config.storage_filesystem)
    if restorable:
        # Finished trials keep their results; unfinished and errored ones run again.
        log.info("restoring the Tune experiment at %s", sweep_path)
        restore_path = storage.filesystem(sweep_path)[1] if storage.has_protocol(sweep_path) else sweep_path
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=True, storage_filesystem=run_config.storage_filesystem)
    return tune.Tuner(trainable, param_space=to_tune_space(space),
                      tune_config=tune.TuneConfig(metric=best_metric_name(s.metric), mode=s.mode,
                                                  num_samples=s.num_samples,
                                                  scheduler=scheduler, search_alg=search_alg,
                                                  max_concurrent_trials=concurrent,
                                                  # A trial's driver process is reused by the next
                                                  # one: no fresh interpreter importing torch, Ray
                                                  # Train and MLflow per trial.
                                                  reuse_actors=True),
                      run_config=run_config)
