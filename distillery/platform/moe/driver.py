"""Dynamic-DINO MoE-tuning job: dense open-vocabulary detector -> fine-grained MoE, trained with expert parallelism.

``run_moe_tune(cfg)`` is what ``jobs/moe_tune.py`` calls. Reading order:

Driver (:func:`run_moe_tune`)
    1. dataset, prompt vocabulary (dataset category names or a vocabulary file) and its phrase
       embeddings, computed once here (:class:`~distillery.students.phrase_cache.PhraseEmbeddingCache`);
       the text encoder never runs in the workers;
    2. the dense base: a checkpoint (file, checkpoint directory, run path or ``models:/``
       registry URI; :func:`load_base_state`) loaded into the detector *on the driver*, so a wrong
       file fails before any worker starts, and staged into the run storage as one safetensors
       file every worker loads; or none, and the workers train it first (``base.dense_steps``);
    3. one MLflow run (params, tags), then Ray Train's ``TorchTrainer`` over
       :func:`moe_tune_worker`; afterwards the best checkpoint's consolidated weights, the expert
       analysis figures and the config are logged to the run.

The workers: the training engine running :class:`~distillery.platform.moe.job.MoETuneJob`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import mlflow
import yaml

from distillery.platform.cache.job import ensure_dataset
from distillery.platform.cluster.runtime import cluster_has_gpus, ray_session
from distillery.platform.config.moe import MoETuneConfig
from distillery.platform.config.sections import config_hash, flatten_config
from distillery.platform.datasets.formats import coco_split_paths
from distillery.platform.datasets.ingest import build_train_dataset
from distillery.platform.engine.checkpoints import find_latest_checkpoint, read_record
from distillery.platform.engine.launch import (claimed_run_folder, configure_ray_data, fit_on_ray_train, git_commit,
                                               load_train_val, mlflow_status, require_cluster_fit, run_summary,
                                               steps_per_epoch)
from distillery.platform.engine.progress import filter_ray_log_noise
from distillery.platform.io import storage
from distillery.platform.moe.analysis import plot_expert_analysis
from distillery.platform.moe.base_model import load_into, load_base_state
from distillery.platform.moe.model_files import build_detector, save_tuned_model
from distillery.platform.moe.spec import ANALYSIS_JSON, BASE_DIR, DENSE_BASE_DIR, MODEL_FILE, SPEC, MoETuneRun
from distillery.platform.tracking.runs import create_run, resolve_tracking_uri, tracking_reachable, tracking_uri_scope
from distillery.students.moe import moe_parameter_counts
from distillery.students.open_vocab import moe_tune_decoder
from distillery.students.phrase_cache import PhraseEmbeddingCache
from distillery.students.text import (HashingPhraseEncoder, MiniLMPhraseEncoder, fingerprint_digest,
                                      minilm_unavailable_reason)
from distillery.students.vocabulary import load_vocabulary, prompts_from_categories

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
    summary. The run directory is locked for the job, as the distillation job's (``run_lock``)."""
    with claimed_run_folder(cfg, SPEC.run_prefix) as cfg:
        return _run_moe_tune(cfg, callbacks=callbacks, parent_run_id=parent_run_id, extra_tags=extra_tags)


def _run_moe_tune(cfg: MoETuneConfig, *, callbacks: list | None, parent_run_id: str | None,
                  extra_tags: dict[str, str] | None) -> dict[str, Any]:
    t0 = time.time()
    local_dir = Path(cfg.output.local_dir)
    name = cfg.output.name  # (claimed_run_folder: absolute paths, S3 configured, named)
    storage_path = cfg.output.storage_path
    run_storage = storage.join(storage_path, name)

    # --- inputs, checked before anything runs
    ensure_dataset(cfg.data)
    train, val = load_train_val(cfg.data, storage.join(str(local_dir), "bad_records", name))
    phrases, text, encoder_info = prompt_vocabulary(cfg, train.categories)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, local_dir)
    tracking_reachable(tracking_uri)
    resume_checkpoint = find_latest_checkpoint(cfg.output.resume_from, SPEC) if cfg.output.resume_from else None

    model = build_detector(cfg.model.name, phrases, text, cfg.model.input_size, cfg.model.overrides)
    build_options = model.build_options()
    counts = {"dense": moe_parameter_counts(model)}
    moe_meta = None
    if cfg.moe.enabled:
        m = cfg.moe
        moe_meta = {"copies": m.copies, "granularity": m.granularity, "capacity_factor": m.eval_capacity_factor,
                    "aux_loss_weight": m.aux_loss_weight}
    base_uri, base_info = None, None
    if cfg.base.checkpoint and resume_checkpoint is None:
        state, source = load_base_state(cfg.base.checkpoint, tracking_uri=tracking_uri, local_dir=str(local_dir))
        base_info = {"source": source, **load_into(model, state, cfg.base.strict, source)}
        if base_info["missing"] or base_info["unexpected"]:
            log.warning("base %s: %d model keys not in the checkpoint (kept at init), %d checkpoint keys unused",
                        source, len(base_info["missing"]), len(base_info["unexpected"]))
        # Every worker loads this file strictly: the keys the checkpoint lacked are this model's
        # init, the same on every rank.
        base_uri = storage.join(run_storage, BASE_DIR, MODEL_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            save_tuned_model(model, Path(tmp) / MODEL_FILE, {"name": cfg.model.name, "build_options": build_options,
                                                             "input_size": cfg.model.input_size, "moe": None})
            storage.write_bytes(base_uri, (Path(tmp) / MODEL_FILE).read_bytes())
    if cfg.moe.enabled:
        moe_tune_decoder(model, cfg.moe.copies, cfg.moe.granularity)
        counts["moe"] = moe_parameter_counts(model)
    del model

    params = flatten_config(cfg)
    tags = {"distillery.run_storage": run_storage, "distillery.git_commit": git_commit(),
            "distillery.config_hash": config_hash(cfg), "distillery.dataset_sha256": train.annotation_sha256,
            "distillery.job": SPEC.name, "distillery.text_encoder": encoder_info["name"],
            "distillery.text_encoder_fingerprint": encoder_info["digest"],
            "distillery.base": base_info["source"] if base_info else
            ("resume" if resume_checkpoint else f"trained in-job ({cfg.base.dense_steps} dense steps)")}
    tags.update(extra_tags or {})

    with ray_session(cfg.ray, cfg.storage, min_local_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + 2):
        require_cluster_fit(cfg, train, tracking_uri)
        use_gpu = cluster_has_gpus() if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)
        filter_ray_log_noise()
        configure_ray_data()
        train_ds = build_train_dataset(train, None, bad_records=cfg.data.bad_records,
                                       report_uri=storage.join(run_storage, "bad_records"))
        run_id = create_run(tracking_uri, cfg.tracking.experiment, name, params, tags, parent_run_id=parent_run_id)
        val_ann, val_images = coco_split_paths(cfg.data, "val", val, storage.join(run_storage, "data"))
        run = MoETuneRun(phrases=phrases, text_embeddings=text.tolist(),
                         category_ids=list(train.categories.category_ids), build_options=build_options,
                         moe_meta=moe_meta, base_uri=base_uri,
                         steps_per_epoch=steps_per_epoch(cfg, len(train), cfg.train.steps_per_epoch),
                         val_annotations=val_ann, val_images=val_images, tracking_uri=tracking_uri, run_id=run_id,
                         run_storage=run_storage, resume_checkpoint=resume_checkpoint, parameter_counts=counts)

        with mlflow_status(tracking_uri, run_id):
            result, best = fit_on_ray_train(SPEC, cfg, run, train_ds, name=name,
                                            storage_path=storage_path, use_gpu=use_gpu, callbacks=callbacks)
            summary = {**run_summary(run, cfg.tracking.experiment, result, best), "parameter_counts": counts,
                       "phrases": phrases, "text_encoder": encoder_info["name"]}
            summary.update(_log_final(cfg, summary, run, best, result.checkpoint))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    return summary


def _log_final(cfg: MoETuneConfig, summary: dict[str, Any], run: MoETuneRun, best, last) -> dict[str, Any]:
    """Log the best checkpoint's weights, the last checkpoint's expert analysis and the config."""
    if best is None or last is None:
        raise RuntimeError("training finished without a checkpoint: nothing to log")
    out: dict[str, Any] = {}
    with tracking_uri_scope(summary["tracking_uri"]), tempfile.TemporaryDirectory() as tmp, \
            mlflow.start_run(run_id=summary["run_id"]):
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
        mlflow.set_tag("distillery.weights_uri", f"runs:/{summary['run_id']}/export/weights.safetensors")
        mlflow.log_metrics({f"best/{k}": float(v) for k, v in record.metrics.items()
                            if isinstance(v, (int, float)) and v == v})
        out.update(checkpoint_epoch=record.epoch, best_metrics=record.metrics)

        dense_base = storage.join(summary["run_storage"], DENSE_BASE_DIR, MODEL_FILE)
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


