"""Integrity checks of a feature cache: the errors a reader raises, the manifest's field checks,
and shard reads verified against the manifest's sha256 as the bytes stream in.

A damaged cache (a shard missing, truncated, or not matching its checksum) is repaired by
rerunning the cache job with the same ``cache.uri``: it keeps the intact shards and recomputes
exactly the damaged ones (``FeatureCacheWriter.begin``).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from distillery.platform.io import storage
from distillery.platform.errors import DeterministicError

__all__ = ["REPAIR_HINT", "CacheError", "CacheShardError", "FingerprintMismatchError", "fingerprint_diff",
           "fingerprint_digest", "manifest_problems", "missing_shard_error", "parse_shard", "read_shard_columns",
           "read_verified_shard", "shard_name"]


class CacheError(RuntimeError, DeterministicError):
    """A cache that cannot be used as asked; the message names the URI and the reason."""


class FingerprintMismatchError(CacheError):
    """The cache was produced by another teacher than the one expected."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


class CacheShardError(CacheError):
    """One shard of a finished cache is missing, truncated or does not match its checksum; the
    cache job repairs it (it recomputes exactly the shards that fail these checks)."""

    def __init__(self, message: str, shard_uri: str = "", manifest_uri: str = ""):
        super().__init__(message)
        self.shard_uri = shard_uri
        self.manifest_uri = manifest_uri


REPAIR_HINT = "rerun the cache job to repair it (jobs/cache_features.py with the same cache.uri)"
_HEX = frozenset("0123456789abcdef")


def _is_count(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def manifest_problems(manifest: dict[str, Any]) -> list[str]:
    """What is wrong with a manifest's fields (empty when it is consistent): the driver checks
    this before any worker reads a shard, so a hand-edited field fails there, named."""
    problems = []
    grid = manifest.get("grid")
    if not (isinstance(grid, list) and len(grid) == 3 and all(_is_count(v, 1) for v in grid)):
        problems.append(f"grid must be [channels, height, width] of positive integers, got {grid!r}")
    if manifest.get("dtype") not in ("fp16", "int8", "pca"):
        problems.append(f"dtype must be 'fp16', 'int8' or 'pca', got {manifest.get('dtype')!r}")
    codec = manifest.get("codec")
    if manifest.get("dtype") == "pca" or codec is not None:
        problems.extend(_codec_problems(codec, manifest.get("dtype"), grid))
    if not _is_count(manifest.get("views", 1), 1):
        problems.append(f"views must be a positive integer, got {manifest.get('views')!r}")
    fp = manifest.get("fingerprint")
    if not isinstance(fp, dict) or not fp:
        problems.append(f"fingerprint must be the teacher's fingerprint (a mapping), got {fp!r}")
    elif not problems and all(_is_count(fp.get(k), 1) for k in ("embed_dim", "input_size", "pool", "patch_size")):
        side = fp["input_size"] // fp["pool"] // fp["patch_size"]
        if grid != [fp["embed_dim"], side, side]:
            problems.append(f"grid {grid} is not the grid of the teacher in the fingerprint "
                            f"([{fp['embed_dim']}, {side}, {side}]: embed_dim, input_size / pool / patch_size)")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        problems.append(f"shards must be a list, got {shards!r:.80}")
        return problems
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            problems.append(f"{where} must be a mapping, got {shard!r:.80}")
            continue
        if shard.get("name") != shard_name(i):
            problems.append(f"{where}.name must be {shard_name(i)!r}, got {shard.get('name')!r}")
        sha = shard.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX):
            problems.append(f"{where}.sha256 must be 64 hex digits, got {sha!r}")
        for key, minimum in (("count", 0), ("bytes", 1)):
            if not _is_count(shard.get(key), minimum):
                problems.append(f"{where}.{key} must be an integer >= {minimum}, got {shard.get(key)!r}")
    counts = [s.get("count") for s in shards if isinstance(s, dict)]
    if all(_is_count(c) for c in counts) and manifest.get("count") != sum(counts):
        problems.append(f"count {manifest.get('count')!r} is not the sum of the shards' counts ({sum(counts)})")
    return problems


def _codec_problems(codec: Any, dtype: Any, grid: Any) -> list[str]:
    if dtype != "pca":
        return [f"codec is recorded but dtype is {dtype!r}, not 'pca'"]
    if not isinstance(codec, dict):
        return [f"codec must be the pca codec's record (a mapping), got {codec!r:.80}"]
    problems = []
    if codec.get("method") != "pca":
        problems.append(f"codec.method must be 'pca', got {codec.get('method')!r}")
    if codec.get("bits") not in (4, 8):
        problems.append(f"codec.bits must be 4 or 8, got {codec.get('bits')!r}")
    channels = grid[0] if isinstance(grid, list) and grid and _is_count(grid[0], 1) else None
    if codec.get("channels") != channels:
        problems.append(f"codec.channels must be the grid's channels ({channels}), got {codec.get('channels')!r}")
    dims = codec.get("dims")
    if not (_is_count(dims, 1) and (channels is None or dims <= channels)):
        problems.append(f"codec.dims must be an integer from 1 to the grid's channels, got {dims!r}")
    if not _is_count(codec.get("fit_images"), 1):
        problems.append(f"codec.fit_images must be a positive integer, got {codec.get('fit_images')!r}")
    name = codec.get("file")
    if not (isinstance(name, str) and name and "/" not in name and not name.startswith(".")):
        problems.append(f"codec.file must be a file name beside the manifest, got {name!r}")
    sha = codec.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX):
        problems.append(f"codec.sha256 must be 64 hex digits, got {sha!r}")
    return problems


def read_verified_shard(uri: str, sha256: str, manifest_uri: str) -> bytes:
    """The bytes of shard ``uri``, hashed as they stream in and checked against ``sha256`` (its
    entry in ``manifest_uri``); a missing or mismatching shard raises :class:`CacheShardError`."""
    try:
        data, digest = storage.read_bytes_sha256(uri)
    except FileNotFoundError:
        raise missing_shard_error(uri, manifest_uri) from None
    if digest != sha256:
        raise CacheShardError(f"cache shard {uri} does not match its checksum in {manifest_uri} "
                              f"(sha256 {digest[:12]}..., manifest {str(sha256)[:12]}...): {REPAIR_HINT}",
                              uri, manifest_uri)
    return data


def parse_shard(data: bytes, uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A shard's Parquet bytes as a table; bytes that are not a readable shard name the file."""
    try:
        return pq.read_table(io.BytesIO(data), columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(uri, exc) from None


def read_shard_columns(uri: str, columns: Sequence[str], manifest_uri: str) -> pa.Table:
    """Only ``columns`` of shard ``uri`` (Parquet reads the footer and those column chunks, not the
    features: a few KB per shard for ``image_id``/``view``). Not checked against the sha256:
    the full reads are (:func:`read_verified_shard`)."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=list(columns))
    except FileNotFoundError:
        raise missing_shard_error(uri, manifest_uri) from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(uri, exc) from None


def missing_shard_error(uri: str, manifest_uri: str) -> CacheShardError:
    """The error for a shard the manifest lists and the storage does not have."""
    return CacheShardError(f"cache shard {uri} is missing (listed in {manifest_uri}): {REPAIR_HINT}",
                           uri, manifest_uri)


def _unreadable(uri: str, exc: Exception) -> CacheShardError:
    return CacheShardError(f"cache shard {uri} is not a readable Parquet file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}): {REPAIR_HINT}", uri)


# The teacher module pulls in torch/timm (seconds per process); the data-side processes that only
# read a cache (Ray Data decode actors) must not pay that, so these two load it on first use.
def fingerprint_digest(fp: dict[str, Any]) -> str:
    from distillery.teachers.dinov3 import fingerprint_digest as digest

    return digest(fp)


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    from distillery.teachers.dinov3 import fingerprint_diff as diff

    return diff(a, b)
