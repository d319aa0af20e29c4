"""The training engine every job runs on: one Ray Train worker's whole life.

:class:`Trainer` owns what all jobs share: worker set-up, restore, the lockstep batch loop (all
ranks take the same number of steps), the step (:func:`distillery.students.training.train_step`),
EMA, logging (MLflow's ``MetricsLogger``, rank 0's progress lines), BatchNorm statistics averaged
over ranks before evaluation and checkpoint, evaluation, the rank check (parameters and buffers,
EMA included) and checkpoints (:mod:`distillery.platform.engine.checkpoints`), where the EMA and
every named stateful component a job adds are saved and restored by name.

A job is its spec (:class:`~distillery.platform.engine.spec.JobSpec`), its model builder and its
hooks: a :class:`TrainingJob` subclass in the job's package. The engine imports no job: a worker
loads its job class from the path its spec put in ``train_loop_config``. A job trains in one or
more :class:`Phase` s (the MoE job: its dense base, then MoE-tuning), each with its own build,
epochs and checkpoints. The end-of-epoch hooks pass what they compute on in an :class:`EpochEnd`,
never in the job's attributes. Reading order: :meth:`Trainer.fit`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import ray.train
import torch

from distillery.platform.engine.checkpoints import (DS_TAG, CheckpointError, CheckpointRecord, EngineState,
                                                    load_engine_state, read_record, save_checkpoint_files,
                                                    set_rng_state)
from distillery.platform.engine.norm_sync import average_norm_statistics
from distillery.platform.engine.progress import ProgressPrinter, quiet_worker_noise
from distillery.platform.engine.run_spec import RunDescription, from_worker_config
from distillery.platform.engine.spec import JobSpec, load_attribute
from distillery.platform.engine.worker import (evaluate_on_ranks, gather_floats, inject_fault, seed_epoch,
                                               setup_worker, zero_local_grads)
from distillery.platform.tracking.runs import MetricsLogger
from distillery.students.ema import ModelEMA
from distillery.students.training import AuxLoss, LossTerm, StepResult, train_step

__all__ = ["Built", "EpochEnd", "Phase", "Trainer", "TrainingJob", "WorkerContext", "engine_step", "run_job",
           "train_worker"]

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Where this worker runs."""

    rank: int
    world: int
    device: torch.device
    use_gpu: bool
    logger: MetricsLogger | None  # rank 0's MLflow logger (None on other ranks, or without tracking)
    shard: Any                    # this rank's Ray Data shard of the train split


@dataclass
class Built:
    """What a job's builder hands the engine."""

    engine: Any                       # the DeepSpeed engine (deepspeed_engine)
    criterion: torch.nn.Module
    ema: ModelEMA | None = None       # evaluated instead of the model; saved as the component "ema"
    aux_loss: AuxLoss | None = None   # a job's extra loss term (the MoE load-balancing loss)
    terms: tuple[LossTerm, ...] = ()  # a job's own loss terms (teacher-based or not), after the others
    # The job's own stateful parts (state_dict / load_state_dict), saved and restored by name.
    components: dict[str, Any] = field(default_factory=dict)

    def stateful(self) -> dict[str, Any]:
        """Every named component a checkpoint holds."""
        return {**({"ema": self.ema} if self.ema is not None else {}), **self.components}


@dataclass(frozen=True)
class Phase:
    """A stretch of a job's training with its own model build (:meth:`TrainingJob.phases`).

    Phases run in order. Each counts its epochs and steps from 0 and checkpoints under its name
    (every ``checkpoint_every`` epochs and after its last), so a failure restarts from the last
    checkpoint of the phase it happened in, and a resumed run skips the phases before it. The
    run's result is its last phase: an earlier phase's metrics are logged and reported under
    ``<name>/`` and never count as the run's best (its spec's ``best_metric``)."""

    name: str
    epochs: int
    build: Callable[[bool], Built]       # build(restoring): a checkpoint of this phase will be loaded
    max_steps: int | None = None         # micro-steps in all (its last epoch shorter); None: whole epochs
    eval_every: int | None = None        # evaluate every n epochs and after the last; None: never
    checkpoint_every: int = 1            # checkpoint every n epochs and after the last (others report nothing)

    def evaluates(self, epoch: int) -> bool:
        return self.eval_every is not None and self._every(self.eval_every, epoch)

    def checkpoints(self, epoch: int) -> bool:
        return self._every(self.checkpoint_every, epoch)

    def _every(self, n: int, epoch: int) -> bool:
        return (epoch + 1) % n == 0 or epoch + 1 == self.epochs


@dataclass
class EpochEnd:
    """One epoch's end as the end-of-epoch hooks see it, in their order (:meth:`Trainer.end_epoch`):
    what one hook computes for a later one is put here, made fresh each epoch, and not kept in the
    job's attributes."""

    phase: Phase
    epoch: int
    global_step: int
    evaluating: bool
    metrics: dict[str, Any]
    model: torch.nn.Module                  # evaluated and saved: the EMA's, the engine's or before_evaluation's
    outputs: dict[str, Any] = field(default_factory=dict)   # the job's own values for its later hooks


class TrainingJob(ABC):
    """A job on the engine: its spec, its model builder and its hooks. A job must say how it
    builds its model and its batches; the other hooks' defaults do nothing."""

    spec: ClassVar[JobSpec]

    def __init__(self, cfg, run: RunDescription, ctx: WorkerContext):
        self.cfg, self.run, self.ctx = cfg, run, ctx

    @abstractmethod
    def build(self, restoring: bool) -> Built:
        """Model, loss, optimizer, DeepSpeed engine (``restoring``: a checkpoint will be loaded)."""

    def phases(self) -> list[Phase]:
        """The job's phases, in order: by default one, ``train``, of ``train.epochs`` epochs built by
        :meth:`build`."""
        return [Phase("train", self.cfg.train.epochs, self.build, eval_every=self.cfg.train.eval_every)]

    def end_phase(self, phase: Phase, built: Built) -> None:
        """After a phase's last epoch (also when a run resumes at that epoch's checkpoint): what the
        next phase builds on. Every rank calls it."""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """The model's square input side (training and evaluation)."""

    def micro_steps_per_epoch(self) -> int:
        """Step batches (micro-steps) of a whole epoch: the optimizer steps x gradient accumulation."""
        return self.run.steps_per_epoch * self.cfg.deepspeed.gradient_accumulation_steps

    @abstractmethod
    def step_batches(self, epoch: int, max_steps: int | None = None) -> Iterator[dict[str, Any]]:
        """This rank's step batches of ``epoch`` (``images``, ``targets``, teacher signal...), in
        lockstep with the other ranks (:func:`~distillery.platform.engine.worker.lockstep`), at
        most ``max_steps`` of them (a phase's shorter last epoch)."""

    def train_step(self, built: Built, batch: dict[str, Any]) -> StepResult:
        """One micro-step through the DeepSpeed engine (a job with a gradient hook passes it here)."""
        return engine_step(built.engine, built.criterion, batch, aux_loss=built.aux_loss, terms=built.terms)

    def step_values(self) -> dict[str, float]:
        """The job's own values of the current step: logged as ``train/<name>`` (``lambda`` is
        also shown in the progress line)."""
        return {}

    def end_of_epoch(self, epoch: int) -> dict[str, Any]:
        """The epoch's last step has run, on every rank (collectives allowed): the job's own
        epoch-end update and the metrics it adds."""
        return {}

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """COCO AP of ``model`` on the val split (sharded over ranks; every rank gets the metrics)."""
        run, ctx = self.run, self.ctx
        return evaluate_on_ranks(model, run.val_annotations, run.val_images, self.input_size,
                                 self.cfg.train.eval_batch_size, ctx.rank, ctx.world, ctx.device)

    def on_restore(self, built: Built, directory: str, record: CheckpointRecord) -> None:
        """Called after the engine restored a checkpoint into ``built`` (its directory still open)."""

    def start_metrics(self, built: Built) -> dict[str, float]:
        """Logged once at step 0 of a fresh run."""
        return {}

    def before_evaluation(self, built: Built, end: EpochEnd) -> None:
        """After the norm statistics agree, before evaluation: may replace ``end.model`` (what is
        evaluated and saved; the EMA's module if there is one, else the engine's)."""

    def after_evaluation(self, end: EpochEnd) -> None:
        """``end.metrics`` hold the evaluation's (when ``end.evaluating``): add the job's own."""

    def shared_parameters(self, module: torch.nn.Module) -> Iterator[torch.Tensor]:
        """The parameters every rank holds alike (all of them under data parallelism)."""
        return module.parameters()

    def rank_values(self, built: Built, end: EpochEnd) -> dict[str, float]:
        """Extra per-rank values for the rank check (a collective when it runs the model)."""
        return {}

    def record(self, end: EpochEnd, ranks: dict[str, list]) -> CheckpointRecord:
        return self.spec.record_class(epoch=end.epoch, global_step=end.global_step, metrics=end.metrics, ranks=ranks)

    def write_files(self, directory: str, built: Built, end: EpochEnd) -> None:
        """The job's own files of a checkpoint (rank 0 and others alike: check ``ctx.rank``)."""

    def close(self) -> None:
        """After the last epoch."""

    def metric_name(self, key: str) -> str:
        """The MLflow name of an epoch metric."""
        return key if key == "epoch" else f"epoch/{key}"


class Trainer:
    """One worker's training run: :meth:`fit`."""

    def __init__(self, job: TrainingJob):
        self.job, self.cfg, self.ctx = job, job.cfg, job.ctx
        self.phases: list[Phase] = []
        self.phase: Phase | None = None
        self.phase_index = 0
        self.start_epoch, self.global_step = 0, 0   # within the phase
        self.best: tuple[float, int] | None = None   # (best value of the spec's best_metric so far, its epoch)
        self.built: Built | None = None

    # ------------------------------------------------------------------ the run

    def fit(self) -> None:
        checkpoint = self._checkpoint_to_restore()
        self.phases = phases = self.job.phases()
        record = None
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                record = read_record(directory, self.job.spec)
        first = self._phase_to_restore(checkpoint, record, phases) if record is not None else 0
        for index in range(first, len(phases)):
            self.phase, self.phase_index = phases[index], index
            self.start_epoch, self.global_step, self.best = 0, 0, None
            restoring = record is not None and index == first
            self.built = self.phase.build(restoring)
            if restoring:
                self.restore(checkpoint, record)
            elif index == 0 and self.ctx.logger is not None and (start := self.job.start_metrics(self.built)):
                self.ctx.logger.log(start, step=0)
            progress = self._progress()
            for epoch in range(self.start_epoch, self.phase.epochs):
                metrics = self.train_epoch(epoch, progress)
                self.end_epoch(epoch, metrics, progress)
            self.job.end_phase(self.phase, self.built)
        if self.ctx.logger is not None:
            self.ctx.logger.flush()
        self.job.close()

    @property
    def final_phase(self) -> bool:
        return self.phase_index == len(self.phases) - 1

    def _prefix(self, default: str) -> str:
        """Metric names of the last phase keep ``default``; an earlier phase's are ``<phase>/``."""
        return default if self.final_phase else f"{self.phase.name}/"

    def _checkpoint_to_restore(self):
        checkpoint = ray.train.get_checkpoint()   # after a worker failure
        if checkpoint is None and self.job.run.resume_checkpoint:
            checkpoint = ray.train.Checkpoint(self.job.run.resume_checkpoint)
        return checkpoint

    def _phase_to_restore(self, checkpoint, record: CheckpointRecord, phases: list[Phase]) -> int:
        """The index of the phase ``checkpoint`` (its ``record``) was written in (records without one: the last)."""
        if record.phase is None:
            return len(phases) - 1
        names = [p.name for p in phases]
        if record.phase not in names:
            raise CheckpointError(f"checkpoint {checkpoint.path} was written in phase {record.phase!r}, which "
                                  f"this run does not have (its phases: {', '.join(names)})")
        return names.index(record.phase)

    def restore(self, checkpoint, record: CheckpointRecord) -> None:
        built = self.built
        with checkpoint.as_directory() as directory:
            load_path, _ = built.engine.load_checkpoint(directory, tag=DS_TAG)
            if load_path is None:
                raise CheckpointError(f"checkpoint {checkpoint.path} has no DeepSpeed checkpoint '{DS_TAG}'")
            state, rng = load_engine_state(directory, self.ctx.rank)
            for name, component in built.stateful().items():
                if name in state.components:
                    component.load_state_dict(state.components[name])
                else:   # a run that had none (a teacher added on resume): this one starts fresh
                    log.warning("checkpoint %s holds no %s state: %s starts fresh", checkpoint.path, name, name)
            self.start_epoch, self.global_step = state.epoch + 1, state.global_step
            self.best = _restored_best(record.metrics, self.job.spec.best_metric)
            self.job.on_restore(built, directory, record)
        if rng is not None:
            set_rng_state(rng)
        log.info("rank %d resumed from %s at phase %s, epoch %d (step %d)", self.ctx.rank, checkpoint.path,
                 self.phase.name, self.start_epoch, self.global_step)

    def _progress(self) -> ProgressPrinter | None:
        if self.ctx.rank != 0:
            return None
        t = self.cfg.train
        return ProgressPrinter(self.phase.epochs, self.job.micro_steps_per_epoch(), every_steps=t.progress_every,
                               every_seconds=t.progress_seconds, world_size=self.ctx.world, label=self.phase.name,
                               metric=self.job.spec.best_metric)

    # ------------------------------------------------------------------ one epoch

    def train_epoch(self, epoch: int, progress: ProgressPrinter | None) -> dict[str, Any]:
        engine = self.built.engine
        engine.train()
        # Every epoch draws from RNGs seeded by (seed, rank, epoch) alone (the job's own, such as
        # the augmenter's, in its step_batches): a run resumed at this epoch draws the same.
        seed_epoch(self.cfg.train.seed, self.ctx.rank, epoch)
        t_epoch = time.perf_counter()
        if progress is not None:
            progress.start_epoch_timer()
        steps, images_seen = 0, 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)  # on device: no per-step sync
        for batch in self._epoch_batches(epoch):
            result = self.step(batch)
            steps += 1
            images_seen += len(batch["images"])
            self.global_step += 1
            loss_sum += result.total.detach().double()
            if progress is not None and progress.due(steps):
                progress.step(epoch, steps, images_seen, float(result.total.detach()), result.as_floats(),
                              self.job.step_values().get("lambda"))
            self._log_step(result)
            self._maybe_kill()
        if steps == 0:
            raise RuntimeError(f"epoch {epoch}: no training batch (the train split is smaller than "
                               f"train.batch_size x train.num_workers)")
        seconds = time.perf_counter() - t_epoch
        return {"epoch": epoch, "global_step": self.global_step, "epoch_seconds": seconds,
                "images_per_second": images_seen * self.ctx.world / max(seconds, 1e-9),
                "mean_loss": float(loss_sum) / steps}

    def _epoch_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The job's step batches of ``epoch``, at most the phase's ``max_steps`` in all."""
        if self.phase.max_steps is None:
            return self.job.step_batches(epoch)
        left = self.phase.max_steps - epoch * self.job.micro_steps_per_epoch()
        return self.job.step_batches(epoch, max_steps=max(left, 0))

    def step(self, batch: dict[str, Any]) -> StepResult:
        """One micro-step through the DeepSpeed engine; the EMA follows each optimizer step."""
        b = self.built
        engine = b.engine
        result = self.job.train_step(b, batch)
        if b.ema is not None and (engine.is_gradient_accumulation_boundary()
                                  or self.cfg.deepspeed.gradient_accumulation_steps == 1):
            b.ema.update(engine.module)
        return result

    def _log_step(self, result: StepResult) -> None:
        logger = self.ctx.logger
        if logger is None or self.global_step % self.cfg.train.log_every != 0:
            return
        prefix = self._prefix("train/")
        metrics = {f"{prefix}{k}": v for k, v in result.as_floats().items()}
        metrics[f"{prefix}lr"] = self.built.engine.get_lr()[0]
        metrics.update({f"{prefix}{k}": v for k, v in self.job.step_values().items()})
        logger.log(metrics, self.global_step)

    def _maybe_kill(self) -> None:
        for kill in self.cfg.debug.kills():
            phase = kill.phase or self.phases[-1].name
            if phase == self.phase.name and self.ctx.rank == kill.rank and self.global_step == kill.step:
                if self.ctx.logger is not None:
                    self.ctx.logger.flush()
                inject_fault(self.job.run.run_storage, kill.phase)

    # ------------------------------------------------------------------ the end of an epoch

    def end_epoch(self, epoch: int, metrics: dict[str, Any], progress: ProgressPrinter | None) -> None:
        b, job = self.built, self.job
        mean_loss = metrics.pop("mean_loss")
        metrics.update(job.end_of_epoch(epoch))
        # One set of BatchNorm statistics for every rank before they evaluate and checkpoint.
        average_norm_statistics(b.engine.module, *([b.ema.module] if b.ema is not None else []))
        end = EpochEnd(self.phase, epoch, self.global_step, self.phase.evaluates(epoch), metrics,
                       b.ema.module if b.ema is not None else b.engine.module)
        job.before_evaluation(b, end)
        if end.evaluating:
            metrics.update(job.evaluate(end.model))
        job.after_evaluation(end)
        if self.final_phase:
            key = job.spec.best_metric
            self.best = _best_so_far(self.best, metrics.get(key), epoch)
            if self.best is not None:
                metrics[f"best_{key}"], metrics["best_epoch"] = self.best
        if progress is not None:
            progress.epoch_end(epoch, metrics, mean_loss)
        checkpointing = self.phase.checkpoints(epoch)
        if self.ctx.logger is not None:
            self.ctx.logger.log({self._metric_name(k): v for k, v in metrics.items()
                                 if isinstance(v, (int, float))}, epoch)
            if checkpointing:
                self.ctx.logger.flush()
        if checkpointing:   # an epoch without a checkpoint reports nothing to Ray Train (a phase's inner epochs)
            self.save(end, self.rank_consistency(end))

    def _metric_name(self, key: str) -> str:
        return self.job.metric_name(key) if self.final_phase else f"{self.phase.name}/{key}"

    def rank_consistency(self, end: EpochEnd) -> dict[str, list]:
        """Every rank's float64 checksums of its shared weights, its buffers (BatchNorm running
        statistics) and its EMA copy's and the job's own values, gathered: they must agree across
        ranks (the checkpoint records them; the tests compare them)."""
        b = self.built
        values: dict[str, float] = {}
        with torch.no_grad():
            values["weights_checksum"] = _checksum(self.job.shared_parameters(b.engine.module))
            values["buffers_checksum"] = _checksum(b.engine.module.buffers())
            if b.ema is not None:
                values["ema_weights_checksum"] = _checksum(b.ema.module.parameters())
                values["ema_buffers_checksum"] = _checksum(b.ema.module.buffers())
        values.update(self.job.rank_values(b, end))
        gathered = gather_floats(list(values.values()), self.ctx.device)
        return {k: [float(part[i]) for part in gathered] for i, k in enumerate(values)}

    def save(self, end: EpochEnd, ranks: dict[str, list]) -> None:
        """One Ray Train checkpoint: every rank's DeepSpeed files and RNG states, rank 0's engine
        state and record (its phase named), the job's files; reported with the epoch's metrics."""
        b = self.built
        state = EngineState(end.epoch, self.global_step, {name: c.state_dict() for name, c in b.stateful().items()})
        record = self.job.record(end, ranks)
        record.phase, record.phase_index = self.phase.name, self.phase_index
        with tempfile.TemporaryDirectory() as tmp:
            b.engine.save_checkpoint(tmp, tag=DS_TAG)
            save_checkpoint_files(tmp, self.ctx.rank, state, record, self.job.spec.name)
            self.job.write_files(tmp, b, end)
            ray.train.report(self._reported(end.metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def _reported(self, metrics: dict[str, Any]) -> dict[str, float]:
        """What Ray Train gets: the numbers, under ``<phase>/`` before the last phase."""
        prefix = self._prefix("")
        return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def engine_step(engine, criterion: torch.nn.Module, batch: dict[str, Any], **step_options) -> StepResult:
    """:func:`~distillery.students.training.train_step` through a DeepSpeed engine; a gradient
    hook among ``step_options`` reads this rank's ZeRO gradient partition at accumulation
    boundaries."""
    return train_step(engine, criterion, batch, backward=engine.backward, step=engine.step,
                      grads=lambda: zero_local_grads(engine), at_boundary=engine.is_gradient_accumulation_boundary,
                      **step_options)


def _checksum(tensors) -> float:
    """float64 sum of ``tensors`` (0 for none)."""
    values = [t.detach().double().sum() for t in tensors]
    return float(torch.stack(values).sum()) if values else 0.0


def _best_so_far(best: tuple[float, int] | None, value: Any, epoch: int) -> tuple[float, int] | None:
    """The best value of the job's best metric so far and its epoch, after this epoch's ``value``
    (NaN and absent values do not count)."""
    if isinstance(value, float) and value == value and (best is None or value > best[0]):
        return value, epoch
    return best


def _restored_best(metrics: dict[str, Any], key: str) -> tuple[float, int] | None:
    if f"best_{key}" in metrics and "best_epoch" in metrics:
        return float(metrics[f"best_{key}"]), int(metrics["best_epoch"])
    return None


def train_worker(config: dict[str, Any]) -> None:
    """Every job's Ray Train entry point: the job class named in ``train_loop_config``
    (:func:`~distillery.platform.engine.run_spec.worker_config`), run by :func:`run_job`."""
    run_job(load_attribute(config["job"]), config)


def run_job(job_class: type[TrainingJob], config: dict[str, Any]) -> None:
    """A Ray Train worker: set up, build ``job_class`` from ``train_loop_config``, train."""
    cfg, run = from_worker_config(config, job_class.spec)
    rank, world, device, use_gpu = setup_worker(cfg)
    quiet_worker_noise()
    logger = MetricsLogger(run.tracking_uri, run.run_id) if rank == 0 and run.run_id else None
    shard = ray.train.get_dataset_shard("train")
    job = job_class(cfg, run, WorkerContext(rank, world, device, use_gpu, logger, shard))
    Trainer(job).fit()
