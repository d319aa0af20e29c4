"""Typed job configuration: pydantic models loaded from YAML with ``key.sub=value`` overrides.

Every job has one root model (a subclass of :class:`StrictModel`). Its field defaults are the
job's *embedded default*, so ``python jobs/X.py`` with no arguments runs something sensible.
Validation is pydantic's: unknown keys (``extra="forbid"``), wrong types and impossible values
(``Field(gt=...)``, ``Literal``, validators) all fail in :func:`load_config`, before any Ray
worker starts, with the dotted key path in the message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, TypeVar

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, SecretStr, ValidationError, field_validator,
                      model_validator)

from distillery.platform.errors import DEBUG_ENV, DeterministicError
from distillery.platform.io import storage as storage_io
from distillery.platform.io.weights_source import HUB_PREFIX, check_weights_source

__all__ = [
    "AdamWSettings",
    "ConfigError",
    "DataConfig",
    "DebugSettings",
    "DeepSpeedSettings",
    "DomainTeacherSettings",
    "JobConfig",
    "KillSpec",
    "LocalPath",
    "OptionalLocalPath",
    "OutputSettings",
    "PathField",
    "RayConfig",
    "RecipePath",
    "RunOutputSettings",
    "StorageConfig",
    "StrictModel",
    "SyntheticDataConfig",
    "TeacherConfig",
    "TrackingSettings",
    "TrainSettings",
    "absolute_uri",
    "apply_overrides",
    "config_hash",
    "domain_teacher",
    "flatten_config",
    "load_config",
    "parse_job_args",
    "random_init_teacher",
    "with_absolute_paths",
]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError, DeterministicError):
    """A configuration that cannot be used; the message names the key path and the source."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {dotted!r}: {prefix!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        _set_dotted(tree, key, value)
    return tree


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        # A section-level check (model validator) names its fields itself; its input is the whole section.
        quiet = err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
        detail = "" if quiet else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{detail}")
    return "\n".join(lines)


def load_config(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Load ``model`` from an optional YAML file plus dotted overrides; raise ConfigError if invalid.

    The file and the overrides are merged onto the embedded default (``model()``), section by
    section, then validated as a whole.
    """
    tree: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    if overrides:
        source += " + overrides " + " ".join(overrides)
        tree = apply_overrides(tree, overrides)
    try:
        # A recipe is a diff against the embedded default: a section given in part keeps the
        # embedded default's other values (not merely the section class's field defaults).
        tree = _deep_merge(model().model_dump(), tree)
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def parse_job_args(model: type[M], argv: Sequence[str] | None = None, description: str = "") -> M:
    """The CLI every job shares: ``--config FILE``, positional ``dotted.key=value`` overrides and
    ``--debug`` (tracebacks printed: :func:`distillery.platform.errors.hold_worker_tracebacks`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML recipe (default: the embedded default)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--debug", action="store_true",
                        help="print the workers' and the driver's tracebacks of a failed job (by default the error "
                             "line comes alone and the tracebacks go to a log file it names)")
    args = parser.parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        return load_config(model, args.config, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"error: {exc}\n")


# Ray unpacks a submitted job's --working-dir under <ray temp dir>/session_*/runtime_resources/
# and deletes it when the job or the cluster ends: whatever a job writes there is lost.
_RAY_EPHEMERAL_DIR = re.compile(r"/session_[^/]+/runtime_resources/")
HOME_VARIABLE = "DISTILLERY_HOME"


def absolute_uri(path: str, ships_with_code: bool = False) -> str:
    """A local path made absolute (workers may run in another directory); URIs unchanged.

    A relative path resolves against ``$DISTILLERY_HOME`` when it is set, else against the
    current directory. Under ``ray job submit --working-dir`` the current directory is Ray's
    temporary copy of the working dir, which Ray deletes: a relative path there is refused,
    naming where it would have gone and the way out, instead of losing the job's outputs.
    ``ships_with_code``: a file that travels with the working dir (a recipe under ``configs/``)
    resolves against the current directory, where Ray put it.
    """
    if storage_io.has_protocol(path):
        return path
    local = Path(path).expanduser()
    if ships_with_code:
        return str(local.resolve())
    if not local.is_absolute():
        home = os.environ.get(HOME_VARIABLE)
        if home:
            local = Path(home).expanduser() / local
        elif _RAY_EPHEMERAL_DIR.search(str(Path.cwd()) + "/"):
            raise ConfigError(
                f"relative path {path!r} would resolve to {Path.cwd() / local}, inside Ray's temporary "
                f"working directory of this job, which Ray deletes: set {HOME_VARIABLE} to a directory "
                "on the cluster (ray job submit --runtime-env-json '{\"env_vars\": {\"" + HOME_VARIABLE
                + "\": \"/abs/dir\"}}'), or give absolute paths or s3:// URIs")
    return str(local.resolve())


@dataclass(frozen=True)
class PathField:
    """Marks a config field as a local path that :func:`with_absolute_paths` makes absolute."""

    ships_with_code: bool = False  # see absolute_uri


# Path-bearing fields are declared with these types; nothing else lists them.
LocalPath = Annotated[str, PathField()]
OptionalLocalPath = Annotated[str | None, PathField()]
RecipePath = Annotated[str | None, PathField(ships_with_code=True)]  # a recipe under configs/

# Sources a path field may hold that are not files: a registered model and a Hugging Face hub id
# (``scheme://`` URIs are left alone by absolute_uri itself).
_NOT_A_PATH = ("models:/", HUB_PREFIX)


def with_absolute_paths(cfg: M) -> M:
    """A copy of ``cfg`` whose local-path fields (typed :data:`LocalPath`, :data:`OptionalLocalPath`,
    :data:`RecipePath`), in every section, are made absolute by :func:`absolute_uri`: the driver
    resolves them once, because Ray workers and Tune trials run in other directories."""
    cfg = cfg.model_copy(deep=True)
    _absolutise(cfg)
    return cfg


def _absolutise(section: BaseModel) -> None:
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            _absolutise(value)
            continue
        marker = next((m for m in field.metadata if isinstance(m, PathField)), None)
        if marker is not None and value and not value.startswith(_NOT_A_PATH):
            setattr(section, name, absolute_uri(value, ships_with_code=marker.ships_with_code))


# Config keys whose values are secrets by name, and credentials written into a URI
# (scheme://user:password@host): masked in tracking params and hashes.
_SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials", "apikey"}
_SECRET_PAIRS = ("api_key", "access_key", "secret_key", "private_key")
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def _mask_secrets(key: str, text: str) -> str:
    name = key.rsplit(".", 1)[-1].lower()
    if text and (_SECRET_WORDS & set(name.split("_")) or any(pair in name for pair in _SECRET_PAIRS)):
        return "**********"
    return _URI_USERINFO.sub(lambda m: m.group("scheme") + "**********@", text)


def flatten_config(cfg: BaseModel, prefix: str = "") -> dict[str, str]:
    """Flatten to ``{"a.b": "value"}`` for tracking; secrets are masked, never revealed: SecretStr
    fields, fields named like a secret (``*token*``, ``*password*``, ...) and the user:password
    part of URIs."""
    out: dict[str, str] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten_config(value, key + "."))
        elif isinstance(value, SecretStr):
            out[key] = "**********" if value.get_secret_value() else ""
        else:
            text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
            out[key] = _mask_secrets(key, text)
    return out


def config_hash(cfg: BaseModel) -> str:
    """A stable short hash of the config (secrets masked), for lineage tags."""
    blob = json.dumps(flatten_config(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- shared sections
# Sections that several jobs share, each defined once (a job that needs more fields subclasses
# one). The job roots and their own sections: config/cache.py, config/distill.py, config/moe.py,
# config/augment.py (the augmentation section) and tuning/sweep_config.py.


class SyntheticDataConfig(StrictModel):
    """Generate the synthetic dataset at ``data.root`` when it is not there yet."""

    train: PositiveInt = 200
    val: PositiveInt = 50
    size: int = Field(320, ge=64)
    seed: int = 0


class DataConfig(StrictModel):
    """A dataset; relative paths are resolved against ``root``.

    ``format: coco`` (default): the ``*_annotations`` / ``*_images`` paths below; ``synthetic``
    generates one at ``root`` when absent. ``yolo``: ``root`` is the dataset YAML (or a directory
    holding ``data.yaml``); ``voc``: ``root`` is the VOC root (``Annotations/``, ``JPEGImages/``,
    ``ImageSets/Main/``). For both, ``train_split`` / ``val_split`` name the splits the jobs train
    and evaluate on: YAML keys, or ``ImageSets/Main/<name>.txt`` files (VOC2007: trainval / test).
    ``classes`` (VOC only) fixes the class table; else it is discovered from the XML files."""

    root: LocalPath = "runs/data/synthetic"
    train_annotations: str = "annotations/instances_train.json"
    train_images: str = "images/train"
    val_annotations: str = "annotations/instances_val.json"
    val_images: str = "images/val"
    bad_records: Literal["error", "skip"] = "error"
    check_images: Literal["none", "exists", "header", "decode"] = "header"
    synthetic: SyntheticDataConfig | None = SyntheticDataConfig()
    format: Literal["coco", "yolo", "voc"] = "coco"
    train_split: str = Field("train", min_length=1)
    val_split: str = Field("val", min_length=1)
    classes: list[str] | None = Field(None, min_length=1)

    def resolve(self, rel: str) -> str:
        return rel if storage_io.is_absolute(rel) else storage_io.join(self.root, rel)

    def split_paths(self, split: Literal["train", "val"]) -> tuple[str, str]:
        """(annotation URI, image root URI) of a COCO split (other formats: formats.load_split)."""
        if self.format != "coco":
            raise ValueError(f"data.format is {self.format!r}: its splits have no COCO annotation paths; "
                             "load them with distillery.platform.datasets.formats.load_split")
        if split == "train":
            return self.resolve(self.train_annotations), self.resolve(self.train_images)
        return self.resolve(self.val_annotations), self.resolve(self.val_images)


class DomainTeacherSettings(StrictModel):
    """A DINOv3 trained on a synthetic pool of its own seed (disjoint from the student's images),
    built on first use under ``<data.root>/teacher/`` and used as the teacher's weights
    (:func:`distillery.platform.teacher_pretrain.ensure_domain_teacher`; ``jobs/pretrain_teacher.py``).
    Its architecture replaces ``teacher.model_name`` / ``model_kwargs`` while it is in use."""

    model_name: str = "vit_small_patch16_dinov3"
    model_kwargs: dict[str, int | float | bool | str] = Field(
        default_factory=lambda: {"embed_dim": 192, "depth": 6, "num_heads": 3})
    seed: int = 1000
    images: PositiveInt = 1500
    steps: PositiveInt = 600
    batch_size: PositiveInt = 16
    lr: float = Field(1e-3, gt=0)


class TeacherConfig(StrictModel):
    """The frozen vision foundation model (DINOv3 through timm).

    Its weights, in this order: ``weights`` (a file: Meta's official ``.pth``, a timm state dict);
    else random weights if ``allow_random_init`` (tests and plumbing); else the domain teacher of
    ``domain`` (built on first use beside a synthetic dataset; the embedded defaults' choice).
    One of the three is needed."""

    model_name: str = "vit_base_patch16_dinov3"
    weights: OptionalLocalPath = None
    allow_random_init: bool = False
    seed: int = 0
    input_size: int = Field(640, ge=32)
    pool: int = Field(2, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model_kwargs: dict[str, int | float | bool | str] = Field(default_factory=dict)
    domain: DomainTeacherSettings | None = None

    @field_validator("weights")
    @classmethod
    def _weights_reachable(cls, weights: str | None) -> str | None:
        # hf-hub: ids and https:// URLs are fetched where the teacher is built; offline, say so now.
        return check_weights_source(weights, "teacher.weights")

    @property
    def uses_domain_teacher(self) -> bool:
        """Whether the weights come from the domain teacher (no file given, no random weights asked)."""
        return self.weights is None and not self.allow_random_init and self.domain is not None


def random_init_teacher(**fields: Any) -> TeacherConfig:
    """A teacher with random weights, asked for explicitly (a loud warning says so, and the
    fingerprint records it): plumbing only."""
    return TeacherConfig(allow_random_init=True, **fields)


def domain_teacher(**fields: Any) -> TeacherConfig:
    """The embedded defaults' teacher. Nothing can be downloaded on a fresh machine: the teacher is
    a DINOv3 trained here, on first use, on synthetic images disjoint from the student's
    (``teacher.domain``), unless ``teacher.weights`` names a file."""
    return TeacherConfig(domain=DomainTeacherSettings(), **fields)


class RayConfig(StrictModel):
    """Where to run. ``address`` None: ``RAY_ADDRESS`` if set (``ray job submit`` sets it), else a
    local instance with ``num_cpus`` CPUs."""

    address: str | None = None
    num_cpus: PositiveInt | None = None
    # Local paths are on a file system every node mounts at the same place (NFS): a job on a
    # cluster of several nodes accepts them (by default it refuses them, naming the key).
    shared_paths: bool = False


class StorageConfig(StrictModel):
    """S3 settings; credentials come from the standard AWS environment variables."""

    s3_endpoint_url: str | None = None
    s3_region: str | None = None


class JobConfig(StrictModel):
    """Base of every job's root config: the sections all jobs have. A job's field defaults are its
    embedded default; where a shared section's defaults differ per job, the job's root sets them
    (``Field(default_factory=...)``), and ``load_config`` merges a recipe onto those."""

    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)


class TrackingSettings(StrictModel):
    """MLflow: where runs are recorded and under which experiment."""

    tracking_uri: str | None = None  # config > MLFLOW_TRACKING_URI > sqlite under output.local_dir
    experiment: str = "distillery"


class OutputSettings(StrictModel):
    local_dir: LocalPath = "runs"  # local files (sqlite tracking store, exported or downloaded models)


class RunOutputSettings(OutputSettings):
    """A training job's outputs: its Ray Train run storage, run name and the run it resumes."""

    storage_path: LocalPath = "runs/train"  # local path or s3:// (Ray Train run storage)
    name: str | None = None  # None: a timestamped name
    resume_from: OptionalLocalPath = None  # a run storage path (continues its latest checkpoint)


class KillSpec(StrictModel):
    rank: int = Field(1, ge=0)
    step: int = Field(3, ge=1)        # the step within its phase (1-based)
    phase: str | None = None          # the job phase (e.g. the MoE job's "dense"); None: its last


class DebugSettings(StrictModel):
    # Fault injection: kill this worker process once at this step (tests the automatic restore
    # from the last checkpoint); a list kills once per phase named.
    kill: KillSpec | list[KillSpec] | None = None

    @model_validator(mode="after")
    def _one_kill_per_phase(self) -> "DebugSettings":
        phases = [k.phase for k in self.kills()]
        if len(set(phases)) != len(phases):
            raise ValueError(f"debug.kill: at most one kill per phase (phases given: {phases})")
        return self

    def kills(self) -> list[KillSpec]:
        return [] if self.kill is None else self.kill if isinstance(self.kill, list) else [self.kill]


class AdamWSettings(StrictModel):
    """AdamW (a lower rate for the backbone), linear warm-up, then flat, then cosine down to
    ``min_lr_ratio`` of the rate."""

    lr: float = Field(1e-3, gt=0)
    backbone_lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_max_norm: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.5, gt=0, le=1)


class DeepSpeedSettings(StrictModel):
    zero_stage: Literal[0, 1, 2] = 0
    # bf16 on GPU; fp32 on CPU (gloo), whatever is asked here.
    bf16: bool = True
    gradient_accumulation_steps: PositiveInt = 1
    # Extra keys merged into the generated DeepSpeed config (e.g. zero_optimization buckets).
    extra: dict[str, Any] = Field(default_factory=dict)


class TrainSettings(StrictModel):
    epochs: PositiveInt = 12
    batch_size: PositiveInt = 4  # per worker
    num_workers: PositiveInt = 2
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    eval_every: PositiveInt = 1
    eval_batch_size: PositiveInt = 8
    max_failures: int = Field(1, ge=0)
    keep_checkpoints: PositiveInt = 2
    seed: int = 0
    log_every: PositiveInt = 5
    shuffle_buffer: int = Field(16, ge=0)
    # Rank 0 prints a progress line every `progress_every` steps or `progress_seconds`,
    # whichever comes first (and one summary line per epoch).
    progress_every: PositiveInt = 10
    progress_seconds: float = Field(30.0, gt=0)
