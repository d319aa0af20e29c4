"""The teacher-feature cache: Parquet shards keyed by image id, plus a manifest written last.

Layout under the cache URI (local directory or ``s3://bucket/prefix``)::

    plan.json             what this cache is being built from (written first; guards resume)
    shard-00000.parquet   rows: image_id, view, features, scale, params
    shard-00001.parquet
    ...
    manifest.json         written last: its presence means every shard it lists is complete

Each row holds one teacher grid of one image (``view`` 0: the plain image), token-major: ``features`` is the raw bytes of a
(H*W, C) array in the storage dtype. ``fp16`` stores the grid as is; ``int8`` stores a symmetric
per-token quantisation (one float32 scale per token = max|x| / 127), so each token keeps its own
dynamic range; ``pca`` stores each token's coefficients on a PCA basis of the teacher's channels,
quantised per token to 8 or 4 bits (``features``: the packed codes, ``scale``: one float16 per
token; see :mod:`distillery.platform.cache.codec`). A ``pca`` cache keeps its basis beside the
manifest (``codec-pca.safetensors``, fitted by the cache job before the first shard); the plan
and the manifest record its settings and sha256 (``codec``), and a reader refuses a cache whose
codec is not the configured one, or whose basis file is missing or not the recorded one.
Columns are plain Parquet types, so Ray Data (``ray.data.read_parquet``), pandas or pyarrow read
the shards natively from local disk and S3.

Views (``views: K`` > 1): each image has K rows, views 0..K-1, stored next to each other and
sorted by (image_id, view). View 0 is the plain image; views 1..K-1 are the teacher grids of
pre-augmented images, and ``params`` holds each view's transform parameters as JSON (see
``distillery.data.views.apply_view``). The manifest records ``views``, the ``view_seed``
and the ``view_recipe`` they were drawn with. K is part of the plan: a cache URI holds one K, and
resuming or reading it with another K is refused (a K=4 cache is not a K=1 cache plus extras:
its shards and checksums differ). With K = 1 the plan and manifest are those of a cache
without views, byte for byte.

Shards are planned deterministically from the sorted image ids and the shard size, so an
interrupted build resumes by computing only the shards whose file is missing, and ends with the
same manifest as an uninterrupted one.

The manifest carries the teacher fingerprint. A reader that expects another teacher refuses
and prints both fingerprints and the fields that differ.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distillery.platform.io import storage
from distillery.platform.cache.codec import (CODEC_FIELDS, CodecFileError, PcaCodec, StorageDtype, decode_features,
                                             encode_features, read_verified_codec)
from distillery.platform.cache.checks import (REPAIR_HINT, CacheError, CacheShardError, FingerprintMismatchError,
                                              fingerprint_diff, fingerprint_digest, manifest_problems,
                                              missing_shard_error, parse_shard, read_shard_columns,
                                              read_verified_shard, shard_name)

__all__ = [
    "CacheError",
    "CacheShardError",
    "CodecMismatchError",
    "FeatureCache",
    "FeatureCacheWriter",
    "FingerprintMismatchError",
    "ShardInfo",
    "manifest_problems",
    "parse_shard",
    "plan_shards",
    "read_verified_shard",
    "shard_name",
]


log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"


class CodecMismatchError(FingerprintMismatchError):
    """The cache stores its features with another codec (dtype, or PCA settings) than configured:
    refused like another teacher's cache, never rebuilt over."""


def plan_shards(image_ids: Iterable[int], shard_size: int) -> list[list[int]]:
    """Split sorted image ids into consecutive shards of ``shard_size`` (last one may be short)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ids = sorted(int(i) for i in image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    return [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]


_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("view", pa.int32()),
    ("features", pa.binary()),
    ("scale", pa.binary()),
    ("params", pa.string()),
])


def _shard_bytes(image_ids: Sequence[int], grids: np.ndarray, dtype: StorageDtype,
                 views: Sequence[int] | None = None, params: Sequence[str] | None = None,
                 codec: PcaCodec | None = None) -> bytes:
    feats, scales = [], []
    for g in grids:
        f, s = encode_features(g, dtype, codec)
        feats.append(f)
        scales.append(s)
    table = pa.table({
        "image_id": pa.array([int(i) for i in image_ids], pa.int64()),
        "view": pa.array(list(views) if views is not None else [0] * len(image_ids), pa.int32()),
        "features": pa.array(feats, pa.binary()),
        "scale": pa.array(scales, pa.binary()),
        "params": pa.array(list(params) if params is not None else [None] * len(image_ids), pa.string()),
    }, schema=_SCHEMA)
    buf = io.BytesIO()
    # No Parquet compression: fp16/int8 activations and quantised codes barely compress, and reads stay cheap.
    pq.write_table(table, buf, compression="none", write_statistics=["image_id"])
    return buf.getvalue()


# --------------------------------------------------------------------------- writer

@dataclass(frozen=True)
class ShardInfo:
    index: int
    name: str
    count: int
    sha256: str
    bytes: int
    first_image_id: int | None  # None: a shard whose every image was skipped (bad_records=skip)
    last_image_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class FeatureCacheWriter:
    """Writes one cache: ``begin`` (plan), ``write_shard`` (any order, any process), ``finalize``.

    A ``pca`` cache's writer holds the fitted ``codec`` and ``codec_record`` (its settings, file
    name and sha256: what the plan and the manifest record); the codec file itself is written
    beside them before ``begin`` (by the cache job)."""

    def __init__(self, uri: str, fingerprint: dict[str, Any], grid: Sequence[int], dtype: StorageDtype,
                 shard_size: int, dataset: dict[str, Any], views: int = 1, view_seed: int = 0,
                 view_recipe: dict[str, Any] | None = None, codec: PcaCodec | None = None,
                 codec_record: dict[str, Any] | None = None):
        if dtype not in ("fp16", "int8", "pca"):
            raise ValueError(f"cache dtype must be 'fp16', 'int8' or 'pca', got {dtype!r}")
        if (dtype == "pca") != (codec is not None and codec_record is not None):
            raise ValueError("a pca cache needs its codec and codec_record; other dtypes take neither")
        if codec is not None and codec.channels != int(grid[0]):
            raise ValueError(f"the codec's basis has {codec.channels} channels, the grid {int(grid[0])}")
        self.codec = codec
        self.codec_record = dict(codec_record) if codec_record is not None else None
        self.uri = str(uri)
        self.fingerprint = dict(fingerprint)
        self.grid = [int(v) for v in grid]
        self.dtype: StorageDtype = dtype
        self.shard_size = int(shard_size)
        self.dataset = dict(dataset)
        self.views = int(views)
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        if self.views > 1 and view_recipe is None:
            raise ValueError("a cache with views > 1 needs the view_recipe its views were drawn with")
        self.view_seed = int(view_seed)
        self.view_recipe = dict(view_recipe) if view_recipe is not None else None
        self._reused: dict[int, ShardInfo] = {}  # shards of an earlier run kept by begin()
        self._reused_skipped: list[dict[str, Any]] = []  # their images skipped as bad records

    def _view_fields(self) -> dict[str, Any]:
        # Only caches with views carry these keys: a K=1 plan/manifest stays byte-identical to
        # one written before views existed (so its earlier builds still resume).
        return {"view_seed": self.view_seed, "view_recipe": self.view_recipe} if self.views > 1 else {}

    def _codec_fields(self) -> dict[str, Any]:
        # Only pca caches carry the key (fp16/int8 plans and manifests stay byte-identical).
        return {"codec": self.codec_record} if self.codec_record is not None else {}

    # The plan: everything that decides the bytes of the shards.
    def plan_doc(self, shards: list[list[int]]) -> dict[str, Any]:
        ids_digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
        return {"format_version": FORMAT_VERSION, "fingerprint_digest": fingerprint_digest(self.fingerprint),
                "dtype": self.dtype, "grid": self.grid, "shard_size": self.shard_size, "views": self.views,
                "num_shards": len(shards), "image_ids_sha256": ids_digest,
                "dataset": self.dataset, **self._view_fields(), **self._codec_fields()}

    def begin(self, shards: list[list[int]]) -> list[int]:
        """Record the plan (or check it against an earlier run's); return indices still to write."""
        plan = self.plan_doc(shards)
        plan_uri = storage.join(self.uri, PLAN)
        if storage.exists(plan_uri):
            old = json.loads(storage.read_text(plan_uri))
            if old != plan:
                diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise CacheError(
                    f"cache {self.uri} was started with a different plan (fields differ: {', '.join(diff)}); "
                    "use a new cache URI or delete the old one")
        else:
            storage.makedirs(self.uri)
            storage.write_text(plan_uri, json.dumps(plan, indent=1, sort_keys=True))
        self.remove_stale_temporaries()
        self._reused = self._check_reused_shards(shards)
        return [i for i in range(len(shards)) if i not in self._reused]

    def _earlier_manifest(self) -> tuple[dict[str, str], dict[int, dict[str, Any]]]:
        """(shard name -> sha256, image id -> skip record) from an earlier run's manifest (empty
        when there is none or it is unreadable)."""
        try:
            manifest = json.loads(storage.read_text(storage.join(self.uri, MANIFEST)))
            return ({s["name"]: s["sha256"] for s in manifest["shards"]},
                    {int(r["image_id"]): r for r in manifest.get("skipped", [])})
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            return {}, {}

    def _check_reused_shards(self, shards: list[list[int]]) -> dict[int, ShardInfo]:
        """The shards an earlier run finished that can be kept. Each is read once (hashed as it
        streams in; these bytes also give the manifest its entry) and kept only if it parses,
        holds the planned image ids and matches the checksum an earlier manifest recorded; any
        other is deleted, with a warning naming it, and recomputed: this is how a rerun repairs
        a truncated, corrupted or deleted shard."""
        sizes = storage.file_sizes(self.uri)
        recorded, earlier_skips = self._earlier_manifest()
        kept: dict[int, ShardInfo] = {}
        self._reused_skipped = []
        for i, planned in enumerate(shards):
            name = shard_name(i)
            if name not in sizes:
                continue
            uri = storage.join(self.uri, name)
            data, digest = storage.read_bytes_sha256(uri)
            problem, ids = None, []
            if name in recorded and recorded[name] != digest:
                problem = "does not match its checksum in the earlier manifest"
            else:
                try:
                    ids = parse_shard(data, uri, ["image_id"]).column("image_id").to_pylist()
                except CacheShardError:
                    problem = "is not a readable Parquet file (truncated?)"
                else:
                    if not set(ids) <= set(planned):  # fewer: images skipped as bad records
                        problem = "holds other images than the plan assigns to it"
            if problem is not None:
                log.warning("cache shard %s %s: recomputing it", uri, problem)
                storage.remove(uri)
                continue
            kept[i] = ShardInfo(i, name, len(set(ids)), digest, len(data), *_id_range(ids))
            self._reused_skipped.extend(earlier_skips.get(iid, {"image_id": iid, "reason": "skipped by an earlier run"})
                                        for iid in sorted(set(planned) - set(ids)))
        return kept

    def remove_stale_temporaries(self) -> None:
        """Temporary files of an interrupted local write (never visible as shards)."""
        for name in storage.listdir(self.uri):
            if name.startswith(".") and ".tmp-" in name:
                storage.remove(storage.join(self.uri, name))

    def write_shard(self, index: int, image_ids: Sequence[int], grids: np.ndarray,
                    views: Sequence[int] | None = None, params: Sequence[str] | None = None) -> ShardInfo:
        grids = np.asarray(grids)
        if grids.ndim != 4 or list(grids.shape[1:]) != self.grid:
            raise CacheError(f"shard {index}: features of shape {tuple(grids.shape)} do not match grid {self.grid}")
        if self.views > 1 and (views is None or params is None or len(grids) != len(set(image_ids)) * self.views):
            raise CacheError(f"shard {index}: a cache with {self.views} views needs {self.views} rows per image, "
                             "each with its view index and params")
        data = _shard_bytes(image_ids, grids, self.dtype, views, params, self.codec)
        name = shard_name(index)
        storage.write_bytes(storage.join(self.uri, name), data)
        # count = images (a view cache has `views` rows per image).
        return ShardInfo(index, name, len(set(image_ids)), hashlib.sha256(data).hexdigest(), len(data),
                         *_id_range(image_ids))

    def shard_info_from_file(self, index: int) -> ShardInfo:
        """Re-derive a shard's info from its file (for shards written by an earlier run)."""
        name = shard_name(index)
        data = storage.read_bytes(storage.join(self.uri, name))
        ids = pq.read_table(io.BytesIO(data), columns=["image_id"]).column("image_id").to_pylist()
        return ShardInfo(index, name, len(set(ids)), hashlib.sha256(data).hexdigest(), len(data), *_id_range(ids))

    def finalize(self, num_shards: int, written: list[ShardInfo],
                 skipped: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write the manifest last. Shards not in ``written`` (finished by an earlier, interrupted
        run) are described from their files. ``skipped``: the images left out of the written
        shards as bad records (``bad_records: skip``); the manifest lists them (with those of
        earlier runs' shards), so that training does not expect features for them."""
        by_index = {s.index: s for s in written}
        unknown = sorted(set(by_index) - set(range(num_shards)))
        if unknown:
            raise CacheError(f"cache {self.uri}: shard indices {unknown} are outside the plan of {num_shards}")
        shards = []
        for i in range(num_shards):
            if i in by_index:
                shards.append(by_index[i])
            elif i in self._reused:
                shards.append(self._reused[i])
            else:
                try:
                    shards.append(self.shard_info_from_file(i))
                except FileNotFoundError:
                    raise CacheError(f"cache {self.uri}: cannot finalize, {shard_name(i)} was never written") from None
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "fingerprint_digest": fingerprint_digest(self.fingerprint),
            "grid": self.grid,
            "dtype": self.dtype,
            "views": self.views,
            "shard_size": self.shard_size,
            "count": sum(s.count for s in shards),
            "dataset": self.dataset,
            "shards": [s.to_dict() for s in shards],
            **self._view_fields(),
            **self._codec_fields(),
        }
        all_skipped = sorted([*(skipped or []), *self._reused_skipped], key=lambda r: int(r["image_id"]))
        if all_skipped:  # only then: a clean cache's manifest stays byte-identical to earlier ones
            manifest["skipped"] = all_skipped
        storage.write_text(storage.join(self.uri, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
        return manifest


# --------------------------------------------------------------------------- reader

class FeatureCache:
    """A finished cache: the manifest, fingerprint check, and per-image feature lookup.

    Opening it checks the manifest's fields (cheap: the JSON only); :meth:`check_shards` checks
    every shard file is there with its recorded size (one listing); :meth:`check_covers` reads
    the shards' ``image_id``/``view`` columns only; every grid read through it (and every shard an
    ingest task reads) is verified against the manifest's sha256 as its bytes stream in."""

    def __init__(self, uri: str, expected_fingerprint: dict[str, Any] | None = None,
                 expected_codec: dict[str, Any] | None = None):
        self.uri = str(uri)
        self.manifest_uri = manifest_uri = storage.join(self.uri, MANIFEST)
        try:
            text = storage.read_text(manifest_uri)
        except FileNotFoundError:
            hint = " (a build was started but not finished: rerun the cache job to resume it)" \
                if storage.exists(storage.join(self.uri, PLAN)) else ""
            raise CacheError(f"no feature cache at {self.uri}: {manifest_uri} not found{hint}") from None
        try:
            self.manifest: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CacheError(f"{manifest_uri} is not valid JSON ({exc}): {REPAIR_HINT}") from None
        if not isinstance(self.manifest, dict):
            raise CacheError(f"{manifest_uri} is not a cache manifest (a JSON object): {REPAIR_HINT}")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{manifest_uri}: format_version {self.manifest.get('format_version')} "
                             f"is not {FORMAT_VERSION}")
        problems = manifest_problems(self.manifest)
        if problems:
            raise CacheError(f"{manifest_uri}: {problems[0]}" + "".join(f"\n  {p}" for p in problems[1:])
                             + f"\n{REPAIR_HINT}")
        self._shard_info = {s["name"]: s for s in self.manifest["shards"]}
        if expected_fingerprint is not None:
            self.check_fingerprint(expected_fingerprint)
        if expected_codec is not None:
            self.check_codec(expected_codec)
        self._rows: dict[tuple[int, int], tuple[str, int]] | None = None
        self._index: dict[int, tuple[str, int]] | None = None
        self._tables: dict[str, pa.Table] = {}
        self._codec: PcaCodec | None = None

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def grid(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["grid"]
        return int(c), int(h), int(w)

    @property
    def dtype(self) -> StorageDtype:
        return self.manifest["dtype"]

    @property
    def codec_record(self) -> dict[str, Any] | None:
        """A pca cache's codec as the manifest records it (settings, file name, sha256); else None."""
        return self.manifest.get("codec")

    @property
    def codec_uri(self) -> str | None:
        record = self.codec_record
        return storage.join(self.uri, record["file"]) if record is not None else None

    def codec(self) -> PcaCodec | None:
        """A pca cache's fitted codec, read from its file and checked against the manifest's
        sha256 (None for fp16/int8)."""
        record = self.codec_record
        if record is None:
            return None
        if self._codec is not None:
            return self._codec
        try:
            self._codec = read_verified_codec(self.codec_uri, record["sha256"])
            return self._codec
        except CodecFileError as exc:
            raise CodecFileError(f"feature cache {self.uri}: {exc}; the shards cannot be decoded without the basis "
                                 f"they were encoded with: delete {self.uri} and rerun the cache job") from None

    def ingest_meta(self) -> dict[str, Any]:
        """What the training ingest needs to decode this cache's rows (``ingest.rows_to_samples``'s
        ``cache_meta``): dtype, grid, views, uri and, for pca, where its basis is and its sha256."""
        record = self.codec_record
        return {"dtype": self.dtype, "grid": list(self.grid), "views": self.views, "uri": self.uri,
                "codec": {"uri": self.codec_uri, "sha256": record["sha256"]} if record is not None else None}

    def codec_spec(self) -> dict[str, Any]:
        """What this cache stores, in the terms of ``CacheLocation.codec_spec``."""
        record = self.codec_record or {}
        return {"dtype": self.dtype, **{k: record[k] for k in CODEC_FIELDS if k in record}}

    def check_codec(self, expected: dict[str, Any]) -> None:
        """Refuse a cache stored with another codec than ``expected`` (``CacheLocation.codec_spec``),
        naming the config fields that differ and both values."""
        found = self.codec_spec()
        differ = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
        if "dtype" in differ:  # the pca settings mean nothing to the other dtypes
            differ = ["dtype"]
        if differ:
            names = ", ".join("cache.dtype" if k == "dtype" else f"cache.pca.{k}" for k in differ)
            raise CodecMismatchError(
                f"feature cache {self.uri} was stored with another codec (fields differ: {names})\n"
                f"  configured: {json.dumps(expected, sort_keys=True)}\n"
                f"  cache:      {json.dumps(found, sort_keys=True)}\n"
                "Either set those fields to the cache's values, or build a cache with this codec into a "
                "new cache.uri (jobs/cache_features.py).")

    @property
    def views(self) -> int:
        """Teacher grids per image: 1 (the plain image) or K (plain + K-1 pre-augmented views)."""
        return int(self.manifest.get("views", 1))

    @property
    def view_seed(self) -> int | None:
        return self.manifest.get("view_seed")

    @property
    def view_recipe(self) -> dict[str, Any] | None:
        return self.manifest.get("view_recipe")

    @property
    def skipped_image_ids(self) -> set[int]:
        """Images the cache job skipped as bad records (``data.bad_records: skip``)."""
        return {int(r["image_id"]) for r in self.manifest.get("skipped", [])}

    @property
    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, s["name"]) for s in self.manifest["shards"]]

    def check_fingerprint(self, expected: dict[str, Any]) -> None:
        found = self.fingerprint
        if fingerprint_digest(expected) != self.manifest.get("fingerprint_digest") or expected != found:
            diff = fingerprint_diff(expected, found)
            raise FingerprintMismatchError(
                f"feature cache {self.uri} was made by another teacher (fields differ: {', '.join(diff)})\n"
                f"  expected: {json.dumps(expected, sort_keys=True)}\n"
                f"  cache:    {json.dumps(found, sort_keys=True)}\n"
                "Either point cache.uri at a cache built with this teacher, or build one into a new "
                "cache.uri (jobs/cache_features.py with this teacher), or set the teacher.* fields that "
                "differ to the cache's values.")

    def check_covers(self, image_ids: Iterable[int]) -> None:
        """Raise naming the missing ids if the cache lacks any of ``image_ids`` (or any of their views)."""
        wanted = set(int(i) for i in image_ids)
        skipped = wanted & self.skipped_image_ids
        if skipped:
            log.warning("feature cache %s: %d images of the dataset were skipped as bad records when it was "
                        "built (its manifest lists them): training leaves them out", self.uri, len(skipped))
            wanted -= skipped
        missing = sorted(wanted - set(self.index))
        if missing:
            shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise CacheError(f"feature cache {self.uri} lacks {len(missing)} images of the dataset: {shown}")
        rows = self._row_index()
        partial = sorted(i for i in wanted if any((i, v) not in rows for v in range(self.views)))
        if partial:
            shown = ", ".join(str(i) for i in partial[:10]) + (" ..." if len(partial) > 10 else "")
            raise CacheError(f"feature cache {self.uri} lacks some of the {self.views} views of "
                             f"{len(partial)} images: {shown}")

    def check_views(self, views: int, recipe: dict[str, Any] | None = None) -> None:
        """Refuse a cache whose number of views (or, with views, whose view recipe) is not the
        configured one; the message names the cache and both values."""
        if int(views) != self.views:
            raise CacheError(
                f"feature cache {self.uri} has {self.views} view(s) per image but cache.views={views} is "
                f"configured: set cache.views={self.views}, or build a {views}-view cache at another "
                f"cache.uri (jobs/cache_features.py cache.views={views})")
        if self.views > 1 and recipe is not None and dict(recipe) != self.view_recipe:
            diff = sorted(k for k in set(recipe) | set(self.view_recipe or {})
                          if recipe.get(k) != (self.view_recipe or {}).get(k))
            raise CacheError(
                f"feature cache {self.uri}: its views were drawn with another augmentation recipe "
                f"(fields differ: {', '.join(diff)}): cache {json.dumps(self.view_recipe, sort_keys=True)}, "
                f"training {json.dumps(dict(recipe), sort_keys=True)}")

    def check_shards(self) -> None:
        """Every shard the manifest lists is present with its recorded size (one listing, no
        reads): a deleted or truncated shard fails here, on the driver, named."""
        sizes = storage.file_sizes(self.uri)
        for s in self.manifest["shards"]:
            uri = storage.join(self.uri, s["name"])
            if s["name"] not in sizes:
                raise missing_shard_error(uri, self.manifest_uri)
            if sizes[s["name"]] != s["bytes"]:
                raise CacheShardError(f"cache shard {uri} has {sizes[s['name']]} bytes, {self.manifest_uri} "
                                      f"records {s['bytes']} (truncated or overwritten): {REPAIR_HINT}",
                                      uri, self.manifest_uri)
        record = self.codec_record
        if record is not None and record["file"] not in sizes:
            raise CodecFileError(f"codec file {self.codec_uri} is missing (listed in {self.manifest_uri}): the "
                                 f"shards cannot be decoded without it: delete {self.uri} and rerun the cache job")

    def read_shard(self, name: str) -> bytes:
        """A shard's bytes, verified against the manifest's sha256 as they are read."""
        return read_verified_shard(storage.join(self.uri, name), self._shard_info[name]["sha256"],
                                   self.manifest_uri)

    def verify(self) -> None:
        """Check every shard's presence, size and checksum against the manifest (reads every byte)."""
        self.check_shards()
        for s in self.manifest["shards"]:
            self.read_shard(s["name"])

    def _table(self, name: str) -> pa.Table:
        if name not in self._tables:
            uri = storage.join(self.uri, name)
            self._tables[name] = parse_shard(self.read_shard(name), uri)
        return self._tables[name]

    def _row_index(self) -> dict[tuple[int, int], tuple[str, int]]:
        """(image_id, view) -> (shard name, row); built lazily from the shards' id columns only
        (the driver of a COCO-size run must not read, or hold, every grid)."""
        if self._rows is None:
            rows: dict[tuple[int, int], tuple[str, int]] = {}
            for s in self.manifest["shards"]:
                name = s["name"]
                t = self._tables[name] if name in self._tables else read_shard_columns(
                    storage.join(self.uri, name), ["image_id", "view"], self.manifest_uri)
                ids = t.column("image_id").to_pylist()
                views = t.column("view").to_pylist()
                for row, (iid, view) in enumerate(zip(ids, views)):
                    rows[(iid, view)] = (s["name"], row)
            self._rows = rows
        return self._rows

    @property
    def index(self) -> dict[int, tuple[str, int]]:
        """image_id -> (shard name, row) of its plain view (view 0)."""
        if self._index is None:
            self._index = {iid: loc for (iid, view), loc in self._row_index().items() if view == 0}
        return self._index

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _locate(self, image_id: int, view: int) -> tuple[str, int]:
        if not 0 <= int(view) < self.views:
            raise CacheError(f"view {view} is out of range: feature cache {self.uri} has {self.views} view(s)")
        try:
            return self._row_index()[(int(image_id), int(view))]
        except KeyError:
            raise CacheError(f"image id {image_id} (view {view}) is not in feature cache {self.uri}") from None

    def get(self, image_id: int, view: int = 0) -> np.ndarray:
        """The float32 (C, H, W) grid of one image (``view`` 0: the plain image)."""
        name, row = self._locate(image_id, view)
        t = self._table(name)
        feats = t.column("features")[row].as_py()
        scale = t.column("scale")[row].as_py()
        return decode_features(feats, scale, self.dtype, self.grid, self.codec())

    def params(self, image_id: int, view: int) -> dict[str, Any] | None:
        """A view's transform parameters (None in a cache without views)."""
        name, row = self._locate(image_id, view)
        text = self._table(name).column("params")[row].as_py()
        return json.loads(text) if text is not None else None


def _id_range(image_ids: Sequence[int]) -> tuple[int | None, int | None]:
    return (int(min(image_ids)), int(max(image_ids))) if len(image_ids) else (None, None)


def manifest_sha256(uri: str) -> str:
    """sha256 of a cache's manifest file (a lineage tag for models trained on it)."""
    return hashlib.sha256(storage.read_bytes(storage.join(uri, MANIFEST))).hexdigest()

