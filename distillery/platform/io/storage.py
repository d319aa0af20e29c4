"""One small layer over fsspec for plain paths, ``file://`` and ``s3://`` URIs.

Why a module of its own: every job reads datasets and writes caches, checkpoints and reports to
either local disk or S3, and each of those writes must be *atomic* (a reader never sees half a
file; an interrupted job leaves only complete files behind).

- Local files: write to a hidden temporary name in the same directory, fsync, then
  ``os.replace`` (atomic on POSIX).
- S3: a PUT is atomic per object (the object appears whole or not at all), so the data goes
  straight to its final key. Multi-file artefacts (a feature cache) write their manifest last:
  a manifest's presence means every shard it names was written.

S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``) or from :func:`configure_s3`. They are never logged or put in errors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from distillery.platform.errors import DeterministicError, UserFacingError

__all__ = [
    "DiskFullError",
    "OutputNotWritableError",
    "StorageError",
    "configure_s3",
    "exists",
    "file_sizes",
    "filesystem",
    "has_protocol",
    "is_absolute",
    "is_remote",
    "join",
    "listdir",
    "makedirs",
    "open_atomic",
    "pyarrow_filesystem",
    "read_bytes",
    "read_bytes_sha256",
    "read_text",
    "remove",
    "require_free_space",
    "require_writable",
    "s3_endpoint",
    "storage_env",
    "write_bytes",
    "write_text",
]

_S3_OPTIONS: dict[str, Any] = {}


class StorageError(OSError, UserFacingError):
    """A storage operation failed; the message names the URI (never credentials)."""


class OutputNotWritableError(StorageError, DeterministicError):
    """An output directory this job cannot write; checked before any work starts."""


class DiskFullError(StorageError, DeterministicError):
    """No space left where a job writes (before it starts, or during a write); the message names
    the path. Deterministic: a retry finds the same full disk, so Ray does not spend one."""


# The S3 clients that are not ours (MLflow's artifact store: boto3; pyarrow) read the endpoint
# from these environment variables: configure_s3 sets them for this process, so that every URI
# kind (data, cache, runs, artifacts) goes to the configured endpoint, and restores them after.
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")
_SAVED_ENV: dict[str, str | None] = {}


def _export_endpoint(endpoint_url: str | None) -> None:
    for name, value in _SAVED_ENV.items():  # undo an earlier configure_s3 first
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _SAVED_ENV.clear()
    if endpoint_url:
        for name in _ENDPOINT_ENV:
            _SAVED_ENV[name] = os.environ.get(name)
            os.environ[name] = endpoint_url


def s3_endpoint() -> str | None:
    """The S3 endpoint this process uses (None: the AWS default)."""
    configured = _S3_OPTIONS.get("client_kwargs", {}).get("endpoint_url")
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def configure_s3(endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None) -> None:
    """Set S3 options for this process (None leaves the AWS environment variables in charge).

    Jobs call it first, before any storage access: the dataset, the cache, run storage and
    MLflow artifacts then all use the configured endpoint."""
    _S3_OPTIONS.clear()
    _export_endpoint(endpoint_url)
    client_kwargs: dict[str, Any] = {}
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        _S3_OPTIONS["client_kwargs"] = client_kwargs
    if access_key_id and secret_access_key:
        _S3_OPTIONS["key"] = access_key_id
        _S3_OPTIONS["secret"] = secret_access_key


# S3 settings that may travel to Ray workers in a runtime env: where S3 is, never who you are.
# Credentials stay out (a runtime env is written to Ray's logs); workers read them from their own
# environment, which a local instance inherits and cluster nodes carry (env, instance role, file).
SHAREABLE_S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def storage_env(endpoint_url: str | None = None, region: str | None = None) -> dict[str, str]:
    """Environment variables that carry this process's S3 endpoint and region to Ray workers
    (the configured ones over the environment's). Never credentials: see SHAREABLE_S3_VARIABLES."""
    env = {name: os.environ[name] for name in SHAREABLE_S3_VARIABLES if os.environ.get(name)}
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    if region:
        env["AWS_DEFAULT_REGION"] = region
    return env


def _where(uri: str) -> str:
    """Where an S3 URI went (the endpoint is not a secret; it is what a user must check)."""
    if _protocol(uri) not in ("s3", "s3a"):
        return ""
    return f" (S3 endpoint {s3_endpoint() or 'AWS default'})"


def has_protocol(uri: str | Path) -> bool:
    """A URI with a protocol (``s3://``, ``memory://``, also ``file://``), not a plain path."""
    return "://" in str(uri)


def is_absolute(uri: str | Path) -> bool:
    """A URI or an absolute POSIX path: nothing to resolve it against."""
    return has_protocol(uri) or str(uri).startswith("/")


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if has_protocol(uri) else "file"


def is_remote(uri: str) -> bool:
    """Not on this machine's file system (``file://`` and plain paths are local)."""
    return _protocol(str(uri)) not in ("file", "local")


def filesystem(uri: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less path for ``uri``."""
    uri = str(uri)
    options: dict[str, Any] = {}
    if _protocol(uri) in ("s3", "s3a"):
        options = dict(_S3_OPTIONS)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "client_kwargs" not in options:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        return url_to_fs(uri, **options)
    except Exception as exc:  # bad protocol, missing backend
        raise StorageError(f"cannot open storage for {uri}: {type(exc).__name__}: {exc}") from None


def pyarrow_filesystem(uri: str | Path) -> pafs.FileSystem:
    """A pyarrow filesystem over :func:`filesystem` (so with our S3 settings: endpoint,
    credentials from the environment), for Ray Data reads and Ray Train/Tune run storage."""
    fs, _ = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(base: str | Path, *parts: str) -> str:
    """Join path parts onto a path or URI with '/' (never the OS separator for URIs)."""
    base = str(base)
    if has_protocol(base):
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return os.path.join(base, *parts)


def exists(uri: str | Path) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except Exception as exc:
        raise StorageError(f"cannot reach {uri}{_where(str(uri))}: {type(exc).__name__}: {exc}") from None


def makedirs(uri: str | Path) -> None:
    fs, path = filesystem(uri)
    if is_remote(str(uri)):
        return  # object stores have no directories
    fs.makedirs(path, exist_ok=True)


def listdir(uri: str | Path) -> list[str]:
    """Names (not paths) of the entries directly under ``uri``; empty if it does not exist."""
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            return []
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise StorageError(f"cannot list {uri}{_where(str(uri))}: {type(exc).__name__}: {exc}") from None
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def read_bytes(uri: str | Path) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None
    except Exception as exc:
        raise StorageError(f"cannot read {uri}{_where(str(uri))}: {type(exc).__name__}: {exc}") from None


def read_bytes_sha256(uri: str | Path, chunk_size: int = 8 << 20) -> tuple[bytes, str]:
    """(the bytes of ``uri``, their sha256 hex digest), hashed chunk by chunk as they are read:
    verifying a file costs no second pass over it."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    chunks = []
    try:
        with fs.open(path, "rb") as fh:
            while chunk := fh.read(chunk_size):
                digest.update(chunk)
                chunks.append(chunk)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None
    except Exception as exc:
        raise StorageError(f"cannot read {uri}{_where(str(uri))}: {type(exc).__name__}: {exc}") from None
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), digest.hexdigest()


def file_sizes(uri: str | Path) -> dict[str, int]:
    """Name -> size in bytes of the files directly under ``uri`` (one listing; empty if absent)."""
    fs, path = filesystem(uri)
    try:
        if not fs.exists(path):
            return {}
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        raise StorageError(f"cannot list {uri}{_where(str(uri))}: {type(exc).__name__}: {exc}") from None
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
            for e in entries if e.get("type") != "directory"}


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode("utf-8")


@contextlib.contextmanager
def open_atomic(uri: str | Path) -> Iterator[Any]:
    """Open ``uri`` for binary writing; the file appears at ``uri`` only if the block succeeds."""
    uri = str(uri)
    fs, path = filesystem(uri)
    if is_remote(uri):
        # Buffer in memory and PUT once at the end: an S3 object is all-or-nothing, and an
        # exception inside the block must not leave a partial upload behind.
        buf = io.BytesIO()
        yield buf
        try:
            fs.pipe_file(path, buf.getvalue())
        except Exception as exc:
            raise StorageError(f"cannot write {uri}{_where(uri)}: {type(exc).__name__}: {exc}") from None
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise DiskFullError(f"no space left on the device writing {uri} ({_free(directory)} free there): free "
                            "some space and rerun (complete files are kept; this one was not written)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``uri``."""
    with open_atomic(uri) as fh:
        fh.write(data)


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str | Path, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def _existing_ancestor(path: str) -> Path:
    """``path`` itself or its nearest ancestor that exists (what a job's first write would land in)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _free(path: str | Path) -> str:
    try:
        return f"{shutil.disk_usage(_existing_ancestor(str(path))).free / 1e6:.1f} MB"
    except OSError:
        return "unknown space"


def require_writable(uri: str | Path, key: str) -> None:
    """Refuse a local output location this process cannot write (a read-only directory or file
    system, a file where a directory is expected), naming ``key`` and the path; creates nothing.
    A probe file is created and removed in the nearest existing directory: permission bits alone
    say nothing to root, nor about a read-only mount. Remote URIs are checked by their first write."""
    uri = str(uri)
    if is_remote(uri):
        return
    path = filesystem(uri)[1]
    target = _existing_ancestor(path)
    if not target.is_dir():
        raise OutputNotWritableError(f"{key}={uri}: {target} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=target, prefix=".distillery-write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise OutputNotWritableError(f"{key}={uri}: {target} is not writable ({exc.strerror or exc}): "
                                     "choose a writable directory") from None


def require_free_space(uri: str | Path, needed_bytes: int, key: str, what: str) -> None:
    """Refuse to start writing about ``needed_bytes`` (``what`` says what they are) to a local
    ``uri`` whose file system has less free space, naming ``key`` and the path. Remote: no check."""
    uri = str(uri)
    if is_remote(uri):
        return
    target = _existing_ancestor(filesystem(uri)[1])
    free = shutil.disk_usage(target).free
    if free < needed_bytes:
        raise DiskFullError(f"{key}={uri}: {what} needs about {needed_bytes / 1e6:.1f} MB, {free / 1e6:.1f} MB are "
                            f"free on {target}: free some space or choose another {key}")
