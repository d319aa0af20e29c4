"""Where a weights file comes from: a local path, an ``hf-hub:<repo>`` id or an ``https://`` URL.

Config validation calls :func:`check_weights_source` (on the driver, before Ray starts): a hub id
or URL on a machine that cannot reach its host fails there, with a message that says to download
the file and pass its path. The process that builds the model calls :func:`resolve_weights_source`,
which returns a local file: hub files through ``huggingface_hub`` (timm's own hub loading, same
file names and cache), URLs downloaded once into a cache directory (atomic rename; the sha256 is
kept next to the file and returned, for the fingerprint / MLflow). ``models:/<name>@<alias>``
(or ``/<version>``) is a registered Distillery model, looked up on the driver in the jobs' store
(:func:`registry_tracking_uri`; a missing store is an error, never created): its run's ``export/``
directory (weights and meta) is downloaded under the job's local directory
(:func:`resolve_registry_weights`) and the workers read that.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from distillery.platform.errors import DeterministicError

__all__ = ["HUB_PREFIX", "RegistryLookupError", "check_weights_source", "fetch_registry_export", "is_remote_source",
           "registry_tracking_uri", "registry_version", "resolve_registry_weights", "resolve_weights_source",
           "sha256_of", "student_weight_kwargs", "StudentWeightsError", "weights_file_errors"]

log = logging.getLogger(__name__)
HUB_PREFIX = "hf-hub:"
HUB_HOST = "huggingface.co"
CONNECT_TIMEOUT_S = 2.0
# timm's hub weight files, in the order timm tries them.
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def is_remote_source(source: str | os.PathLike | None) -> bool:
    return isinstance(source, str) and (source.startswith(HUB_PREFIX) or source.startswith(("https://", "http://")))


def _host(source: str) -> str:
    if source.startswith(HUB_PREFIX):
        return HUB_HOST
    return urllib.parse.urlparse(source).hostname or ""


def _offline_reason(source: str) -> str | None:
    """Why ``source`` cannot be fetched from here, or None when its host answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host = _host(source)
    port = 80 if source.startswith("http://") else 443
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host}:{port} is not reachable ({type(exc).__name__}: {exc})"
    return None


def check_weights_source(source: str | None, field: str) -> str | None:
    """Config-time check of a weights source (``field`` names the config key in the message)."""
    if not is_remote_source(source):
        return source
    if source.startswith("http://"):
        raise ValueError(f"{field}={source!r}: plain http is refused for weights; use https:// or a local path")
    if source.startswith(HUB_PREFIX) and not source[len(HUB_PREFIX):].strip("/"):
        raise ValueError(f"{field}={source!r}: a hub id needs a repository, "
                         "e.g. hf-hub:timm/hgnetv2_b0.ssld_stage2_ft_in1k")
    reason = _offline_reason(source)
    if reason is not None:
        raise ValueError(f"{field}={source!r} cannot be fetched: this machine is offline ({reason}). "
                         f"Download the file on a machine with internet access and pass its path "
                         f"({field}: /path/to/weights.pth or .safetensors)")
    return source


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTILLERY_WEIGHTS_CACHE", Path.home() / ".cache" / "distillery" / "weights"))


def _download_url(url: str, cache_dir: Path) -> tuple[str, str]:
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights"
    target = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    sha_file = target.with_name(target.name + ".sha256")
    if target.is_file() and sha_file.is_file():  # downloaded before: once per URL
        return str(target), sha_file.read_text().strip()
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sha_file.write_text(digest.hexdigest() + "\n")
    return str(target), digest.hexdigest()


def _download_hub(repo: str) -> str:
    # Here, not at the top (also below): config validation imports this module on the driver,
    # which must not pay for huggingface_hub, mlflow or torch (students.weights).
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for filename in HUB_FILENAMES:
        try:
            return hf_hub_download(repo, filename)
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"hf-hub:{repo} has none of {list(HUB_FILENAMES)}")


class RegistryLookupError(FileNotFoundError, DeterministicError):
    """A ``models:/`` URI that the registry cannot resolve: no store, no model, no such alias or
    version. The message names the URI and the store."""


def registry_tracking_uri(configured: str | None, local_dir: str | os.PathLike) -> str:
    """The store a ``models:/`` URI is looked up in: the jobs' rule (``tracking.tracking_uri``,
    else ``MLFLOW_TRACKING_URI``, else ``<local_dir>/mlflow.db``), with nothing created: a lookup
    must not leave a new, empty store behind (MLflow creates a sqlite file on first open)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(local_dir) / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    return uri


def _check_store(uri: str, tracking_uri: str) -> None:
    """Refuse a store that does not exist (before MLflow would create it) or does not answer."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise RegistryLookupError(f"{uri}: no MLflow store at {path} (the jobs' store: tracking.tracking_uri, "
                                      "else MLFLOW_TRACKING_URI, else runs/mlflow.db where the jobs ran); "
                                      "pass the store the model was registered in (--tracking-uri or "
                                      "tracking.tracking_uri)")
    elif tracking_uri.startswith(("http://", "https://")):
        from distillery.platform.tracking.runs import tracking_reachable  # here: see _download_hub (mlflow)

        try:
            tracking_reachable(tracking_uri)
        except ConnectionError as exc:
            raise RegistryLookupError(f"{uri}: {exc}") from None
    else:
        local = tracking_uri[len("file://"):] if tracking_uri.startswith("file://") else tracking_uri
        if "://" not in local and not Path(local).is_dir():
            raise RegistryLookupError(f"{uri}: no MLflow store at {local}")


def registry_version(uri: str, tracking_uri: str):
    """(client, model version) behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` in
    the store ``tracking_uri`` (which must exist: nothing is created)."""
    from mlflow.exceptions import MlflowException  # here: see _download_hub
    from mlflow.tracking import MlflowClient

    ref = uri[len("models:/"):]
    name, sep, alias = ref.partition("@")
    if not sep:
        name, _, number = ref.rpartition("/")
        if not name or not number.isdigit():
            raise RegistryLookupError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    _check_store(uri, tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryLookupError(f"{uri}: no registered model {name!r} in the store {tracking_uri}") from None
    try:
        version = client.get_model_version_by_alias(name, alias) if sep else client.get_model_version(name, number)
    except MlflowException:
        what = f"alias {alias!r}" if sep else f"version {number}"
        raise RegistryLookupError(f"{uri}: registered model {name!r} has no {what} in the store {tracking_uri}") from None
    if not version.run_id:
        raise RegistryLookupError(f"{uri}: version {version.version} has no source run in the store {tracking_uri}")
    return client, version


def fetch_registry_export(uri: str, dest: str | os.PathLike, tracking_uri: str) -> Path:
    """The ``export/`` artifacts (weights.safetensors, meta.json) of the run behind a registered
    model ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` in the store ``tracking_uri``,
    downloaded into ``dest``."""
    from mlflow.exceptions import MlflowException  # here: see _download_hub

    client, version = registry_version(uri, tracking_uri)
    try:
        local = client.download_artifacts(version.run_id, "export", str(dest))
    except (MlflowException, OSError) as exc:
        raise RegistryLookupError(f"{uri} (version {version.version}, run {version.run_id}): its export/ artifacts "
                                  f"cannot be read from the store {tracking_uri} ({exc})") from None
    try:  # the run's config: architecture overrides (num_queries, ...) the weights were trained with
        client.download_artifacts(version.run_id, "config.yaml", str(dest))
    except Exception as exc:  # noqa: BLE001 - older runs: the plain architecture
        log.warning("%s: no config.yaml in run %s (%s); building the plain architecture", uri, version.run_id, exc)
    if not (Path(local) / "weights.safetensors").is_file():
        raise RegistryLookupError(f"{uri} (run {version.run_id}) has no export/weights.safetensors: logged with "
                                  "tracking.log_model: false?")
    return Path(local)


def resolve_registry_weights(uri: str, tracking_uri: str, local_dir: str | os.PathLike) -> str:
    """A driver's ``models:/`` weights as a local export directory under ``<local_dir>/models/``
    (``<name>-v<version>``, downloaded once, renamed into place whole), for the workers to read."""
    client, version = registry_version(uri, tracking_uri)
    target = Path(local_dir) / "models" / f"{version.name}-v{version.version}"
    if (target / "weights.safetensors").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        export = fetch_registry_export(uri, tmp, tracking_uri)  # export/ (weights, meta), config.yaml beside it
        if (tmp / "config.yaml").is_file():
            os.replace(tmp / "config.yaml", export / "config.yaml")
        os.replace(export, target)  # whole: a folder at target is complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: version %s (run %s) -> %s", uri, version.version, version.run_id, target)
    return str(target)


def resolve_weights_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(local path, sha256) for a local path, ``hf-hub:<repo>`` or ``https://`` URL (a directory:
    no sha256). A ``models:/`` URI is refused: the driver resolves it (:func:`resolve_registry_weights`)."""
    source = os.fspath(source)
    if source.startswith("models:/"):
        raise ValueError(f"{source}: a models:/ URI is resolved on the driver, in the jobs' tracking store "
                         "(resolve_registry_weights); a worker never looks it up")
    if source.startswith(HUB_PREFIX):
        path = _download_hub(source[len(HUB_PREFIX):].strip("/"))
        return path, sha256_of(path)
    if source.startswith(("https://", "http://")):
        return _download_url(source, Path(cache_dir) if cache_dir else default_cache_dir())
    if not Path(source).exists():
        raise FileNotFoundError(f"weights file not found: {source}")
    return source, sha256_of(source) if Path(source).is_file() else ""


def student_weight_kwargs(student, category_names: list[str]) -> dict:
    """``build_student`` keywords for a job's ``student`` settings (weights, class_map,
    backbone_weights): remote sources fetched to local files, the class map as class indices."""
    from distillery.students.weights import class_map_from_names  # here: see _download_hub (torch)

    out: dict = {}
    if student.backbone_weights:
        out["backbone_weights"] = resolve_weights_source(student.backbone_weights)[0]
    if not student.weights:
        return out
    out["weights"] = resolve_weights_source(student.weights)[0]
    if student.class_map == "coco":
        out["class_map"] = class_map_from_names(category_names)
    elif isinstance(student.class_map, dict):
        unknown = sorted(set(student.class_map) - set(category_names))
        if unknown:
            raise ValueError(f"student.class_map names categories the dataset does not have: {unknown}; "
                             f"its categories: {list(category_names)}")
        out["class_map"] = {category_names.index(n): int(i) for n, i in student.class_map.items()}
    return out


class StudentWeightsError(ValueError, DeterministicError):
    """A student weights file that is missing or does not fit the model; the message names it."""


@contextlib.contextmanager
def weights_file_errors():
    """Weights-file errors (missing, unreadable, not fitting) as a user error: no retry, no traceback."""
    from distillery.students.weights import WeightsError  # here: see _download_hub (torch)

    try:
        yield
    except (WeightsError, FileNotFoundError) as exc:
        raise StudentWeightsError(str(exc)) from exc
