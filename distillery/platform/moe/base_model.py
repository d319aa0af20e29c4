"""The dense base of an MoE-tuning run (``base.checkpoint``): a model file, a checkpoint directory,
a run path or a ``models:/`` registry URI, read into a state dict on the driver.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from distillery.platform.engine.checkpoints import ENGINE_STATE, find_latest_checkpoint
from distillery.platform.io import storage
from distillery.platform.moe.model_files import TEXT_KEY, read_model_file
from distillery.platform.moe.spec import MODEL_FILE
from distillery.torch_files import strip_wrapper_prefixes

log = logging.getLogger(__name__)


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
    state, meta = read_model_file(local)
    if meta and meta.get("moe"):
        raise ValueError(f"base.checkpoint {uri!r} (version {version.version}) is already an MoE model; "
                         "MoE-tuning starts from a dense model")
    state.pop(TEXT_KEY, None)
    return strip_wrapper_prefixes(state), f"{uri} (version {version.version}, run {version.run_id})"


def load_base_state(source: str, *, tracking_uri: str | None = None,
                    local_dir: str = "runs") -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description) of the dense base named by ``base.checkpoint`` (see moe_config)."""
    if source.startswith("models:/"):
        if tracking_uri is None:
            raise ValueError(f"base.checkpoint {source!r} needs a tracking URI (tracking.tracking_uri)")
        return _state_from_registry(source, tracking_uri, local_dir)
    if storage.has_protocol(source):   # remote (S3): a model file, a checkpoint of this job, or a run path
        if not storage.exists(source):
            raise FileNotFoundError(f"base.checkpoint {source} does not exist")
        if not source.endswith((".safetensors", ".pt", ".pth", ".bin")):
            if not storage.exists(storage.join(source, MODEL_FILE)):
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
        if (path / MODEL_FILE).is_file():
            path = path / MODEL_FILE
        elif (path / ENGINE_STATE).is_file():   # a distillation-job checkpoint: its EMA weights
            return strip_wrapper_prefixes(_state_from_pt(path / ENGINE_STATE)), f"{path} (EMA weights)"
        else:
            return load_base_state(find_latest_checkpoint(str(path)), tracking_uri=tracking_uri, local_dir=local_dir)
    if path.suffix == ".safetensors":
        state, meta = read_model_file(path)
        if meta and meta.get("moe"):
            raise ValueError(f"base.checkpoint {path} is already an MoE model (copies={meta['moe']['copies']}, "
                             f"granularity={meta['moe']['granularity']}); MoE-tuning starts from a dense model")
        state.pop(TEXT_KEY, None)
        return strip_wrapper_prefixes(state), str(path)
    return strip_wrapper_prefixes(_state_from_pt(path)), str(path)


def load_into(model, state: dict[str, torch.Tensor], strict: bool, source: str) -> dict[str, list[str]]:
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


