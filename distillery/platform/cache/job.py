"""The feature-cache job: stream a COCO dataset through the frozen teacher with Ray Data.

Pipeline (one Ray Data row = one planned shard, so a shard is the unit of work and of resume)::

    from_items(shard plans)                      driver: which images go in which shard
      .map(decode + resize, CPU tasks)           -> (S, 3, H, W) uint8
      .map_batches(TeacherActor, ActorPool)      -> (S, C, h, w) float32; GPU when present
      .map(write shard, CPU tasks)               -> Parquet file (atomic) + its checksum
    driver: collect shard infos, write manifest.json last

Resume: shards are planned deterministically from the sorted image ids, so a rerun lists the
finished shard files, computes only the missing ones and ends with the same manifest.

Decoding happens in CPU tasks (PIL), not on the GPU: the teacher input is the resized 640-px
image the student also sees, JPEG decode of the dataset's small files parallelises across the
node's cores, and it keeps the GPU actor doing only teacher forwards.

Views (``cache.views: K`` > 1): the decode task also renders, per image, K-1 pre-augmented views
(the recipe's per-image strong ops, drawn with an RNG seeded per (image, view) from
``cache.view_seed``; see ``distillery.data.views.make_views``), so a shard carries K teacher inputs per image
and its rows record each view's parameters. K and the recipe are part of the plan: a URI built
with another K (or recipe) is refused, never mixed.

Compressed storage (``cache.dtype: pca``): before the first shard, the same decode -> teacher
stages run over the first ``cache.pca.fit_images`` images (sorted ids, plain images), a map task
reduces each shard's grids to their token moments, and the driver sums them in shard order and
fits the PCA basis (``distillery.platform.cache.codec``). It is written beside the plan
(``codec-pca.safetensors``) before the plan, which records its sha256; a resumed build reads it
back (checked against its settings) instead of fitting again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import ray

from distillery.platform.cluster.runtime import cluster_has_gpus, ray_session, require_shared_paths
from distillery.platform.datasets.formats import load_split, refuse_roboflow_export_without_its_paths
from distillery.platform.datasets.synthetic import generate_synthetic_coco
from distillery.platform.teacher_pretrain.resolve import resolve_teacher
from distillery.platform.io import storage
from distillery.platform.io.weights_source import resolve_weights_source
from distillery.platform.datasets.coco import (AnnotationError, CocoDataset, CorruptImageError, decode_image,
                                               load_image_resized)
from distillery.platform.config.augment import runtime_augment_config
# The job's config (its sections are defined with the other config sections, in config.cache).
from distillery.platform.config.cache import CacheComputeConfig, CacheFeaturesConfig, CacheSettings, ViewRecipe
from distillery.platform.config.sections import DataConfig, TeacherConfig, with_absolute_paths
from distillery.platform.cache.codec import CODEC_FILE, PcaCodec, TokenMoments, fit_codec
from distillery.platform.cache.checks import fingerprint_digest
from distillery.platform.cache.feature_cache import (MANIFEST, PLAN, CacheError, FeatureCache, FeatureCacheWriter,
                                               FingerprintMismatchError, ShardInfo, plan_shards)

__all__ = ["CacheComputeConfig", "CacheFeaturesConfig", "CacheSettings", "ViewRecipe", "build_teacher",
           "ensure_dataset", "load_cache_inputs", "load_or_fit_codec", "open_training_cache", "resolve_teacher_dtype", "run_cache_job"]

log = logging.getLogger(__name__)

# torch, the teacher and distillery.data (torch) are imported inside the functions that run the
# teacher or render views: the driver validates this module's config without loading torch.


class CacheInterrupted(RuntimeError):
    """Raised by the ``debug.stop_after_shards`` fault-injection hook."""


# --------------------------------------------------------------------------- helpers

def ensure_dataset(data: DataConfig) -> None:
    """Generate the synthetic dataset if it is configured and absent (COCO format only), into a
    new or empty ``data.root`` (or one holding only its own unfinished ``images/``/``annotations/``):
    a folder of the user's own files is refused, never written into or trained on as shapes."""
    if data.format != "coco":
        return
    ann, _ = data.split_paths("train")
    if storage.exists(ann) or data.synthetic is None:
        return
    present = sorted(storage.listdir(data.root)) if storage.exists(data.root) else []
    if set(present) - {"images", "annotations"}:
        refuse_roboflow_export_without_its_paths(data, ann)
        raise AnnotationError(
            f"annotation file not found: {ann}; data.root {data.root} holds other files "
            f"({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}), so the synthetic dataset "
            "(data.synthetic) is not generated there: to train on your files set data.synthetic=null and "
            "data.format, data.train_annotations / data.train_images and data.val_* to them")
    s = data.synthetic
    log.info("generating the synthetic dataset under %s", data.root)
    generate_synthetic_coco(data.root, train=s.train, val=s.val, size=s.size, seed=s.seed)


def resolve_teacher_dtype(cfg: TeacherConfig, on_gpu: bool) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if on_gpu else "float32"


def build_teacher(cfg: dict[str, Any], dtype: str):
    """Build the frozen teacher from a TeacherConfig dict (runs in actors and on the driver)."""
    import torch

    from distillery.teachers import DinoV3Teacher

    weights = resolve_weights_source(cfg["weights"])[0] if cfg["weights"] else None  # hf-hub: / https: too
    return DinoV3Teacher(model_name=cfg["model_name"], weights=weights,
                         allow_random_init=cfg["allow_random_init"], seed=cfg["seed"],
                         input_size=cfg["input_size"], pool=cfg["pool"], dtype=getattr(torch, dtype),
                         model_kwargs=cfg["model_kwargs"] or None)


def _decode_or_skip(decode, uri: str, image_id: int, bad_records: str, skipped: list[dict[str, Any]]):
    """``decode()``, or None with the image recorded in ``skipped`` when it is corrupt or missing
    and the policy is ``skip`` (the header check at load cannot see a truncated JPEG body)."""
    try:
        return decode()
    except CorruptImageError as exc:
        if bad_records != "skip":
            raise
        log.warning("skipping image %s (%s): %s", image_id, uri, exc)
        skipped.append({"image_id": int(image_id), "uri": uri, "reason": str(exc)})
        return None


def _decode_shard(row: dict[str, Any], size: int, bad_records: str = "error") -> dict[str, Any]:
    images, ids, skipped = [], [], []
    for uri, image_id in zip(row["uris"], row["image_ids"]):
        uri = str(uri)
        image = _decode_or_skip(lambda: load_image_resized(uri, size), uri, image_id, bad_records, skipped)
        if image is not None:
            images.append(image)
            ids.append(int(image_id))
    return {"shard": int(row["shard"]), "image_ids": np.asarray(ids, dtype=np.int64),
            "images": np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
            "skipped": json.dumps(skipped)}


def _decode_shard_views(row: dict[str, Any], size: int, views: int, view_seed: int,
                        recipe: dict[str, Any], bad_records: str = "error") -> dict[str, Any]:
    """Decode a shard's images and render K teacher inputs per image (view 0 = plain).

    Views are rendered from the full-size decoded image, as the training worker replays them,
    so both produce the same pixels."""
    import torch

    from distillery.data.views import make_views

    cfg = runtime_augment_config(ViewRecipe(**recipe), size)

    def decode(uri: str) -> np.ndarray:
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise CorruptImageError(f"image file is missing: {uri}") from None
        return decode_image(data, uri)

    images, ids, view_ids, params, skipped = [], [], [], [], []
    for uri, image_id, boxes in zip(row["uris"], row["image_ids"], row["boxes"]):
        uri, image_id = str(uri), int(image_id)
        decoded = _decode_or_skip(lambda: decode(uri), uri, image_id, bad_records, skipped)
        if decoded is None:
            continue
        # The same layout as the training ingest's decoded image (HWC array, CHW view of it).
        image = torch.from_numpy(np.ascontiguousarray(decoded)).permute(2, 0, 1)
        box_t = torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        for v, (view_image, view_params) in enumerate(make_views(image, box_t, image_id, views, view_seed, cfg)):
            images.append(view_image.numpy())
            ids.append(image_id)
            view_ids.append(v)
            params.append(json.dumps(view_params, sort_keys=True))
    # params travel as one JSON list per shard: a plain string column for Ray Data's Arrow blocks.
    return {"shard": int(row["shard"]), "image_ids": np.asarray(ids, dtype=np.int64),
            "images": np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8),
            "views": np.asarray(view_ids, dtype=np.int32), "params": json.dumps(params),
            "skipped": json.dumps(skipped)}


class _TeacherActor:
    """Holds one frozen teacher; each call runs the teacher over one shard in micro-batches."""

    def __init__(self, teacher_cfg: dict[str, Any], dtype: str, batch_size: int, threads: int):
        import torch

        torch.set_num_threads(threads)  # the actor's CPU share (matters when there is no GPU)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher = build_teacher(teacher_cfg, dtype).to(self.device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out_feats = []
        started = time.time()  # wall clock: the driver measures steady-state throughput from it
        for images in batch["images"]:  # one shard per row (batch_size=1: shards may differ in length)
            feats = []
            for i in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).to(
                    self.device, non_blocking=True)
                feats.append(self.teacher(x.float().div_(255.0)).float().cpu().numpy())
            # A shard whose every image was skipped (bad_records=skip) still gets its (empty) file.
            out_feats.append(np.concatenate(feats) if feats else
                             np.zeros((0, self.teacher.embed_dim, *self.teacher.grid_size), np.float32))
        # "forwards" counts images through the teacher: tests use it to prove resume skips work.
        out = {"shard": batch["shard"], "image_ids": batch["image_ids"],
               "features": np.stack(out_feats), "forwards": np.asarray([len(f) for f in out_feats]),
               "started": np.full(len(out_feats), started)}
        for key in ("views", "params", "skipped"):  # passed through to the writer
            if key in batch:
                out[key] = batch[key]
        return out


def _token_moments(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: one shard's teacher grids -> their token moments (the codec fit's input)."""
    m = TokenMoments.of(np.asarray(row["features"], dtype=np.float32))
    return {"shard": int(row["shard"]), "count": m.count, "mean": m.mean, "scatter": m.scatter,
            "forwards": int(row["forwards"])}


def _write_shard(row: dict[str, Any], writer_args: dict[str, Any]) -> dict[str, Any]:
    writer = FeatureCacheWriter(**writer_args)
    views = [int(v) for v in row["views"]] if "views" in row else None
    params = [str(p) for p in json.loads(row["params"])] if "params" in row else None
    info = writer.write_shard(int(row["shard"]), [int(i) for i in row["image_ids"]], row["features"],
                              views=views, params=params)
    return {**info.to_dict(), "forwards": int(row["forwards"]), "started": float(row["started"]),
            "skipped": str(row["skipped"])}


# --------------------------------------------------------------------------- the job

def _teacher_dataset(cfg: CacheFeaturesConfig, items: list[dict[str, Any]], dtype: str, use_gpu: bool,
                     views: int | None = None):
    """The decode -> teacher stages over planned shards ``items``: rows of (S, C, h, w) grids.
    ``views`` (default ``cache.views``) = 1 renders the plain images only."""
    views = cfg.cache.views if views is None else views
    gpus = (1.0 if use_gpu else 0.0) if cfg.compute.gpus_per_actor == "auto" else float(cfg.compute.gpus_per_actor)
    # A corrupt image keeps its own class (CorruptImageError, deterministic: one error line at
    # the CLI) instead of Ray Data's UserCodeException, whose cause does not reach the driver.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    decode_cpus = cfg.compute.decode_cpus
    # Decode in CPU tasks, not inside the teacher actor: Ray Data would fuse this map into
    # the actor stage when their resources match; a remote-args function opts out of fusion.
    if views > 1:
        ds = ds.map(_decode_shard_views, fn_kwargs={"size": cfg.teacher.input_size, "views": views,
                                                    "view_seed": cfg.cache.view_seed,
                                                    "recipe": cfg.cache.view_recipe.model_dump(mode="json"),
                                                    "bad_records": cfg.data.bad_records},
                    ray_remote_args_fn=lambda: {"num_cpus": decode_cpus})
    else:
        ds = ds.map(_decode_shard, fn_kwargs={"size": cfg.teacher.input_size,
                                              "bad_records": cfg.data.bad_records},
                    ray_remote_args_fn=lambda: {"num_cpus": decode_cpus})
    return ds.map_batches(
        _TeacherActor, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"teacher_cfg": cfg.teacher.model_dump(), "dtype": dtype,
                               "batch_size": cfg.compute.batch_size,
                               "threads": max(1, int(cfg.compute.cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.compute.actors),
        num_gpus=gpus, num_cpus=cfg.compute.cpus_per_actor)


def load_or_fit_codec(cfg: CacheFeaturesConfig, uri: str, dataset: CocoDataset, fingerprint: dict[str, Any],
                      grid: list[int], dtype: str, use_gpu: bool) -> tuple[PcaCodec, dict[str, Any], int]:
    """A pca cache's codec: read back from ``uri`` when an earlier run fitted it (checked against
    the configured settings), else fitted on the teacher's grids of the first
    ``cache.pca.fit_images`` images and written there. Returns (codec, its plan/manifest record,
    teacher forwards spent fitting it)."""
    spec = cfg.cache.codec_spec(grid[0])
    settings = {"method": "pca", "channels": grid[0], **{k: spec[k] for k in ("dims", "bits", "fit_images")},
                "fingerprint_digest": fingerprint_digest(fingerprint)}
    codec_uri, plan_uri = storage.join(uri, CODEC_FILE), storage.join(uri, PLAN)
    forwards = 0
    if storage.exists(codec_uri):
        data = storage.read_bytes(codec_uri)
        codec, meta = PcaCodec.from_bytes(data, codec_uri)
        differ = sorted(k for k in settings if meta.get(k) != settings[k])
        if differ:
            raise CacheError(f"{codec_uri} was fitted for another cache (fields differ: {', '.join(differ)}): "
                             f"use a new cache.uri, or delete {uri} to rebuild it")
        log.info("%s: reusing the codec fitted by an earlier run", codec_uri)
    else:
        if storage.exists(plan_uri):  # shards may exist, encoded with a basis that is gone
            started = json.loads(storage.read_text(plan_uri)).get("dtype")
            if started == "pca":
                raise CacheError(f"cache {uri} was started with the codec file {codec_uri}, which is missing: the "
                                 f"shards written so far were encoded with it; delete {uri} and rerun, or use a new "
                                 "cache.uri")
            raise CacheError(f"cache {uri} was started with a different plan (fields differ: codec, dtype: "
                             f"{started!r}, not 'pca'); use a new cache URI or delete the old one")
        ids = sorted(dataset.image_ids)[:spec["fit_images"]]
        uri_of = {r.image_id: r.uri for r in dataset.records}
        items = [{"shard": k, "image_ids": chunk, "uris": [uri_of[i] for i in chunk]}
                 for k, chunk in enumerate(plan_shards(ids, cfg.cache.shard_size))]
        ds = _teacher_dataset(cfg, items, dtype, use_gpu, views=1).map(_token_moments, num_cpus=0.25)
        moments = TokenMoments(0, np.zeros(grid[0]), np.zeros((grid[0], grid[0])))
        for row in sorted(ds.iter_rows(), key=lambda r: int(r["shard"])):  # summed in shard order: deterministic
            moments = moments.combine(TokenMoments(int(row["count"]), np.asarray(row["mean"]),
                                                   np.asarray(row["scatter"])))
            forwards += int(row["forwards"])
        try:
            codec = fit_codec(moments, spec["dims"], spec["bits"])
        except ValueError as exc:
            raise CacheError(f"cache {uri}: cannot fit the pca codec on {len(ids)} images (cache.pca): {exc}") from None
        data = codec.to_bytes({k: settings[k] for k in ("fit_images", "fingerprint_digest")})
        storage.makedirs(uri)
        storage.write_bytes(codec_uri, data)
        log.info("%s: pca codec fitted on %d images (%d components keep %.4f of the variance)", codec_uri, len(ids),
                 codec.dims, codec.explained_variance)
    record = {**{k: settings[k] for k in ("method", "channels", "dims", "bits", "fit_images")},
              "file": CODEC_FILE, "sha256": hashlib.sha256(data).hexdigest()}
    return codec, record, forwards


def expected_cache_bytes(num_images: int, grid: list[int], dtype: str, views: int,
                         codec: PcaCodec | None = None) -> int:
    """About how many bytes ``num_images`` images' grids take in the cache (the parquet files
    barely compress features): fp16 two bytes per value; int8 one, plus a float32 scale per
    token; pca what ``codec`` stores per grid; any other storage dtype counted at four bytes, to
    be safe."""
    channels, height, width = grid
    if codec is not None:
        per_row = codec.bytes_per_image(height * width)
    else:
        per_value = {"fp16": 2, "int8": 1}.get(dtype, 4)
        per_row = channels * height * width * per_value + (height * width * 4 if dtype == "int8" else 0)
    return num_images * max(1, views) * per_row


def cache_split(cfg: CacheFeaturesConfig, split: str, dataset: CocoDataset, fingerprint: dict[str, Any],
                 grid: list[int], dtype: str, use_gpu: bool) -> dict[str, Any]:
    uri = storage.join(cfg.cache.uri, split)
    dataset_info = {"annotation_uri": dataset.annotation_uri, "annotation_sha256": dataset.annotation_sha256,
                    "num_images": len(dataset), "categories": dataset.categories.to_dict()}
    writer_args = dict(uri=uri, fingerprint=fingerprint, grid=grid, dtype=cfg.cache.dtype,
                       shard_size=cfg.cache.shard_size, dataset=dataset_info)
    fit_forwards, codec = 0, None
    if cfg.cache.dtype == "pca":  # fitted (or read back) before the plan: the plan records its sha256
        codec, record, fit_forwards = load_or_fit_codec(cfg, uri, dataset, fingerprint, grid, dtype, use_gpu)
        writer_args.update(codec=codec, codec_record=record)
    views = cfg.cache.views
    if views > 1:
        from distillery.data.views import view_recipe

        writer_args.update(views=views, view_seed=cfg.cache.view_seed,
                           view_recipe=view_recipe(runtime_augment_config(cfg.cache.view_recipe, cfg.teacher.input_size)))
    writer = FeatureCacheWriter(**writer_args)
    shards = plan_shards(dataset.image_ids, cfg.cache.shard_size)
    todo = writer.begin(shards)
    storage.require_free_space(uri, expected_cache_bytes(sum(len(shards[i]) for i in todo), grid, cfg.cache.dtype,
                                                         views, codec), "cache.uri", f"the {split} cache ({len(todo)} shards)")
    uri_of = {r.image_id: r.uri for r in dataset.records}
    log.info("%s: %d shards planned, %d to compute, %d already written", uri, len(shards), len(todo),
             len(shards) - len(todo))

    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    arrivals: list[float] = []
    stop = cfg.debug.stop_after_shards
    if stop is not None:  # fault injection: compute only `stop` shards, then crash (no manifest)
        todo = todo[:stop]
    if todo:
        items = [{"shard": i, "image_ids": shards[i], "uris": [uri_of[iid] for iid in shards[i]]} for i in todo]
        if views > 1:  # views draw IoU crops around the training boxes (crowd regions excluded)
            boxes_of = {r.image_id: r.boxes[~r.iscrowd].astype(np.float32).reshape(-1).tolist()
                        for r in dataset.records}
            for item in items:
                item["boxes"] = [boxes_of[iid] for iid in item["image_ids"]]
        ds = _teacher_dataset(cfg, items, dtype, use_gpu)
        ds = ds.map(_write_shard, fn_kwargs={"writer_args": writer_args}, num_cpus=0.25)
        for row in ds.iter_rows():
            results.append(row)
            arrivals.append(time.time())
    if stop is not None:
        raise CacheInterrupted(f"debug.stop_after_shards={stop}: stopped after {len(results)} shards")
    elapsed = time.perf_counter() - t0

    written = [ShardInfo(**{k: v for k, v in r.items() if k not in ("forwards", "started", "skipped")})
               for r in results]
    skipped = [item for r in results for item in json.loads(r["skipped"])]
    manifest = writer.finalize(len(shards), written, skipped)
    forwards = sum(int(r["forwards"]) for r in results)
    n_computed = sum(int(r["count"]) for r in results)
    # Steady state: from the first teacher forward to the last shard written (pipeline and actor
    # start-up excluded: what a long job over a large dataset sees).
    steady = None
    if results:
        span = max(arrivals) - min(float(r["started"]) for r in results)
        steady = round(n_computed / span, 2) if span > 0 else None
    return {"split": split, "uri": uri, "images": manifest["count"], "shards": len(shards),
            "shards_computed": len(results), "shards_reused": len(shards) - len(results),
            "teacher_forwards": forwards, "seconds": round(elapsed, 3),
            "images_per_second": round(n_computed / elapsed, 2) if results and elapsed > 0 else None,
            "steady_images_per_second": steady,
            "bytes": sum(s["bytes"] for s in manifest["shards"]),
            "bytes_per_image": round(sum(s["bytes"] for s in manifest["shards"]) / max(1, manifest["count"]), 1),
            "grid": grid, "dtype": cfg.cache.dtype, "views": views,
            **({"codec": {**codec.describe(), "explained_variance": round(codec.explained_variance, 5),
                          "fit_forwards": fit_forwards}} if codec is not None else {}),
            "skipped_images": len(manifest.get("skipped", [])),
            "fingerprint_digest": manifest["fingerprint_digest"]}


def open_training_cache(uri: str, fingerprint: dict[str, Any], image_ids, build=None,
                        codec: dict[str, Any] | None = None) -> FeatureCache:
    """Open the finished cache at ``uri`` for training, with every check on the driver before a
    worker starts: the teacher fingerprint, the storage codec (``codec``: the configured
    ``CacheLocation.codec_spec``; a pca cache's basis file read and checked against its sha256),
    the manifest's fields, each shard present with its recorded size, the dataset's images covered (each shard's ``image_id``/``view`` columns: a few
    KB per shard, never the grids). The grids' bytes are checked against the manifest's sha256
    where they are read: in the ingest tasks, every epoch (a damaged shard fails the run there,
    named, with the repair command).

    ``build`` (given when ``cache.build_if_missing`` is true) builds the cache when it is
    missing and repairs it when a shard is damaged: the cache job keeps the intact shards and
    recomputes exactly the damaged ones. Without it, the error says how to repair."""
    for attempt in (1, 2):
        try:
            if not storage.exists(storage.join(uri, MANIFEST)):
                raise CacheError(f"no feature cache at {uri} ({storage.join(uri, MANIFEST)} not found): build it "
                                 "with jobs/cache_features.py (the same data, teacher and cache.uri), or set "
                                 "cache.build_if_missing=true")
            cache = FeatureCache(uri, expected_fingerprint=fingerprint, expected_codec=codec)
            cache.check_shards()
            cache.codec()
            cache.check_covers(image_ids)
            return cache
        except FingerprintMismatchError:
            raise  # another teacher's (or another codec's) cache: never overwritten
        except CacheError as exc:
            if build is None or attempt == 2:
                raise
            log.warning("%s: cache.build_if_missing=true, building it", str(exc).splitlines()[0])
            build()
    raise AssertionError("unreachable")


def load_cache_inputs(cfg: CacheFeaturesConfig) -> tuple[CacheFeaturesConfig, dict[str, CocoDataset]]:
    """The job's driver-side prologue: S3 settings first (every later access, the dataset's
    included, uses them), local paths made absolute, then each split loaded and validated."""
    storage.configure_s3(cfg.storage.s3_endpoint_url, cfg.storage.s3_region)
    cfg = with_absolute_paths(cfg)  # relative local paths resolved here: Ray workers run elsewhere
    storage.require_writable(cfg.cache.uri, "cache.uri")  # before any work: one line, not a task's traceback
    ensure_dataset(cfg.data)
    cfg = cfg.model_copy(update={"teacher": resolve_teacher(cfg.teacher, cfg.data)})  # the domain teacher, if used
    datasets = {}
    for split in cfg.cache.splits:
        report = storage.join(cfg.cache.uri, split, "bad_records.jsonl")
        datasets[split] = load_split(cfg.data, split, report_uri=report)
    return cfg, datasets


def run_cache_job(cfg: CacheFeaturesConfig) -> dict[str, Any]:
    """Build (or resume) the feature cache of every configured split; return a summary per split."""
    cfg, datasets = load_cache_inputs(cfg)
    with ray_session(cfg.ray, cfg.storage):
        # Decode and write tasks run on any node: the images and the cache must be shared.
        first = next((ds.records[0].uri for ds in datasets.values() if ds.records), cfg.data.root)
        require_shared_paths({"data.root": first, "cache.uri": cfg.cache.uri}, cfg.ray.shared_paths)
        use_gpu = cluster_has_gpus() and cfg.compute.gpus_per_actor != 0
        dtype = resolve_teacher_dtype(cfg.teacher, use_gpu)
        # The driver builds the teacher once (CPU) for its fingerprint and grid shape.
        teacher = build_teacher(cfg.teacher.model_dump(), dtype)
        fingerprint = teacher.fingerprint
        grid = [teacher.embed_dim, *teacher.grid_size]
        del teacher
        summary = {split: cache_split(cfg, split, ds, fingerprint, grid, dtype, use_gpu)
                   for split, ds in datasets.items()}
    log.info("cache summary: %s", json.dumps(summary))
    return summary
