"""Dynamic-DINO MoE-tuning job: dense open-vocabulary detector -> fine-grained MoE, trained with expert parallelism.

``run_moe_tune(cfg)`` is what ``jobs/moe_tune.py`` calls. Reading order:

Driver (:func:`run_moe_tune`)
    1. dataset, prompt vocabulary (dataset category names or a vocabulary file) and its phrase
       embeddings, computed once here (:class:`~distillery.students.text.PhraseEmbeddingCache`);
       the text encoder never runs in the workers;
    2. the dense base: a checkpoint (file, checkpoint directory, run path or ``models:/``
       registry URI; :func:`load_base_state`) loaded into the detector *on the driver*, so a wrong
       file fails before any worker starts, and staged into the run storage as one safetensors
       file every worker loads; or none, and the workers train it first (``base.dense_steps``);
    3. one MLflow run (params, tags), then Ray Train's ``TorchTrainer`` over
       :func:`moe_tune_worker`; afterwards the best checkpoint's consolidated weights, the expert
       analysis figures and the config are logged to the run.

Worker (:func:`moe_tune_worker`)
    1. dense phase (only without a base checkpoint and without a checkpoint to resume): DeepSpeed
       data parallelism for ``base.dense_steps`` steps; the result is saved to the run storage
       (``dense_base/model.safetensors``) and evaluated (``base/AP``);
    2. decomposition: every decoder FFN -> ``copies * granularity`` experts
       (:func:`~distillery.students.open_vocab.moe_tune_decoder`), each layer then mapped onto
       DeepSpeed's MoE layer with Dynamic-DINO's gate and ``ep_size`` expert parallelism
       (:func:`~distillery.platform.moe_deepspeed.to_deepspeed_moe`); the optimizer's parameter
       groups are split into expert / non-expert groups
       (``split_params_into_different_moe_groups_for_optimizer``) so that DeepSpeed reduces expert
       gradients over the expert-data-parallel group only. The whole detector's outputs on a few
       val images are compared before and after (``moe/step0_max_abs_diff``: 0 up to rounding);
    3. epochs of training: detection loss (DEIM criterion over the prompt vocabulary) plus the
       weighted load-balancing loss of every MoE layer;
    4. per epoch: the experts are gathered from all ranks into a plain MoE detector
       (:func:`~distillery.platform.moe_deepspeed.gather_moe_ffn`), evaluated with pycocotools
       over the prompt vocabulary (val images sharded over ranks), with every token's routing
       recorded for the expert analysis (load histogram, co-activation matrix, stable partners per
       layer, :func:`expert_analysis`); then a checkpoint: DeepSpeed's (non-expert states once,
       each rank's expert shards ``layer_<l>_expert_<e>_...``, per-rank optimizer states), the
       consolidated ``model.safetensors``, RNG states, and the raw outputs on the probe images.
    On restore (worker failure or ``output.resume_from``) the probe outputs are recomputed after
    loading and compared with the recorded ones (``restore/max_abs_diff``).

Evaluation runs on the gathered plain model rather than through DeepSpeed's all-to-all: it is the
same function (tested in ``tests/test_moe_deepspeed.py``), needs no lockstep between ranks with
different numbers of val images, and records routing traces.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from distillery.platform import storage
from distillery.platform.config import absolute_uri, config_hash, flatten_config
from distillery.platform.moe_config import MoETuneConfig
from distillery.platform.batchnorm import batchnorm_for_backend
from distillery.platform.norm_sync import average_norm_statistics
from distillery.platform.progress import ProgressPrinter, filter_ray_log_noise, loss_terms, quiet_worker_noise
from distillery.platform.train_loop import DS_TAG, EXTRA_STATE, STATE_JSON

__all__ = [
    "MODEL_FILE",
    "build_detector",
    "expert_analysis",
    "load_base_state",
    "load_tuned_model",
    "moe_tune_worker",
    "plot_expert_analysis",
    "run_moe_tune",
    "save_tuned_model",
    "with_absolute_paths",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"          # consolidated weights (plain PyTorch modules) + metadata
ANALYSIS_JSON = "expert_analysis.json"    # per-layer load and co-activation on the val split
PROBE_FILE = "probe.pt"                   # raw outputs on the probe images (restore check)
MODEL_FORMAT = "distillery.open_vocab/v1"
_TEXT_KEY = "vocabulary.text_embeddings"  # phrase embeddings stored beside the weights


# =========================================================================== model files

def build_detector(name: str, phrases: list[str], text: torch.Tensor, input_size: int,
                   overrides: dict[str, Any], moe: dict[str, Any] | None = None):
    """The open-vocabulary detector (dense, or with plain MoE decoder FFNs when ``moe`` is given)."""
    from distillery.students.open_vocab import build_open_vocab, moe_tune_decoder

    options = {**overrides, "eval_spatial_size": input_size}
    model = build_open_vocab(name, phrases, phrase_embeddings=text, **options)
    if moe:
        moe_tune_decoder(model, int(moe["copies"]), int(moe["granularity"]),
                         capacity_factor=moe.get("capacity_factor"),
                         aux_loss_weight=float(moe.get("aux_loss_weight", 0.01)),
                         record_routing=bool(moe.get("record_routing", False)))
    return model


def save_tuned_model(model, path: str | Path, meta: dict[str, Any]) -> None:
    """Weights (plain modules), the vocabulary's embeddings and ``meta`` in one safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors[_TEXT_KEY] = model.text_embeddings.detach().to("cpu", torch.float32).contiguous()
    meta = {"format": MODEL_FORMAT, "phrases": list(model.phrases), **meta}
    save_file(tensors, str(path), metadata={"distillery": json.dumps(meta, default=str)})


def _read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("distillery")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, (json.loads(raw) if raw else None)


def load_tuned_model(path: str | Path):
    """A plain PyTorch detector (dense or MoE, eval mode) from a ``model.safetensors`` of this job."""
    tensors, meta = _read_model_file(path)
    if not meta or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a {MODEL_FORMAT} model file (no Distillery metadata)")
    text = tensors.pop(_TEXT_KEY)
    model = build_detector(meta["name"], meta["phrases"], text, int(meta["input_size"]), meta["build_options"],
                           meta.get("moe"))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


# =========================================================================== base model

def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _state_from_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt / pickled with disallowed types
        raise ValueError(f"base.checkpoint {path} cannot be loaded as a state dict "
                         f"(torch.load weights_only=True): {type(exc).__name__}: {exc}") from None
    for key in ("ema", "module", "model", "state_dict"):   # common nestings, outermost first
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            if key == "ema" and isinstance(obj.get("module"), dict):
                obj = obj["module"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"base.checkpoint {path} does not hold a state dict of tensors")
    return dict(obj)


def _state_from_registry(uri: str, tracking_uri: str, local_dir: str) -> tuple[dict[str, torch.Tensor], str]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the version's run's exported weights."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    ref = uri[len("models:/"):]
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ValueError(f"base.checkpoint {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    except MlflowException as exc:
        raise FileNotFoundError(f"base.checkpoint {uri!r} not found in the registry at {tracking_uri}: "
                                f"{exc.message}") from None
    if not version.run_id:
        raise ValueError(f"base.checkpoint {uri!r}: model version {version.version} has no source run")
    target = Path(local_dir) / "base_models" / f"{version.name}-v{version.version}"
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = client.download_artifacts(version.run_id, "export/weights.safetensors", str(target))
    except (MlflowException, OSError) as exc:
        raise FileNotFoundError(f"base.checkpoint {uri!r}: run {version.run_id} of version {version.version} has "
                                f"no export/weights.safetensors artifact ({exc})") from None
    state, meta = _read_model_file(local)
    if meta and meta.get("moe"):
        raise ValueError(f"base.checkpoint {uri!r} (version {version.version}) is already an MoE model; "
                         "MoE-tuning starts from a dense model")
    state.pop(_TEXT_KEY, None)
    return _strip_prefixes(state), f"{uri} (version {version.version}, run {version.run_id})"


def load_base_state(source: str, *, tracking_uri: str | None = None,
                    local_dir: str = "runs") -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description) of the dense base named by ``base.checkpoint`` (see moe_config)."""
    if source.startswith("models:/"):
        if tracking_uri is None:
            raise ValueError(f"base.checkpoint {source!r} needs a tracking URI (tracking.tracking_uri)")
        return _state_from_registry(source, tracking_uri, local_dir)
    if "://" in source:   # remote (S3): a model file, a checkpoint of this job, or a run path
        if not storage.exists(source):
            raise FileNotFoundError(f"base.checkpoint {source} does not exist")
        if not source.endswith((".safetensors", ".pt", ".pth", ".bin")):
            if not storage.exists(storage.join(source, MODEL_FILE)):
                from distillery.platform.distill import find_latest_checkpoint

                source = find_latest_checkpoint(source)
            source = storage.join(source, MODEL_FILE)
        path = Path(local_dir) / "base_models" / Path(source).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(source))
    else:
        path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"base.checkpoint {path} does not exist")
    if path.is_dir():
        from distillery.platform.distill import find_latest_checkpoint

        if (path / MODEL_FILE).is_file():
            path = path / MODEL_FILE
        elif (path / EXTRA_STATE).is_file():   # a distillation-job checkpoint: its EMA weights
            return _strip_prefixes(_state_from_pt(path / EXTRA_STATE)), f"{path} (EMA weights)"
        else:
            return load_base_state(find_latest_checkpoint(str(path)), tracking_uri=tracking_uri, local_dir=local_dir)
    if path.suffix == ".safetensors":
        state, meta = _read_model_file(path)
        if meta and meta.get("moe"):
            raise ValueError(f"base.checkpoint {path} is already an MoE model (copies={meta['moe']['copies']}, "
                             f"granularity={meta['moe']['granularity']}); MoE-tuning starts from a dense model")
        state.pop(_TEXT_KEY, None)
        return _strip_prefixes(state), str(path)
    return _strip_prefixes(_state_from_pt(path)), str(path)


def _load_into(model, state: dict[str, torch.Tensor], strict: bool, source: str) -> dict[str, list[str]]:
    """Load ``state`` into ``model``; strict: every key must match in name and shape."""
    own = model.state_dict()
    if any(".router." in k or k.endswith(".w1") for k in state):
        raise ValueError(f"base.checkpoint {source} holds MoE weights; MoE-tuning starts from a dense model")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if strict and (missing or unexpected or mismatched):
        raise ValueError(f"base.checkpoint {source} does not fit the model (set base.strict=false to load the "
                         f"matching part): missing {missing[:8]}{'...' if len(missing) > 8 else ''} "
                         f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), shape mismatch "
                         f"{[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched[:5]]}")
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not usable:
        raise ValueError(f"base.checkpoint {source}: no parameter matches the model")
    model.load_state_dict(usable, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


# =========================================================================== expert analysis

def expert_analysis(traces: dict[str, torch.Tensor], num_experts: int, threshold: float) -> dict[str, Any]:
    """Per-layer load, co-activation and stable partners (Dynamic-DINO's shallow-vs-deep reading).

    ``traces``: ``{layer name: (tokens, k) expert ids}`` in layer order. Shallow layers are the
    first half, deep layers the last half (the middle layer of an odd count belongs to neither).
    """
    from distillery.students.moe import coactivation_matrix, stable_partners, summarise_layers

    summary = summarise_layers(traces, num_experts, threshold)
    layers: dict[str, Any] = {}
    for name, trace in traces.items():
        coact = coactivation_matrix(trace, num_experts)
        partners = stable_partners(coact, threshold)
        layers[name] = {**summary[name], "coactivation": coact.tolist(), "stable_partners": partners.tolist()}
    names = list(traces)
    half = len(names) // 2
    shallow, deep = names[:half], names[len(names) - half:]

    def mean_of(group: list[str]) -> float:
        values = [layers[n]["mean_stable_partners"] for n in group]
        return float(sum(values) / len(values)) if values else float("nan")

    return {"num_experts": num_experts, "threshold": threshold, "layers": layers, "shallow_layers": shallow,
            "deep_layers": deep, "shallow_mean_stable_partners": mean_of(shallow),
            "deep_mean_stable_partners": mean_of(deep)}


def analysis_metrics(analysis: dict[str, Any]) -> dict[str, float]:
    """The scalar part of :func:`expert_analysis`, as MLflow metric names."""
    out = {"analysis/shallow_mean_stable_partners": analysis["shallow_mean_stable_partners"],
           "analysis/deep_mean_stable_partners": analysis["deep_mean_stable_partners"]}
    for name, layer in analysis["layers"].items():
        short = name.replace("decoder.layers.", "layer").replace(".linear1", "")
        for key in ("load_cv", "mean_partners", "mean_stable_partners", "unique_combinations",
                    "top_combination_share"):
            out[f"analysis/{short}/{key}"] = float(layer[key])
    return out


def plot_expert_analysis(analysis: dict[str, Any], out_dir: str | Path, granularity: int) -> list[Path]:
    """PNG figures: load histogram per layer, co-activation heatmap per layer, stable partners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = analysis["layers"]
    names = list(layers)
    E = analysis["num_experts"]
    short = {n: n.replace("decoder.layers.", "layer ").replace(".linear1", "") for n in names}
    paths: list[Path] = []

    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, E * 0.25), 2.2 * len(names)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, name in zip(axes[:, 0], names):
        load = np.asarray(layers[name]["load"], dtype=float)
        share = load / max(load.sum(), 1.0)
        ax.bar(range(E), share, color=[colours((e // granularity) % 20) for e in range(E)])
        ax.axhline(1.0 / E, color="k", lw=0.8, ls="--")
        ax.set_ylabel("share of routes")
        ax.set_title(f"{short[name]}: expert load (colour = copy; dashed = uniform), "
                     f"CV {layers[name]['load_cv']:.2f}", fontsize=9)
    axes[-1, 0].set_xlabel("expert (copy * k + piece)")
    fig.tight_layout()
    paths.append(out_dir / "expert_load.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    for i, name in enumerate(names):
        coact = np.asarray(layers[name]["coactivation"], dtype=float)
        load = np.clip(np.diag(coact), 1.0, None)
        share = coact / load[:, None]          # row a: of a's activations, the share shared with b
        np.fill_diagonal(share, np.nan)
        fig, ax = plt.subplots(figsize=(5.5, 4.6))
        im = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="P(b selected | a selected)")
        ax.set_xlabel("expert b")
        ax.set_ylabel("expert a")
        ax.set_title(f"{short[name]}: co-activation, mean stable partners "
                     f"{layers[name]['mean_stable_partners']:.2f}", fontsize=9)
        fig.tight_layout()
        paths.append(out_dir / f"coactivation_layer{i}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(range(len(names)), [layers[n]["mean_stable_partners"] for n in names], color="tab:blue",
            label="stable (> threshold)")
    ax1.plot(range(len(names)), [layers[n]["mean_partners"] for n in names], "o-", color="tab:red",
             label="any co-selection")
    ax1.set_xticks(range(len(names)), [short[n] for n in names], rotation=45, fontsize=8)
    ax1.set_ylabel("partners per active expert")
    ax1.set_title(f"partners per layer (threshold {analysis['threshold']:.2f}); shallow "
                  f"{analysis['shallow_mean_stable_partners']:.2f} vs deep {analysis['deep_mean_stable_partners']:.2f}",
                  fontsize=8)
    ax1.legend(fontsize=8)
    top = max([max(layers[n]["stable_partners"] or [0]) for n in names] + [1])
    bins = np.arange(top + 2) - 0.5
    for group, colour in (("shallow_layers", "tab:green"), ("deep_layers", "tab:purple")):
        counts = [c for n in analysis[group] for c, l in zip(layers[n]["stable_partners"], layers[n]["load"]) if l > 0]
        if counts:
            ax2.hist(counts, bins=bins, alpha=0.6, color=colour, label=group.replace("_", " "))
    ax2.set_xlabel("stable partners of an expert")
    ax2.set_ylabel("experts")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "stable_partners.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


# =========================================================================== driver

def with_absolute_paths(cfg: MoETuneConfig) -> MoETuneConfig:
    """Relative local paths resolved against the driver's directory: Ray Train workers run elsewhere."""
    cfg = cfg.model_copy(deep=True)
    cfg.data.root = absolute_uri(cfg.data.root)
    cfg.output.storage_path = absolute_uri(cfg.output.storage_path)
    cfg.output.local_dir = absolute_uri(cfg.output.local_dir)
    if cfg.output.resume_from:
        cfg.output.resume_from = absolute_uri(cfg.output.resume_from)
    if cfg.base.checkpoint and not cfg.base.checkpoint.startswith("models:/"):
        cfg.base.checkpoint = absolute_uri(cfg.base.checkpoint)
    if cfg.text.vocabulary:
        cfg.text.vocabulary = absolute_uri(cfg.text.vocabulary)
    if cfg.text.cache_dir:
        cfg.text.cache_dir = absolute_uri(cfg.text.cache_dir)
    return cfg


def _phrase_encoder(cfg: MoETuneConfig):
    from distillery.students.text import HashingPhraseEncoder, MiniLMPhraseEncoder, minilm_unavailable_reason

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
    from distillery.students.text import (PhraseEmbeddingCache, fingerprint_digest, load_vocabulary,
                                          prompts_from_categories)

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
    """MoE-tune (or, with ``moe.enabled=false``, fine-tune) an open-vocabulary detector; return a summary."""
    import ray.data

    from distillery.platform.cache_job import ensure_dataset
    from distillery.platform.cluster import cluster_has_gpus, ray_session
    from distillery.platform.distill import (_git_commit, _mlflow_status, find_latest_checkpoint,
                                             fit_on_ray_train, load_train_val)
    from distillery.platform.ingest import build_train_dataset
    from distillery.platform.tracking import create_run, resolve_tracking_uri, tracking_reachable
    from distillery.students.moe import moe_parameter_counts
    from distillery.students.open_vocab import moe_tune_decoder

    t0 = time.time()
    cfg = with_absolute_paths(cfg)
    local_dir = Path(cfg.output.local_dir)
    name = cfg.output.name or time.strftime("moe-tune-%Y%m%d-%H%M%S")
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)  # before the first storage access
    storage_path = cfg.output.storage_path
    run_storage = storage.join(storage_path, name)

    # --- inputs, checked before anything runs
    ensure_dataset(cfg.data)
    train, val = load_train_val(cfg.data, storage.join(str(local_dir), "bad_records", name))
    phrases, text, encoder_info = prompt_vocabulary(cfg, train.categories)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri, local_dir)
    tracking_reachable(tracking_uri)
    resume_checkpoint = find_latest_checkpoint(cfg.output.resume_from) if cfg.output.resume_from else None

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
        base_info = {"source": source, **_load_into(model, state, cfg.base.strict, source)}
        if base_info["missing"] or base_info["unexpected"]:
            log.warning("base %s: %d model keys not in the checkpoint (kept at init), %d checkpoint keys unused",
                        source, len(base_info["missing"]), len(base_info["unexpected"]))
        # Every worker loads this file strictly: the keys the checkpoint lacked are this model's
        # init, the same on every rank.
        base_uri = storage.join(run_storage, "base", MODEL_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            save_tuned_model(model, Path(tmp) / MODEL_FILE, {"name": cfg.model.name, "build_options": build_options,
                                                             "input_size": cfg.model.input_size, "moe": None})
            storage.write_bytes(base_uri, (Path(tmp) / MODEL_FILE).read_bytes())
    if cfg.moe.enabled:
        moe_tune_decoder(model, cfg.moe.copies, cfg.moe.granularity)
        counts["moe"] = moe_parameter_counts(model)
    del model

    params = flatten_config(cfg)
    tags = {"distillery.run_storage": run_storage, "distillery.git_commit": _git_commit(),
            "distillery.config_hash": config_hash(cfg), "distillery.dataset_sha256": train.annotation_sha256,
            "distillery.job": "moe_tune", "distillery.text_encoder": encoder_info["name"],
            "distillery.text_encoder_fingerprint": encoder_info["digest"],
            "distillery.base": base_info["source"] if base_info else
            ("resume" if resume_checkpoint else f"trained in-job ({cfg.base.dense_steps} dense steps)")}
    tags.update(extra_tags or {})

    with ray_session(cfg.ray, cfg.storage, min_local_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + 2):
        use_gpu = cluster_has_gpus() if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)
        filter_ray_log_noise()
        ray.data.DataContext.get_current().enable_progress_bars = False
        # A corrupt image in an ingest task keeps its class (deterministic: no retry; see distill.py).
        ray.data.DataContext.get_current().raise_original_map_exception = True
        ray.data.DataContext.get_current().print_on_execution_start = False
        train_ds = build_train_dataset(train, None, bad_records=cfg.data.bad_records,
                                       report_uri=storage.join(run_storage, "bad_records"))
        run_id = create_run(tracking_uri, cfg.tracking.experiment, name, params, tags, parent_run_id=parent_run_id)
        per_step = cfg.train.batch_size * cfg.train.num_workers * cfg.deepspeed.gradient_accumulation_steps
        steps_per_epoch = max(1, len(train) // per_step)
        if cfg.train.steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, cfg.train.steps_per_epoch)
        from distillery.platform.formats import coco_split_paths  # workers evaluate on a COCO file

        val_ann, val_images = coco_split_paths(cfg.data, "val", val, storage.join(run_storage, "data"))
        run_info = {"phrases": phrases, "text_embeddings": text.tolist(),
                    "category_ids": list(train.categories.category_ids), "build_options": build_options,
                    "moe_meta": moe_meta, "base_uri": base_uri,
                    "steps_per_epoch": steps_per_epoch, "val_annotations": val_ann, "val_images": val_images,
                    "tracking_uri": tracking_uri, "run_id": run_id, "run_storage": run_storage,
                    "resume_checkpoint": resume_checkpoint, "parameter_counts": counts}

        with _mlflow_status(tracking_uri, run_id):
            result, best = fit_on_ray_train(moe_tune_worker, cfg, run_info, train_ds, name=name,
                                            storage_path=storage_path, use_gpu=use_gpu, callbacks=callbacks)
            summary = {"run_id": run_id, "tracking_uri": tracking_uri, "experiment": cfg.tracking.experiment,
                       "run_storage": run_storage, "best_checkpoint": best.path if best else None,
                       "last_checkpoint": result.checkpoint.path if result.checkpoint else None,
                       "metrics": dict(result.metrics or {}), "parameter_counts": counts,
                       "phrases": phrases, "text_encoder": encoder_info["name"]}
            summary.update(_log_final(cfg, summary, run_info, best, result.checkpoint))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    return summary


def _log_final(cfg: MoETuneConfig, summary: dict[str, Any], run_info: dict[str, Any], best, last) -> dict[str, Any]:
    """Log the best checkpoint's weights, the last checkpoint's expert analysis and the config."""
    import mlflow
    import yaml

    if best is None or last is None:
        raise RuntimeError("training finished without a checkpoint: nothing to log")
    out: dict[str, Any] = {}
    mlflow.set_tracking_uri(summary["tracking_uri"])
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=summary["run_id"]):
        tmp = Path(tmp)
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        mlflow.log_artifact(str(tmp / "config.yaml"))
        with best.as_directory() as d:
            d = Path(d)
            state = json.loads((d / STATE_JSON).read_text())
            # Under the name the registry's base loader reads (models:/<name>@<alias>).
            (tmp / "weights.safetensors").write_bytes((d / MODEL_FILE).read_bytes())
            mlflow.log_artifact(str(tmp / "weights.safetensors"), artifact_path="export")
        meta = {"input_size": cfg.model.input_size, "phrases": run_info["phrases"],
                "category_ids": run_info["category_ids"], "model": cfg.model.name,
                "build_options": run_info["build_options"], "moe": run_info["moe_meta"],
                "parameter_counts": run_info["parameter_counts"], "checkpoint_epoch": state["epoch"],
                "metrics": state["metrics"]}
        mlflow.log_dict(meta, "export/meta.json")
        mlflow.set_tag("distillery.weights_uri", f"runs:/{summary['run_id']}/export/weights.safetensors")
        mlflow.log_metrics({f"best/{k}": float(v) for k, v in state["metrics"].items()
                            if isinstance(v, (int, float)) and v == v})
        out.update(checkpoint_epoch=state["epoch"], best_metrics=state["metrics"])

        dense_base = storage.join(summary["run_storage"], "dense_base", MODEL_FILE)
        if storage.exists(dense_base):
            (tmp / "dense_base.safetensors").write_bytes(storage.read_bytes(dense_base))
            mlflow.log_artifact(str(tmp / "dense_base.safetensors"), artifact_path="dense_base")

        with last.as_directory() as d:
            d = Path(d)
            last_state = json.loads((d / STATE_JSON).read_text())
            out["restore_checks"] = last_state.get("restore_checks", [])
            out["step0"] = last_state.get("step0")
            out["base_metrics"] = last_state.get("base_metrics")
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


# =========================================================================== worker

class _BatchStream:
    """Training batches from this worker's Ray Data shard, ranks kept in lockstep.

    Every forward of an expert-parallel model is a collective (all-to-all), and every step an
    all-reduce: all ranks must take the same number of steps, so a pass ends for everyone as soon
    as one rank runs out (``_all_ranks``).
    """

    def __init__(self, shard, cfg: MoETuneConfig, rank: int, device: torch.device, dtype: torch.dtype):
        from distillery.platform.augment import AugmentConfig, Augmenter

        self.shard, self.cfg, self.rank, self.device, self.dtype = shard, cfg, rank, device, dtype
        never = 10 ** 9   # fine-tuning: no strong augmentation, no Mixup, no multi-scale
        self.augmenter = Augmenter(AugmentConfig(size=cfg.model.input_size, policy_epochs=(never, never, never),
                                                 mixup_epochs=(never, never), multiscale_stop_epoch=0,
                                                 flip_prob=cfg.train.flip_prob), seed=cfg.train.seed * 1000 + rank)

    def epoch(self, pass_id: int, max_steps: int) -> Iterator[dict[str, Any]]:
        from distillery.platform.augment import collate
        from distillery.platform.ingest import rows_to_samples
        from distillery.platform.train_loop import _all_ranks

        t = self.cfg.train
        batches = self.shard.iter_batches(batch_size=t.batch_size, batch_format="numpy", drop_last=True,
                                          local_shuffle_buffer_size=t.shuffle_buffer or None,
                                          local_shuffle_seed=t.seed * 7919 + pass_id * 31 + self.rank)
        iterator = iter(batches)
        taken = 0
        while True:
            batch = next(iterator, None) if taken < max_steps else None
            if not _all_ranks(batch is not None, self.device):
                break
            samples = self.augmenter.batch(rows_to_samples(batch, None), 0)
            b = collate(samples, f5_hw=None)
            targets = [{k: v.to(self.device) for k, v in tg.items() if k != "image_id"} for tg in b["targets"]]
            taken += 1
            yield {"images": b["images"].to(self.device, self.dtype), "targets": targets}
        for _ in iterator:   # drain, so that the next pass starts cleanly
            pass


def _moe_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from distillery.platform.moe_deepspeed import DeepSpeedMoEFFN
    from distillery.students.moe import MoEFFN

    return {n: m for n, m in module.named_modules() if isinstance(m, (MoEFFN, DeepSpeedMoEFFN))}


def _aux_loss(module: torch.nn.Module) -> torch.Tensor | None:
    losses = [m.aux_loss for m in _moe_modules(module).values() if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def _step(engine, criterion, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One optimizer step: detection loss over the prompt vocabulary + the MoE load-balancing loss."""
    out = engine(batch["images"], batch["targets"])
    det = criterion(out, batch["targets"])
    loss_det = torch.stack(list(det.values())).sum()
    aux = _aux_loss(engine.module)
    total = loss_det if aux is None else loss_det + aux.to(loss_det.dtype)
    engine.backward(total)
    engine.step()
    parts = {"loss": total.detach(), "loss_detection": loss_det.detach()}
    if aux is not None:
        parts["loss_aux"] = aux.detach()
    return parts


def _ds_engine(model, cfg: MoETuneConfig, use_gpu: bool, *, lr: float, backbone_lr: float, warmup_steps: int,
               total_steps: int, flat_steps: int, moe: bool):
    """DeepSpeed engine with AdamW (our groups; expert params in their own groups when ``moe``)."""
    import deepspeed

    from distillery.platform.train_loop import _safe_checkpoint_engine, build_deepspeed_config
    from distillery.students.optim import build_lr_scheduler, build_param_groups

    model = batchnorm_for_backend(model, "nccl" if use_gpu else "gloo")  # the recipes' sync_bn
    groups = build_param_groups(model, lr, backbone_lr, cfg.optim.weight_decay)
    for g in groups:
        g.pop("param_names")
    if moe:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    scheduler = build_lr_scheduler(optimizer, steps_per_epoch=1, epochs=max(total_steps, 1),
                                   flat_epochs=min(flat_steps, total_steps), no_aug_epochs=0,
                                   warmup_steps=warmup_steps, min_ratio=cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg, use_gpu), dist_init_required=False)
    engine.checkpoint_engine = _safe_checkpoint_engine()
    return engine


@torch.no_grad()
def _probe(module: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode outputs on the probe images (a collective for an expert-parallel model: all ranks call)."""
    was = module.training
    module.eval()
    try:
        out = module(images.to(next(module.parameters()).dtype))
    finally:
        module.train(was)
    return {k: out[k].detach().float().cpu() for k in ("pred_logits", "pred_boxes")}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in ("pred_logits", "pred_boxes"))


def _consolidate(module: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """Copy ``module``'s weights into the plain detector ``plain``, gathering every rank's experts.

    A collective over each expert-parallel group: every rank calls it, in the same order.
    """
    from distillery.platform.moe_deepspeed import DeepSpeedMoEFFN, gather_moe_ffn

    ds_layers = {n: m for n, m in module.named_modules() if isinstance(m, DeepSpeedMoEFFN)}
    state = {k: v for k, v in module.state_dict().items()
             if not any(k.startswith(prefix + ".") for prefix in ds_layers)}
    for prefix, layer in ds_layers.items():
        gathered = gather_moe_ffn(layer)
        state.update({f"{prefix}.{k}": v for k, v in gathered.state_dict().items()})
    plain.load_state_dict(state, strict=True)
    return plain


def _gather_traces(traces: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    if not (dist.is_initialized() and world > 1):
        return traces
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, {k: v.numpy() for k, v in traces.items()})
    return {k: torch.cat([torch.from_numpy(p[k]) for p in parts]) for k in traces}


def _shared_checksum(module: torch.nn.Module) -> float:
    """float64 sum of this rank's non-expert parameters and floating-point buffers (equal on all ranks)."""
    from deepspeed.moe.utils import is_moe_param

    with torch.no_grad():
        values = [p.detach().double().sum() for p in module.parameters() if not is_moe_param(p)]
        values += [b.detach().double().sum() for b in module.buffers() if b.is_floating_point()]
    return float(torch.stack(values).sum())


def _all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [values]
    parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.tolist() for p in parts]


def moe_tune_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": MoETuneConfig as JSON, "run": run info}``."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from distillery.platform.coco import load_coco, load_image_resized
    from distillery.platform.moe_deepspeed import to_deepspeed_moe
    from distillery.platform.train_loop import (_inject_fault, _set_rng_state, evaluate_on_ranks,
                                                load_extra_state, setup_worker)
    from distillery.students.criterion import build_criterion
    from distillery.students.open_vocab import moe_tune_decoder

    cfg = MoETuneConfig.model_validate(config["cfg"])
    run: dict[str, Any] = config["run"]
    rank, world, device, use_gpu = setup_worker(cfg)
    quiet_worker_noise()
    # DeepSpeed's communication layer over the process group Ray Train created (needed before
    # the MoE layers are built: they ask for their expert-parallel group).
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", dist_init_required=False, verbose=False)

    phrases = run["phrases"]
    text = torch.tensor(run["text_embeddings"], dtype=torch.float32)
    m = cfg.moe

    def dense_model():
        return build_detector(cfg.model.name, phrases, text, cfg.model.input_size, run["build_options"]).to(device)

    criterion = build_criterion(num_classes=len(phrases))
    dtype = torch.bfloat16 if (use_gpu and cfg.deepspeed.bf16) else torch.float32
    stream = _BatchStream(ray.train.get_dataset_shard("train"), cfg, rank, device, dtype)
    val = load_coco(run["val_annotations"], run["val_images"], check_images="none")
    probe_images = torch.stack([torch.from_numpy(load_image_resized(r.uri, cfg.model.input_size))
                                for r in val.records[:cfg.train.probe_images]]).float().div_(255.0).to(device)

    logger = None
    if rank == 0 and run.get("run_id"):
        from distillery.platform.tracking import MetricsLogger

        logger = MetricsLogger(run["tracking_uri"], run["run_id"])

    def evaluate(module) -> dict[str, float]:
        return evaluate_on_ranks(module, run["val_annotations"], run["val_images"], cfg.model.input_size,
                                 cfg.train.eval_batch_size, rank, world, device)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and run.get("resume_checkpoint"):
        checkpoint = ray.train.Checkpoint(run["resume_checkpoint"])

    # --- 1. the dense base (not needed when a checkpoint is restored: it holds everything)
    model = dense_model()
    base_metrics, step0 = None, None
    if checkpoint is None:
        if run.get("base_uri"):
            weights = _weights_from_bytes(storage.read_bytes(run["base_uri"]), run["base_uri"])
            model.load_state_dict(weights, strict=True)
        else:
            model = _dense_phase(model, dense_model, criterion, cfg, run, stream, use_gpu, logger, rank)
        base_metrics = evaluate(model)
        if logger is not None:
            logger.log({f"base/{k}": v for k, v in base_metrics.items()}, 0)
    dense_probe = _probe(model, probe_images) if checkpoint is None and m.enabled else None

    # --- 2. decomposition onto DeepSpeed's MoE layer with expert parallelism
    moe_names: list[str] = []
    if m.enabled:
        torch.manual_seed(cfg.train.seed)   # one router init for every rank (DeepSpeed broadcasts it anyway)
        moe_names = moe_tune_decoder(model, m.copies, m.granularity, capacity_factor=m.capacity_factor,
                                     aux_loss_weight=m.aux_loss_weight)
        for name in moe_names:
            layer = model.get_submodule(name)
            layer.linear1 = to_deepspeed_moe(layer.linear1, ep_size=m.ep_size, use_our_gate=m.use_our_gate,
                                             capacity_factor=m.capacity_factor,
                                             eval_capacity_factor=m.eval_capacity_factor,
                                             aux_loss_weight=m.aux_loss_weight).to(device)
    steps_per_epoch = run["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.train.epochs
    engine = _ds_engine(model, cfg, use_gpu, lr=cfg.optim.lr, backbone_lr=cfg.optim.backbone_lr,
                        warmup_steps=cfg.optim.warmup_steps, total_steps=total_steps,
                        flat_steps=int(cfg.optim.flat_fraction * total_steps), moe=m.enabled)
    if dense_probe is not None:
        # The whole detector through the expert-parallel layers vs the dense one, on every rank.
        per_rank = [d[0] for d in _all_gather_floats([_max_diff(_probe(engine.module, probe_images), dense_probe)],
                                                     device)]
        step0 = {"max_abs_diff": max(per_rank), "per_rank": per_rank}
        if logger is not None:
            logger.log({"moe/step0_max_abs_diff": step0["max_abs_diff"]}, 0)

    # The plain twin every evaluation reads the gathered weights into (records routing).
    plain = build_detector(cfg.model.name, phrases, text, cfg.model.input_size, run["build_options"],
                           {**run["moe_meta"], "record_routing": True} if m.enabled else None).to(device).eval()

    # --- restore
    start_epoch, global_step, restore_checks = 0, 0, []
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_path, _ = engine.load_checkpoint(directory, tag=DS_TAG)
            if load_path is None:
                raise FileNotFoundError(f"checkpoint {checkpoint.path} has no DeepSpeed checkpoint '{DS_TAG}'")
            shared, rng = load_extra_state(directory, rank)
            recorded = torch.load(Path(directory) / PROBE_FILE, map_location="cpu", weights_only=True)
            previous = json.loads((Path(directory) / STATE_JSON).read_text())
        start_epoch, global_step = int(shared["epoch"]) + 1, int(shared["global_step"])
        base_metrics, step0 = previous.get("base_metrics"), previous.get("step0")
        restore_checks = list(previous.get("restore_checks", []))
        # Every rank recomputes the recorded outputs (an expert-parallel forward: all ranks take part).
        diff = _max_diff(_probe(engine.module, recorded["images"].to(device)), recorded)
        per_rank = [d[0] for d in _all_gather_floats([diff], device)]
        restore_checks.append({"epoch": int(shared["epoch"]), "max_abs_diff": max(per_rank), "per_rank": per_rank})
        if max(per_rank) > 1e-4:
            log.warning("outputs after restoring %s differ from the recorded ones by %s (per rank)",
                        checkpoint.path, per_rank)
        if logger is not None:
            logger.log({"restore/max_abs_diff": max(per_rank)}, global_step)
        if rng is not None:
            _set_rng_state(rng)
        log.info("rank %d resumed from %s at epoch %d (step %d)", rank, checkpoint.path, start_epoch, global_step)

    # --- 3. training epochs
    micro_steps = steps_per_epoch * cfg.deepspeed.gradient_accumulation_steps
    progress = ProgressPrinter(cfg.train.epochs, micro_steps, every_steps=cfg.train.progress_every,
                               every_seconds=cfg.train.progress_seconds, world_size=world) if rank == 0 else None
    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        t_epoch, steps = time.perf_counter(), 0
        if progress is not None:
            progress.start_epoch_timer()
        for batch in stream.epoch(epoch, micro_steps):
            parts = _step(engine, criterion, batch)
            steps += 1
            global_step += 1
            if progress is not None and progress.due(steps):
                floats = dict(zip(parts, torch.stack(list(parts.values())).float().tolist()))
                progress.step(epoch, steps, steps * cfg.train.batch_size, sum(loss_terms(floats).values()), floats,
                              None)
            if logger is not None and global_step % cfg.train.log_every == 0:
                values = torch.stack(list(parts.values())).float().tolist()
                metrics = {f"train/{k}": v for k, v in zip(parts, values)}
                metrics["train/lr"] = engine.get_lr()[0]
                logger.log(metrics, global_step)
            kill = cfg.debug.kill
            if kill is not None and rank == kill.rank and global_step == kill.step:
                if logger is not None:
                    logger.flush()
                _inject_fault(run)
        if steps == 0:
            raise RuntimeError(f"epoch {epoch}: no training batch (the train split is smaller than "
                               f"train.batch_size x train.num_workers)")
        seconds = time.perf_counter() - t_epoch
        metrics: dict[str, Any] = {"epoch": epoch, "global_step": global_step, "epoch_seconds": seconds,
                                   "images_per_second": steps * cfg.train.batch_size * world / max(seconds, 1e-9)}

        # --- 4. evaluation on the gathered model, expert analysis, checkpoint
        average_norm_statistics(engine.module)
        evaluated = plain if m.enabled else engine.module
        if m.enabled:
            _consolidate(engine.module, plain)
            for layer in _moe_modules(plain).values():
                layer.pop_routing_trace()
        analysis = None
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics.update(evaluate(evaluated))
            if m.enabled:
                traces = _gather_traces({n: layer.pop_routing_trace() for n, layer in _moe_modules(plain).items()},
                                        world)
                if cfg.analysis.enabled and rank == 0:
                    analysis = expert_analysis(traces, m.num_experts, cfg.analysis.stable_threshold)
                    metrics.update(analysis_metrics(analysis))
        if progress is not None:
            progress.epoch_end(epoch, metrics, None)
        probe = _probe(engine.module, probe_images)
        ranks = {"shared_checksum": [c[0] for c in _all_gather_floats([_shared_checksum(engine.module)], device)],
                 "probe_checksum": [c[0] for c in _all_gather_floats([float(probe["pred_logits"].double().sum())],
                                                                     device)]}
        if logger is not None:
            logger.log({k if k == "epoch" or k.startswith("analysis/") else f"epoch/{k}": v
                        for k, v in metrics.items() if isinstance(v, (int, float))}, epoch)
            logger.flush()
        state = {"epoch": epoch, "global_step": global_step, "metrics": metrics, "ranks": ranks,
                 "base_metrics": base_metrics, "step0": step0, "restore_checks": restore_checks,
                 "moe_layers": moe_names, "parameter_counts": run["parameter_counts"]}
        meta = {"name": cfg.model.name, "build_options": run["build_options"], "input_size": cfg.model.input_size,
                "moe": run["moe_meta"], "category_ids": run["category_ids"], "epoch": epoch}
        _report_with_checkpoint(engine, evaluated, rank, state, meta, analysis, {"images": probe_images.cpu(), **probe})
    if logger is not None:
        logger.flush()


def _weights_from_bytes(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """The weights of a model file read from storage (its vocabulary embeddings dropped)."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{uri} is not a readable safetensors file: {exc}") from None
    tensors.pop(_TEXT_KEY, None)
    return tensors


def _dense_phase(model, dense_model, criterion, cfg: MoETuneConfig, run: dict[str, Any], stream: _BatchStream,
                 use_gpu: bool, logger, rank: int):
    """Train the dense base from scratch for ``base.dense_steps`` steps (data parallel, DeepSpeed).

    Returns a fresh dense model holding the result (the engine that trained it registered hooks
    on its module; the MoE engine starts from a clean one). Rank 0 stores it in the run storage.
    """
    steps = cfg.base.dense_steps
    engine = _ds_engine(model, cfg, use_gpu, lr=cfg.base.lr, backbone_lr=cfg.base.backbone_lr,
                        warmup_steps=cfg.base.warmup_steps, total_steps=steps, flat_steps=steps, moe=False)
    engine.train()
    done, pass_id = 0, 0
    while done < steps:
        before = done
        for batch in stream.epoch(10_000 + pass_id, steps - done):
            parts = _step(engine, criterion, batch)
            done += 1
            if logger is not None and done % cfg.train.log_every == 0:
                logger.log({"dense/loss": float(parts["loss"]), "dense/lr": engine.get_lr()[0]}, done)
        if done == before:
            raise RuntimeError("dense phase: no training batch (the train split is smaller than "
                               "train.batch_size x train.num_workers)")
        pass_id += 1
    average_norm_statistics(engine.module)
    fresh = dense_model()
    fresh.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / MODEL_FILE
            save_tuned_model(fresh, path, {"name": cfg.model.name, "build_options": run["build_options"],
                                           "input_size": cfg.model.input_size, "moe": None,
                                           "dense_steps": steps})
            storage.write_bytes(storage.join(run["run_storage"], "dense_base", MODEL_FILE), path.read_bytes())
    return fresh


def _report_with_checkpoint(engine, evaluated, rank: int, state: dict[str, Any], meta: dict[str, Any],
                            analysis: dict[str, Any] | None, probe: dict[str, torch.Tensor]) -> None:
    """One Ray Train checkpoint: every rank's DeepSpeed files and RNG state, rank 0's shared files."""
    import ray.train

    from distillery.platform.train_loop import _rng_state

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        engine.save_checkpoint(tmp, tag=DS_TAG)   # every rank: its expert shards (+ non-expert states on rank 0)
        torch.save(_rng_state(), tmp_path / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save({"epoch": state["epoch"], "global_step": state["global_step"]}, tmp_path / EXTRA_STATE)
            torch.save(probe, tmp_path / PROBE_FILE)
            save_tuned_model(evaluated, tmp_path / MODEL_FILE, meta)
            if analysis is not None:
                (tmp_path / ANALYSIS_JSON).write_text(json.dumps(analysis))
            (tmp_path / STATE_JSON).write_text(json.dumps(state, default=float))
        metrics = {k: v for k, v in state["metrics"].items() if isinstance(v, (int, float)) and not
                   (isinstance(v, float) and math.isnan(v))}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
