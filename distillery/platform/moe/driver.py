"""Dynamic-DINO MoE-tuning job: dense open-vocabulary detector -> fine-grained MoE, trained with expert parallelism.

``run_moe_tune(cfg)`` is what ``jobs/moe_tune.py`` calls. Reading order:

Driver (:class:`MoETuneDriver`, its steps in the engine's set-up
:func:`~distillery.platform.engine.driver.run_training_job`)
    1. prompt vocabulary (dataset category names or a vocabulary file) and its phrase
       embeddings, computed once here (:class:`~distillery.students.phrase_cache.PhraseEmbeddingCache`);
       the text encoder never runs in the workers;
    2. the dense base: a checkpoint (file, checkpoint directory, run path or ``models:/``
       registry URI; :func:`load_base_state`) loaded into the detector *on the driver*, so a wrong
       file fails before any worker starts, and staged into the run storage as one safetensors
       file every worker loads; or none, and the workers train it first (``base.dense_steps``);
    3. its tags of the one MLflow run, its run description for Ray Train's workers; afterwards
       the best checkpoint's consolidated weights, the expert analysis figures and the config
       are logged to the run.

The workers: the training engine running :class:`~distillery.platform.moe.job.MoETuneJob`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import mlflow
import yaml

from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.engine.checkpoints import read_record
from distillery.platform.engine.driver import JobDriver, run_training_job
from distillery.platform.io import storage
from distillery.platform.moe.analysis import plot_expert_analysis
from distillery.platform.moe.base_model import load_into, load_base_state
from distillery.platform.moe.model_files import build_detector, save_tuned_model
from distillery.platform.moe.spec import ANALYSIS_JSON, BASE_DIR, DENSE_BASE_DIR, MODEL_FILE, SPEC, MoETuneRun
from distillery.platform.tracking.runs import log_best_metrics, tracking_uri_scope
from distillery.students.moe import moe_parameter_counts
from distillery.students.open_vocab import moe_tune_decoder
from distillery.students.phrase_cache import PhraseEmbeddingCache
from distillery.students.text import (HashingPhraseEncoder, MiniLMPhraseEncoder, fingerprint_digest,
                                      minilm_unavailable_reason)
from distillery.students.vocabulary import load_vocabulary, prompts_from_categories

__all__ = ["MoETuneDriver", "prompt_vocabulary", "run_moe_tune"]

log = logging.getLogger(__name__)


def _phrase_encoder(cfg: MoETuneConfig):
    kind = cfg.text.encoder
    if kind == "minilm":
        return MiniLMPhraseEncoder()
    if kind == "auto":
        reason = minilm_unavailable_reason()
        if reason is None:
            return MiniLMPhraseEncoder()
        warnings.warn(f"text.encoder=auto: {reason}; using the hashing encoder (spelling, not meaning)",
                      RuntimeWarning, stacklevel=2)
    return HashingPhraseEncoder(dim=cfg.text.hashing_dim)


def prompt_vocabulary(cfg: MoETuneConfig, categories) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """(phrases, (P, dim) embeddings, encoder fingerprint): one prompt per category, ascending id."""
    if cfg.text.vocabulary:
        phrases = load_vocabulary(cfg.text.vocabulary)
        if len(phrases) != categories.num_classes:
            raise ValueError(f"text.vocabulary {cfg.text.vocabulary} has {len(phrases)} phrases; the dataset has "
                             f"{categories.num_classes} categories (one prompt per category, ascending id)")
        if cfg.text.template:
            phrases = [cfg.text.template.format(name=p) for p in phrases]
    else:
        phrases = prompts_from_categories([{"id": i, "name": n} for i, n in
                                           zip(categories.category_ids, categories.names)], cfg.text.template)
    encoder = _phrase_encoder(cfg)
    text = PhraseEmbeddingCache(cfg.text.cache_dir).get(encoder, phrases)
    return phrases, text, {"name": encoder.name, "dim": encoder.dim, "digest": fingerprint_digest(encoder)}


def run_moe_tune(cfg: MoETuneConfig, *, callbacks: list | None = None, parent_run_id: str | None = None,
                 extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """MoE-tune (or, with ``moe.enabled=false``, fine-tune) an open-vocabulary detector; return a
    summary: the engine's set-up (:func:`~distillery.platform.engine.driver.run_training_job`) with
    this job's steps (:class:`MoETuneDriver`)."""
    return run_training_job(SPEC, cfg, callbacks=callbacks, parent_run_id=parent_run_id, extra_tags=extra_tags)


class MoETuneDriver(JobDriver):
    """The MoE-tuning job's driver steps: the prompt vocabulary, the dense base staged for the
    workers, the parameter counts before and after the decomposition; after training, the logged
    weights and expert analysis."""

    def check_inputs(self) -> MoETuneConfig:
        cfg, launch = self.cfg, self.launch
        self.phrases, self.text, self.encoder_info = prompt_vocabulary(cfg, launch.train.categories)
        model = build_detector(cfg.model.name, self.phrases, self.text, cfg.model.input_size, cfg.model.overrides)
        self.build_options = model.build_options()
        self.counts = {"dense": moe_parameter_counts(model)}
        self.moe_meta = None
        if cfg.moe.enabled:
            m = cfg.moe
            self.moe_meta = {"copies": m.copies, "granularity": m.granularity,
                             "capacity_factor": m.eval_capacity_factor, "aux_loss_weight": m.aux_loss_weight}
        self.base_uri, self.base_info = None, None
        if cfg.base.checkpoint and launch.resume_checkpoint is None:
            self._stage_base(model)
        if cfg.moe.enabled:
            moe_tune_decoder(model, cfg.moe.copies, cfg.moe.granularity)
            self.counts["moe"] = moe_parameter_counts(model)
        return cfg

    def _stage_base(self, model) -> None:
        """Load ``base.checkpoint`` into the detector here (a wrong file fails before any worker
        starts) and stage it as one file every worker loads strictly: the keys the checkpoint
        lacked are this model's init, the same on every rank."""
        cfg, launch = self.cfg, self.launch
        state, source = load_base_state(cfg.base.checkpoint, tracking_uri=launch.tracking_uri,
                                        local_dir=str(launch.local_dir))
        self.base_info = {"source": source, **load_into(model, state, cfg.base.strict, source)}
        if self.base_info["missing"] or self.base_info["unexpected"]:
            log.warning("base %s: %d model keys not in the checkpoint (kept at init), %d checkpoint keys unused",
                        source, len(self.base_info["missing"]), len(self.base_info["unexpected"]))
        self.base_uri = storage.join(launch.run_storage, BASE_DIR, MODEL_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            save_tuned_model(model, Path(tmp) / MODEL_FILE, {"name": cfg.model.name, "build_options": self.build_options,
                                                             "input_size": cfg.model.input_size, "moe": None})
            storage.write_bytes(self.base_uri, (Path(tmp) / MODEL_FILE).read_bytes())

    def step_limit(self) -> int | None:
        return self.cfg.train.steps_per_epoch

    def tags(self) -> dict[str, str]:
        base = self.base_info["source"] if self.base_info else (
            "resume" if self.launch.resume_checkpoint else f"trained in-job ({self.cfg.base.dense_steps} dense steps)")
        return {"distillery.text_encoder": self.encoder_info["name"],
                "distillery.text_encoder_fingerprint": self.encoder_info["digest"], "distillery.base": base}

    def describe_run(self, **common: Any) -> MoETuneRun:
        return MoETuneRun(phrases=self.phrases, text_embeddings=self.text.tolist(),
                          category_ids=list(self.launch.train.categories.category_ids),
                          build_options=self.build_options, moe_meta=self.moe_meta, base_uri=self.base_uri,
                          parameter_counts=self.counts, **common)

    def summary(self, run: MoETuneRun, result, best) -> dict[str, Any]:
        out = {"parameter_counts": self.counts, "phrases": self.phrases, "text_encoder": self.encoder_info["name"]}
        return {**out, **_log_final(self.cfg, run, best, result.checkpoint)}


def _log_final(cfg: MoETuneConfig, run: MoETuneRun, best, last) -> dict[str, Any]:
    """Log the best checkpoint's weights, the last checkpoint's expert analysis and the config."""
    if best is None or last is None:
        raise RuntimeError("training finished without a checkpoint: nothing to log")
    out: dict[str, Any] = {}
    with tracking_uri_scope(run.tracking_uri), tempfile.TemporaryDirectory() as tmp, \
            mlflow.start_run(run_id=run.run_id):
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        mlflow.log_artifact(str(tmp / "config.yaml"))
        with best.as_directory() as d:
            d = Path(d)
            record = read_record(d, SPEC)
            # Under the name the registry's base loader reads (models:/<name>@<alias>).
            (tmp / "weights.safetensors").write_bytes((d / MODEL_FILE).read_bytes())
            mlflow.log_artifact(str(tmp / "weights.safetensors"), artifact_path="export")
        meta = {"input_size": cfg.model.input_size, "phrases": run.phrases, "category_ids": run.category_ids,
                "model": cfg.model.name, "build_options": run.build_options, "moe": run.moe_meta,
                "parameter_counts": run.parameter_counts, "checkpoint_epoch": record.epoch,
                "metrics": record.metrics}
        mlflow.log_dict(meta, "export/meta.json")
        mlflow.set_tag("distillery.weights_uri", f"runs:/{run.run_id}/export/weights.safetensors")
        log_best_metrics(record.metrics)
        out.update(checkpoint_epoch=record.epoch, best_metrics=record.metrics)

        dense_base = storage.join(run.run_storage, DENSE_BASE_DIR, MODEL_FILE)
        if storage.exists(dense_base):
            (tmp / "dense_base.safetensors").write_bytes(storage.read_bytes(dense_base))
            mlflow.log_artifact(str(tmp / "dense_base.safetensors"), artifact_path="dense_base")

        with last.as_directory() as d:
            d = Path(d)
            last_record = read_record(d, SPEC)
            out.update(restore_checks=last_record.restore_checks, step0=last_record.step0,
                       base_metrics=last_record.base_metrics)
            if (d / ANALYSIS_JSON).is_file():
                analysis = json.loads((d / ANALYSIS_JSON).read_text())
                figures = plot_expert_analysis(analysis, tmp / "analysis", cfg.moe.granularity)
                (tmp / "analysis" / ANALYSIS_JSON).write_text(json.dumps(analysis))
                mlflow.log_artifacts(str(tmp / "analysis"), artifact_path="analysis")
                out["analysis"] = {k: v for k, v in analysis.items() if k != "layers"} | {
                    "layers": {n: {k: v for k, v in layer.items() if k not in ("coactivation",)}
                               for n, layer in analysis["layers"].items()}}
                out["analysis_figures"] = [f"analysis/{p.name}" for p in figures]
    return out


